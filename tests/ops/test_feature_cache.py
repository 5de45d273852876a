"""LASSO's shared features (pf_ray.ops.feature_cache): keyed by what they are computed from, the same choices with
and without them, a damaged file computed again; the "baseline" feature source against the "pruned" one."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pf_ray.learners.channel_pruning import ChannelPruning, ChannelPruningConfig
from pf_ray.ops import feature_cache
from pf_ray.ops.channel_groups import prunable_groups
from pf_ray.ops.pruning import prune_channels_
from tests.tiny import tiny_cnn, tiny_data

SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(feature_cache.CACHE_ENV, str(tmp_path))
    feature_cache.clear_memory()
    yield
    feature_cache.clear_memory()


def _batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(32, *SHAPE, generator=generator) for _ in range(3)]


def _prune(model, *, features="baseline", batches=None, ratios=0.5, **options):
    costs: dict = {}
    ratios = ratios if isinstance(ratios, dict) else [ratios] * len(prunable_groups(model, SHAPE))
    prune_channels_(model, SHAPE, ratios, round_to=1, criterion="lasso", batches=batches or _batches(),
                    features=features, costs=costs, **options)
    return model, costs


@pytest.mark.parametrize("features", ["pruned", "baseline"])
def test_a_later_candidate_reads_what_the_first_computed_and_chooses_the_same(features):
    first, costs = _prune(tiny_cnn(), features=features)
    assert costs["baseline_source"] == "computed" and list(Path(feature_cache.cache_dir()).glob("*.pt"))
    again, costs = _prune(tiny_cnn(), features=features)
    assert costs["baseline_source"] == "memory"
    feature_cache.clear_memory()  # another trial's process: from the file
    other, costs = _prune(tiny_cnn(), features=features)
    assert costs["baseline_source"] == "disk"
    for model in (again, other):
        for (name, value), expected in zip(model.state_dict().items(), first.state_dict().values(), strict=True):
            assert torch.equal(value, expected), name


def test_without_a_disk_cache_the_choices_are_the_same(monkeypatch):
    cached, _ = _prune(tiny_cnn())
    monkeypatch.setenv(feature_cache.CACHE_ENV, "off")
    feature_cache.clear_memory()
    uncached, costs = _prune(tiny_cnn())
    assert costs["baseline_source"] == "computed" and feature_cache.cache_dir() is None
    for value, expected in zip(uncached.state_dict().values(), cached.state_dict().values(), strict=True):
        assert torch.equal(value, expected)


@pytest.mark.parametrize("change", ["weights", "batches", "points_per_image", "seed"])
def test_another_baseline_data_sample_or_setting_is_a_miss(change):
    _prune(tiny_cnn())
    model, options, batches = tiny_cnn(), {}, None
    if change == "weights":
        with torch.no_grad():
            model[0].weight[0, 0, 0, 0] += 1e-3
    elif change == "batches":
        batches = _batches(seed=1)
    else:
        options = {change: 5 if change == "points_per_image" else 1}
    _, costs = _prune(model, batches=batches, **options)
    assert costs["baseline_source"] == "computed"


def test_a_damaged_file_is_computed_again_and_rewritten():
    first, _ = _prune(tiny_cnn())
    (path,) = Path(feature_cache.cache_dir()).glob("*.pt")
    for damaged in (path.read_bytes()[: path.stat().st_size // 2], b"not a torch file"):
        path.write_bytes(damaged)
        feature_cache.clear_memory()
        again, costs = _prune(tiny_cnn())
        assert costs["baseline_source"] == "computed"
        assert torch.load(path, weights_only=True)["key"] == path.stem  # whole again
        for value, expected in zip(again.state_dict().values(), first.state_dict().values(), strict=True):
            assert torch.equal(value, expected)


def test_baseline_features_choose_and_refit_the_first_group_as_the_pruned_model_does():
    # the first group sees the model as passed in under either source: the statistics must give the same LASSO
    # choice and, up to rounding, the same least-squares weights as the samples themselves
    name = prunable_groups(tiny_cnn(), SHAPE)[1].name
    pruned, _ = _prune(tiny_cnn(), features="pruned", ratios={name: 0.5})
    shared, _ = _prune(tiny_cnn(), features="baseline", ratios={name: 0.5})
    for (key, value), expected in zip(shared.state_dict().items(), pruned.state_dict().values(), strict=True):
        assert value.shape == expected.shape, key
        assert torch.allclose(value, expected, rtol=1e-4, atol=1e-5), key


def test_baseline_features_prune_every_group_to_a_working_model():
    model, costs = _prune(tiny_cnn(), features="baseline")
    assert "sampling" not in costs  # no forward pass of its own: everything came from the baseline's statistics
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)
    reference = tiny_cnn()
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in reference.parameters())


def test_the_learner_states_the_per_candidate_cost(capsys):
    learner = ChannelPruning(ChannelPruningConfig(mode="uniform", keep_ratio=0.5, round_to=1, num_batches=2,
                                                  features="baseline"))
    learner.prepare(tiny_cnn(), tiny_data(SHAPE, n=64))
    learner.prepare(tiny_cnn(), tiny_data(SHAPE, n=64))
    lines = [line for line in capsys.readouterr().out.splitlines() if "LASSO pruning" in line]
    assert len(lines) == 2
    assert "per candidate" in lines[0] and "baseline features computed" in lines[0]
    assert "baseline features memory" in lines[1] and "features: baseline" in lines[1]


def test_an_unknown_feature_source_lists_the_known_ones():
    from pf_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"features: got 'candidate'; allowed: pruned, baseline"):
        ChannelPruningConfig(features="candidate")
    with pytest.raises(ConfigError, match=r"features: got 'candidate'; allowed: pruned, baseline"):
        _prune(copy.deepcopy(tiny_cnn()), features="candidate")
