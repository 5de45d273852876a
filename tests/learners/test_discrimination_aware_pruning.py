"""The discrimination_aware_pruning learner: end to end on a tiny ResNet-20 and a plain network, seeded,
refusals, config validation, registration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pf_ray.config import DatasetConfig
from pf_ray.data import DataBundle, load_data
from pf_ray.errors import ConfigError, ModelError
from pf_ray.learners.discrimination_aware_pruning import (  # importing registers the learner
    DiscriminationAwarePruning,
    DiscriminationAwarePruningConfig,
)
from pf_ray.metrics import model_stats
from pf_ray.ops.channel_groups import prunable_groups
from pf_ray.ops.pruning import kept_channel_count, prune_channels_
from pf_ray.registry import LEARNERS
from tests.tiny import tiny_resnet20 as _resnet20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the test machines have 2 shared cores: two intra-op threads fighting other processes run 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> DataBundle:
    return load_data(DatasetConfig(name="synthetic"))  # 1x8x8, 10 classes



def test_prepare_prunes_resnet20_to_the_rounded_counts(data):
    # keep_ratio 0.25 with round_to 8 keeps 8/8/16 channels: rounding matters and only 128 greedy steps run
    config = DiscriminationAwarePruningConfig(keep_ratio=0.25, round_to=8, stage_fine_tune_steps=2, batch_size=16)
    original = _resnet20()
    groups = prunable_groups(original, data.input_shape)
    before = model_stats(original, data.input_shape)
    learner = DiscriminationAwarePruning(config)
    model = learner.prepare(original, data)

    assert type(model) is type(original)
    expected = {g.name: kept_channel_count(g.num_channels, 0.25, 8) for g in groups}
    assert learner.kept_channels == expected
    assert sorted(set(expected.values())) == [8, 16]
    assert model.conv1.out_channels == 8 and model.layer1[0].conv1.out_channels == 8
    assert model.layer3[0].conv1.out_channels == 16 and model.fc.in_features == 16
    after = model_stats(model, data.input_shape)
    assert after.macs < 0.25 * before.macs
    model.eval()
    with torch.no_grad():
        logits = model(data.test.tensors[0][:5])
    assert logits.shape == (5, 10) and torch.isfinite(logits).all()

    # no auxiliary head (or anything else) left behind: the state dict is a plainly pruned ResNet-20's
    reference = _resnet20()
    prune_channels_(reference, data.input_shape, [0.25] * len(groups), round_to=8)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert learner.finalize(model) is model


def test_plain_network_with_layer_fine_tuning(data):
    # a chain without residuals, a linear head reading a pruned group, and the paper's per-channel fine-tuning
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    config = DiscriminationAwarePruningConfig(
        keep_ratio=0.5, round_to=2, num_stages=2, stage_fine_tune_steps=2, channel_fine_tune_steps=1, batch_size=16
    )
    learner = DiscriminationAwarePruning(config)
    model = learner.prepare(model, data)
    assert learner.kept_channels == {"0": 4, "3": 4, "7": 8}
    assert model[7].in_features == 4 * 8 * 8
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_prepare_is_seeded(data):
    config = DiscriminationAwarePruningConfig(keep_ratio=0.5, round_to=2, num_stages=2, stage_fine_tune_steps=1,
                                              batch_size=16)  # fmt: skip

    def pruned() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(8 * 4 * 4, 10))  # fmt: skip
        return DiscriminationAwarePruning(config).prepare(model, data)

    first, second = pruned(), pruned()
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_model_without_prunable_groups_is_refused(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ModelError, match="no prunable channel group"):
        DiscriminationAwarePruning(DiscriminationAwarePruningConfig()).prepare(model, data)


def test_more_stages_than_groups_names_the_field(data):
    with pytest.raises(ConfigError, match=r"learner\.options\.num_stages: got 13; .* 12 prunable"):
        DiscriminationAwarePruning(DiscriminationAwarePruningConfig(num_stages=13)).prepare(_resnet20(), data)


@pytest.mark.parametrize(
    "field, value",
    [
        ("keep_ratio", 0.0),
        ("keep_ratio", 1.5),
        ("num_stages", 0),
        ("round_to", 0),
        ("stage_fine_tune_steps", -1),
        ("channel_fine_tune_steps", -1),
        ("reconstruction_weight", -0.5),
        ("learning_rate", 0.0),
        ("batch_size", 0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}: got {value!r}"):
        DiscriminationAwarePruningConfig(**{field: value})


def test_registered_with_its_config():
    entry = LEARNERS.entry("discrimination_aware_pruning")
    assert entry.obj is DiscriminationAwarePruning
    assert entry.meta["config"] is DiscriminationAwarePruningConfig
