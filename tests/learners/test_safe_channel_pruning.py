"""Channel pruning on a user's graph with splits, shuffles and grouped convolutions (issue 15): the learner's check
finds the groups that break the model before any training, every trial and the retrain leave them unpruned, and
the preflight says which and why (or refuses the model in one line when nothing is left to prune)."""

from __future__ import annotations

import copy

import pytest
import torch

from pf_ray.cli import EXIT_BAD_INPUT, main
from pf_ray.config import SearchConfig, load_experiment
from pf_ray.errors import ConfigError
from pf_ray.export.onnx import export_onnx
from pf_ray.learners.channel_pruning import ChannelPruning, ChannelPruningConfig
from pf_ray.metrics import model_stats
from pf_ray.strict import from_dict, to_dict
from tests.tiny import tiny_data
from tests.user_graphs import GROUPED, PLAIN, SHAPE, SHUFFLED, only_shuffles, shuffle_user_net


def test_check_leaves_the_unsafe_groups_out_and_a_trial_prunes_the_rest_toward_half_the_macs(tmp_path):
    model, data = shuffle_user_net(), tiny_data(SHAPE)
    learner = ChannelPruning(ChannelPruningConfig(criterion="l1", round_to=2))  # even counts: grouped convs pruned
    learner.check(model, SHAPE)
    assert tuple(group.name for group in learner.skipped_groups()) == SHUFFLED
    checked = learner.checked_config()
    assert checked.excluded_groups == SHUFFLED

    # a trial: a fresh learner from the config as Ray carries it, never checked itself
    trial = ChannelPruning(from_dict(ChannelPruningConfig, to_dict(checked)))
    space = trial.search_space(model, SHAPE, SearchConfig(target_macs_ratio=0.5))
    assert space.names == GROUPED + PLAIN
    candidate = space.apply(trial.config, [0.5] * len(space.names))
    assert space.budget.counts(candidate.layer_keep_ratios)[0] == 16  # the stem, whole, in its place
    pruned = ChannelPruning(candidate).prepare(copy.deepcopy(model), data)
    ratio = model_stats(pruned, SHAPE).macs / model_stats(model, SHAPE).macs
    assert 0.3 < ratio <= 0.5 + 1e-9 and ratio == pytest.approx(space.budget.cost(candidate.layer_keep_ratios))
    assert pruned.stem[0].out_channels == 16  # left whole
    branch = pruned.block1.branch[0]
    assert branch.groups == 2 and branch.out_channels == space.budget.kept(candidate.layer_keep_ratios)[0]
    assert pruned.eval()(torch.randn(2, *SHAPE)).shape == (2, 10)
    assert export_onnx(pruned, SHAPE, tmp_path / "pruned.onnx").exists()


def test_mode_uniform_prunes_only_the_safe_groups():
    model = shuffle_user_net()
    learner = ChannelPruning(ChannelPruningConfig(mode="uniform", keep_ratio=0.5, round_to=1, criterion="l1"))
    learner.check(model, SHAPE)
    assert tuple(group.name for group in learner.skipped_groups()) == SHUFFLED + GROUPED  # round_to 1: odd counts
    pruned = ChannelPruning(learner.checked_config()).prepare(model, tiny_data(SHAPE))
    assert pruned.expand[0].out_channels == 16 and pruned.mid[0].out_channels == 16
    assert pruned.stem[0].out_channels == 16 and pruned.block1.branch[0].out_channels == 8
    assert pruned.eval()(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_excluded_groups_can_be_given_and_are_checked():
    model = shuffle_user_net()
    learner = ChannelPruning(ChannelPruningConfig(excluded_groups=("mid.0",)))
    learner.check(model, SHAPE)
    skipped = dict((group.name, group.reason) for group in learner.skipped_groups())
    assert set(skipped) == {*SHUFFLED, "mid.0"} and "excluded_groups" in skipped["mid.0"]
    with pytest.raises(ConfigError, match=r"excluded_groups: got 'nosuch', not a prunable channel group"):
        ChannelPruning(ChannelPruningConfig(excluded_groups=("nosuch",))).check(model, SHAPE)


def test_nothing_safe_to_prune_is_a_config_error_naming_the_first_reason():
    with pytest.raises(ConfigError, match=r"nothing can be pruned in ShuffleUserNet: all 3 channel groups are left "
                                          r"unpruned \(first, 'stem.0': its channels pass through a reshape"):
        ChannelPruning(ChannelPruningConfig(round_to=1)).check(only_shuffles(), SHAPE)
    # round_to 8: the blocks' grouped convs are safe, but their 8 channels cannot lose one
    with pytest.raises(ConfigError, match=r"nothing can be pruned in ShuffleUserNet: 1 of its 3 channel groups are "
                                          r"left unpruned \(first, 'stem.0': .*\), and the other 2 keep every channel "
                                          r"at keep ratio 0.1 with round_to=8"):
        ChannelPruning(ChannelPruningConfig()).check(only_shuffles(), SHAPE)


USER_FILE = '''
import torch
from torch import nn


def shuffle(x):
    n, c, h, w = x.shape
    return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 1, groups=2), nn.ReLU(),
                                    nn.Conv2d(half, half, 3, padding=1, groups=half), nn.Conv2d(half, half, 1))

    def forward(self, x):
        a, b = torch.chunk(x, 2, dim=1)
        return shuffle(torch.cat([a, self.branch(b)], 1))


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, plain):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.block = Block(16)
        self.plain = nn.Conv2d(16, 32, 3, padding=1) if plain else nn.Identity()
        self.head = nn.Linear(32 if plain else 16, num_classes)

    def forward(self, x):
        return self.head(self.plain(self.block(self.stem(x))).mean((2, 3)))


def with_plain(in_channels, num_classes):
    return Net(in_channels, num_classes, True)


def shuffles_only(in_channels, num_classes):
    return Net(in_channels, num_classes, False)
'''


def _overrides(tmp_path, function: str) -> list[str]:
    models = tmp_path / "models.py"
    models.write_text(USER_FILE)
    return [f"storage.path={tmp_path / 'runs'}", "dataset.name=digits", f"model.name={models}:{function}"]


def test_the_preflight_passes_the_skipped_groups_on_before_any_training(tmp_path):
    from pf_ray.launch.preflight import preflight

    lines = []
    overrides = [*_overrides(tmp_path, "with_plain"), "search.budget=macs", "search.target_macs_ratio=0.5"]
    prepared = preflight(load_experiment(None, overrides), log=lines.append)  # a MACs budget: no latency table
    assert prepared.baseline_path is None  # nothing trained
    assert [name for name, _ in prepared.skipped_groups] == ["stem"]
    assert prepared.spec.learner_config.excluded_groups == ("stem",)
    assert any("1 channel group(s) left unpruned: stem" in line for line in lines)


def test_a_model_with_nothing_safe_to_prune_exits_2_in_one_line_before_training(tmp_path, capfd):
    argv = ["compress"] + [part for override in _overrides(tmp_path, "shuffles_only") for part in ("--set", override)]
    assert main(argv) == EXIT_BAD_INPUT
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and "nothing can be pruned in Net" in lines[0], lines
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_a_latency_budget_predicts_with_the_excluded_groups_whole_and_its_step_can_exclude_more():
    from pf_ray.config import Budget
    from pf_ray.ops.latency_budget import TargetLatency
    from pf_ray.ops.macs_budget import macs_table

    model = shuffle_user_net()
    sizes = tuple(macs_table(model, SHAPE).sizes)  # every group, the excluded ones included
    asked = []

    class Table:  # 0.01 ms per channel kept, whatever the group
        def __init__(self):
            self.sizes = sizes

        def predict(self, kept, removed=()):
            asked.append(list(kept))
            return 0.01 * sum(kept)

    table = Table()
    reference = table.predict(sizes)
    # a target whose latency steps every channel: round_to "auto" is 1, where the grouped convs cannot stay even
    source = lambda **_: TargetLatency(table, reference, "a synthetic runtime", step=1)  # noqa: E731
    learner = ChannelPruning(ChannelPruningConfig(excluded_groups=SHUFFLED, depth=False))
    space = learner.search_space(model, SHAPE, SearchConfig(budget=Budget.LATENCY, target_speedup=1.2), source)
    assert space.names == PLAIN and space.budget.predictor.sizes == (32, 32)
    assert dict(space.fixed) == {"round_to": 1, "excluded_groups": SHUFFLED + GROUPED}
    assert space.apply(learner.config, [0.5, 0.5]).excluded_groups == SHUFFLED + GROUPED  # what a trial prunes by
    values = space.project([1.0, 1.0])
    counts = space.budget.counts(values)
    assert counts[:3] == [16, 8, 8] and counts[3:] == space.budget.kept(values)  # the excluded whole, in place
    assert asked[-1][:3] == [16, 8, 8]  # the table is asked with them whole
    assert space.budget.cost(values) <= 1 / 1.2


def test_the_knapsack_start_has_a_value_per_searched_group_only():
    model, data = shuffle_user_net(), tiny_data(SHAPE)
    learner = ChannelPruning(ChannelPruningConfig(round_to=2, excluded_groups=SHUFFLED))
    space = learner.search_space(model, SHAPE, SearchConfig(target_macs_ratio=0.5))
    start = learner.starting_proposal(model, data, space)
    assert len(start) == len(space.names) == len(GROUPED + PLAIN)
    assert 0.4 < space.budget.cost(start) <= 0.5


def test_discrimination_aware_pruning_leaves_the_same_graph_safe(tmp_path):
    """The other channel pruner: its check leaves the shuffled group and the grouped convolutions' outputs (whose
    groups its greedy selection does not keep equal) unpruned, and a trial prunes the plain convolutions."""
    from pf_ray.learners.discrimination_aware_pruning import (
        DiscriminationAwarePruning,
        DiscriminationAwarePruningConfig,
    )

    model, data = shuffle_user_net(), tiny_data(SHAPE)
    config = DiscriminationAwarePruningConfig(keep_ratio=0.5, num_stages=2, round_to=2, stage_fine_tune_steps=2,
                                              batch_size=8)
    learner = DiscriminationAwarePruning(config)
    learner.check(model, SHAPE)
    assert tuple(group.name for group in learner.skipped_groups()) == SHUFFLED + GROUPED
    trial = DiscriminationAwarePruning(from_dict(DiscriminationAwarePruningConfig, to_dict(learner.checked_config())))
    pruned = trial.prepare(copy.deepcopy(model), data)
    assert pruned.expand[0].out_channels == 16 and pruned.mid[0].out_channels == 16  # 32 -> half
    assert pruned.stem[0].out_channels == 16 and pruned.block1.branch[0].out_channels == 8  # whole
    assert pruned.eval()(torch.randn(2, *SHAPE)).shape == (2, 10)
    assert export_onnx(pruned, SHAPE, tmp_path / "pruned.onnx").exists()

    with pytest.raises(ConfigError, match="discrimination_aware_pruning: nothing can be pruned"):
        DiscriminationAwarePruning(config).check(only_shuffles(), SHAPE)
