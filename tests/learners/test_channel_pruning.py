"""The channel_pruning learner: prepare, its search dimensions, config and ratios-file errors, both criteria
(L1, LASSO), the modes (uniform, list, auto) and group fine-tuning."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from pf_ray.config import read_values_file
from pf_ray.errors import ConfigError, ModelError
from pf_ray.learners import channel_pruning
from pf_ray.learners.channel_pruning import (
    RATIOS_FILE_FIELD,
    ChannelPruning,
    ChannelPruningConfig,
    search_dimensions,
)
from pf_ray.strict import from_dict
from tests.tiny import SHAPE
from tests.tiny import tiny_data as _data
from tests.tiny import tiny_resnet20 as _resnet20


def test_channel_pruning_prunes_in_prepare():
    learner = ChannelPruning(ChannelPruningConfig(keep_ratio=0.5, round_to=8))
    model = learner.prepare(_resnet20(), _data())
    assert model.conv1.out_channels == 8 and model.fc.in_features == 32
    assert learner.kept_channels["layer3.0.conv2"] == 32


def test_search_dimensions_are_the_group_names():
    names = search_dimensions(_resnet20(), SHAPE)
    assert len(names) == 12 and names[0] == "conv1" and "layer2.0.conv2" in names


def test_layer_keep_ratios_of_the_wrong_length_name_the_field():
    learner = ChannelPruning(ChannelPruningConfig(layer_keep_ratios=(0.5, 0.5)))
    with pytest.raises(ConfigError, match=r"learner\.options\.layer_keep_ratios: got 2 values; expected 12"):
        learner.prepare(_resnet20(), _data())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"layer_keep_ratios": [0.5, 0.0]}, r"learner\.options\.layer_keep_ratios\[1\]: got 0\.0"),
        ({"keep_ratio": 1.5}, r"learner\.options\.keep_ratio: got 1\.5; allowed range is \(0, 1\]"),
        ({"round_to": 0}, r"learner\.options\.round_to: got 0"),
        ({"criterion": "taylor"}, r"learner\.options\.criterion: got 'taylor'; allowed: l1, lasso"),
        ({"min_keep_ratio": 0.0}, r"learner\.options\.min_keep_ratio: got 0\.0"),
        ({"keep_ratios": 0.5}, r"unknown field learner\.options\.keep_ratios"),
        ({"mode": "manual"}, r"learner\.options\.mode: got 'manual'; allowed: uniform, list, auto"),
        ({"mode": "list"},
         r"learner\.options\.mode: got 'list' without layer_keep_ratios; set layer_keep_ratios or ratios_file"),
        (
            {"mode": "uniform", "layer_keep_ratios": [0.5]},
            r"learner\.options\.layer_keep_ratios: got 1 values with mode 'uniform'",
        ),
        (
            {"mode": "list", "ratios_file": "/nonexistent/ratios.yaml"},
            r"learner\.options\.ratios_file: '/nonexistent/ratios\.yaml' does not exist",
        ),
        (
            {"mode": "auto", "ratios_file": "/nonexistent/ratios.yaml"},
            r"learner\.options\.ratios_file: got '/nonexistent/ratios\.yaml' with mode 'auto'",
        ),
        ({"reconstruct": "yes"}, r"learner\.options\.reconstruct: got 'yes' \(str\); expected true or false"),
        ({"num_batches": 0}, r"learner\.options\.num_batches: got 0; allowed range is \[1, inf\]"),
        ({"points_per_image": 0}, r"learner\.options\.points_per_image: got 0"),
        ({"group_size": -1}, r"learner\.options\.group_size: got -1; allowed range is \[0, inf\]"),
        ({"group_fine_tune_steps": -5}, r"learner\.options\.group_fine_tune_steps: got -5"),
        ({"group_learning_rate": 0.0}, r"learner\.options\.group_learning_rate: got 0\.0"),
        ({"round_to": "fast"}, r"learner\.options\.round_to: got 'fast'; expected a positive integer or 'auto'"),
        ({"round_to": 0}, r"learner\.options\.round_to: got 0; allowed range is \[1, inf\]"),
    ],
)
def test_channel_pruning_config_is_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ChannelPruningConfig, options, path="learner.options")


def test_list_becomes_a_tuple_of_ratios():
    config = from_dict(ChannelPruningConfig, {"layer_keep_ratios": [0.5, 1]}, path="learner.options")
    assert config.layer_keep_ratios == (0.5, 1.0)


def test_a_model_with_nothing_to_prune_is_a_model_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))  # its only layer produces the output
    with pytest.raises(ModelError, match="no prunable channel group"):
        ChannelPruning(ChannelPruningConfig()).prepare(model, _data())


# --------------------------------------------------------------------------------------------------------------
# channel_pruning: criteria, modes, ratios files, group fine-tuning


@pytest.mark.parametrize("criterion", ["l1", "lasso"])
@pytest.mark.parametrize("group_size", [0, 6])
def test_channel_pruning_contract_for_both_criteria(criterion, group_size):
    data = _data()
    config = ChannelPruningConfig(
        criterion=criterion, keep_ratio=0.5, round_to=4, num_batches=1, group_size=group_size, group_fine_tune_steps=2
    )
    learner = ChannelPruning(config)
    model = learner.prepare(_resnet20(), data)
    assert learner.kept_channels == {
        name: n // 2
        for name, n in zip(search_dimensions(_resnet20(), SHAPE), [16] * 4 + [32] * 4 + [64] * 4, strict=True)
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs, labels = data.train.tensors
    for step in (1, 2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[:8]), labels[:8]).backward()
        optimizer.step()
        learner.on_step(model, step)
    model = learner.finalize(model).eval()
    with torch.no_grad():
        assert torch.isfinite(model(inputs)).all()


def _kept(options: dict) -> dict[str, int]:
    learner = ChannelPruning(
        from_dict(ChannelPruningConfig, {"criterion": "l1", "round_to": 1, **options}, path="learner.options")
    )
    learner.prepare(_resnet20(), _data())
    return learner.kept_channels


RATIOS = [0.25, 0.5, 0.75, 1.0, 0.5, 0.5, 0.25, 0.75, 0.5, 0.25, 1.0, 0.5]  # one per ResNet-20 group
SIZES = [16] * 4 + [32] * 4 + [64] * 4


def test_modes_uniform_list_and_auto():
    names = search_dimensions(_resnet20(), SHAPE)
    expected_list = {name: round(n * r) for name, n, r in zip(names, SIZES, RATIOS, strict=True)}
    assert _kept({"mode": "uniform", "keep_ratio": 0.75}) == {n: s * 3 // 4 for n, s in zip(names, SIZES, strict=True)}
    assert _kept({"mode": "list", "layer_keep_ratios": RATIOS}) == expected_list
    assert _kept({"mode": "auto", "layer_keep_ratios": RATIOS}) == expected_list  # what the search filled in
    # auto before any search has filled layer_keep_ratios: keep_ratio everywhere
    assert _kept({"mode": "auto", "keep_ratio": 0.25}) == {n: s // 4 for n, s in zip(names, SIZES, strict=True)}


@pytest.mark.parametrize(
    "file_name, text",
    [
        ("ratios.json", json.dumps(RATIOS)),
        ("ratios.yaml", "".join(f"- {r}\n" for r in RATIOS)),
        (
            "ratios.txt",
            "# keep ratios, stem first\n"
            + ", ".join(map(str, RATIOS[:6]))
            + "\n"
            + "\n".join(map(str, RATIOS[6:]))
            + "  # stage 3\n",
        ),
    ],
    ids=["json", "yaml", "text"],
)
def test_mode_list_reads_a_ratios_file(tmp_path, file_name, text):
    path = tmp_path / file_name
    path.write_text(text)
    assert read_values_file(str(path), RATIOS_FILE_FIELD) == tuple(RATIOS)
    names = search_dimensions(_resnet20(), SHAPE)
    assert _kept({"mode": "list", "ratios_file": str(path)}) == {
        name: round(n * r) for name, n, r in zip(names, SIZES, RATIOS, strict=True)
    }


@pytest.mark.parametrize(
    "file_name, text, message",
    [
        ("short.json", "[0.5, 0.5]", r"ratios_file: '.*short\.json' holds 2 ratios; expected 12"),
        ("bad.yaml", "{a: 1}", r"ratios_file: '.*bad\.yaml' holds dict; expected a list of numbers"),
        ("bad.txt", "0.5 half", r"ratios_file: '.*bad\.txt' is not a list of numbers"),
        ("zero.txt", "0.5 0.0", r"ratios_file: value 1 of '.*zero\.txt' is 0\.0; allowed: numbers in \(0, 1\]"),
    ],
    ids=["length", "mapping", "word", "zero"],
)
def test_bad_ratios_files_name_the_field(tmp_path, file_name, text, message):
    path = tmp_path / file_name
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"learner\.options\." + message):
        _kept({"mode": "list", "ratios_file": str(path)})


class _SmallNet(nn.Module):
    """Two prunable groups: conv1 (8 channels) and conv2 (8 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return _SmallNet()


@pytest.mark.parametrize("steps", [0, 3])
def test_group_fine_tuning_prunes_one_group_at_a_time_and_trains_in_between(monkeypatch, steps):
    calls, after = [], []
    real = channel_pruning.prune_channels_

    def spy(model, input_shape, keep_ratios, **options):
        calls.append((list(keep_ratios), copy.deepcopy(model.state_dict())))
        kept = real(model, input_shape, keep_ratios, **options)
        after.append(copy.deepcopy(model.state_dict()))
        return kept

    monkeypatch.setattr(channel_pruning, "prune_channels_", spy)
    config = ChannelPruningConfig(
        mode="uniform", keep_ratio=0.5, round_to=1, num_batches=1, group_size=1, group_fine_tune_steps=steps
    )
    learner = ChannelPruning(config)
    model = learner.prepare(_small_net(), _data())

    assert [names for names, _ in calls] == [["conv1"], ["conv2"]]
    assert learner.kept_channels == {"conv1": 4, "conv2": 4}
    assert (model.conv1.out_channels, model.conv2.in_channels, model.conv2.out_channels) == (4, 4, 4)
    assert model.fc.in_features == 4
    # conv1 is not touched by the second pruning: what changed it in between is the fine-tuning
    fine_tuned = not torch.equal(after[0]["conv1.weight"], calls[1][1]["conv1.weight"])
    assert fine_tuned == (steps > 0)
    # seeded: the same config on the same model gives the same weights
    again = ChannelPruning(config).prepare(_small_net(), _data())
    assert model.state_dict().keys() == again.state_dict().keys()
    assert all(torch.equal(value, again.state_dict()[key]) for key, value in model.state_dict().items())


def test_the_knapsack_start_meets_the_budget_within_the_box_and_is_not_uniform():
    from pf_ray.config import SearchConfig

    model, data = _resnet20(), _data()
    learner = ChannelPruning(ChannelPruningConfig(round_to=4))
    space = learner.search_space(model, SHAPE, SearchConfig(target_macs_ratio=0.4))
    start = learner.starting_proposal(model, data, space)
    assert len(start) == len(space.names) and all(space.low <= v <= space.high for v in start)
    assert space.budget.cost(start) <= 0.4 and space.budget.cost(start) > 0.3  # spent, not wasted
    assert len(set(start)) > 2  # importance against cost, group by group: not one ratio everywhere
    assert space.project(start) == pytest.approx(start, abs=0.13)  # a trial's projection barely moves it
    assert learner.starting_proposal(model, data, space) == start  # seeded batches: the same start again


def test_round_to_auto_is_the_targets_latency_step_else_8():
    from pf_ray.config import Budget, SearchConfig
    from pf_ray.ops.latency_budget import TargetLatency
    from pf_ray.ops.macs_budget import macs_table
    from tests.ops.test_latency_budget import LinearTable

    model = _resnet20()
    sizes = tuple(macs_table(model, SHAPE).sizes)

    class Flat(LinearTable):  # 1 ms whatever is kept: any speed-up below 1 is reachable at once
        def predict(self, kept, removed=()):
            return 1.0

    step16 = TargetLatency(Flat(sizes=sizes), reference_ms=1.5, name="a flat runtime", step=16)
    asked = []
    source = lambda: asked.append(1) or step16  # noqa: E731
    learner = ChannelPruning(ChannelPruningConfig(depth=False))  # widths only: this table has no blocks
    assert ChannelPruningConfig().round_to == "auto"
    space = learner.search_space(model, SHAPE, SearchConfig(budget=Budget.LATENCY, target_speedup=1.2), source)
    assert dict(space.fixed) == {"round_to": 16} and space.budget.round_to == 16 and asked == [1]
    candidate = space.apply(learner.config, [0.5] * len(space.names))
    assert candidate.round_to == 16 and all(k % 16 == 0 for k in space.budget.kept(candidate.layer_keep_ratios))
    macs = learner.search_space(model, SHAPE, SearchConfig(target_macs_ratio=0.5), source)
    assert dict(macs.fixed) == {"round_to": 8} and asked == [1]  # a MACs budget never asks for the table
    given = ChannelPruning(ChannelPruningConfig(round_to=4, depth=False))
    assert dict(given.search_space(model, SHAPE, SearchConfig(budget=Budget.LATENCY, target_speedup=1.2),
                                   source).fixed) == {"round_to": 4}
    pruned = ChannelPruning(ChannelPruningConfig(mode="uniform", keep_ratio=0.5)).prepare(_resnet20(), _data())
    assert pruned.conv1.out_channels == 8  # mode uniform, "auto" without a table: multiples of 8
