"""Depth as a searched dimension of channel pruning (``learner.options.depth``): the config's checks, the space
(groups, then one value per removable block), projection onto a MACs or latency budget that removes blocks where
width alone cannot reach it, prepare with removed blocks, the checkpoint of such a model, and the knapsack start."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from pf_ray.checkpoint import load_checkpoint, save_checkpoint
from pf_ray.config import Budget, ModelConfig, SearchConfig, TargetConfig
from pf_ray.errors import ConfigError
from pf_ray.learners.channel_pruning import ChannelPruning, ChannelPruningConfig
from pf_ray.metrics import model_stats
from pf_ray.ops.blocks import removed_blocks
from pf_ray.ops.depth import joint_macs
from pf_ray.ops.depth_space import dimension_names, join_values, split_values
from pf_ray.ops.latency_budget import TargetLatency
from pf_ray.ops.macs_budget import macs_table
from pf_ray.ops.pruning import kept_channel_count
from pf_ray.strict import from_dict
from tests.tiny import SHAPE, tiny_data, tiny_resnet20

# ResNet-20's removable blocks (identity shortcuts; layer2.0 and layer3.0 downsample) and its 12 groups' sizes
BLOCKS = ("layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2")
SIZES = (16,) * 4 + (32,) * 4 + (64,) * 4
LOW = 0.1  # min_keep_ratio's default: a removed block's projected value


def _space(target_macs_ratio: float, *, depth: bool = True, round_to: int = 4):
    learner = ChannelPruning(ChannelPruningConfig(depth=depth, round_to=round_to))
    return learner, learner.search_space(tiny_resnet20(), SHAPE, SearchConfig(target_macs_ratio=target_macs_ratio))


def _vector(ratios: Sequence[float], removed: Collection[str] = ()) -> tuple[float, ...]:
    return join_values(ratios, BLOCKS, tuple(removed), LOW)


# ---- config


@pytest.mark.parametrize("options, message", [
    ({"depth": True, "mode": "list", "layer_keep_ratios": [0.5] * 12},
     r"learner\.options\.depth: got true with mode 'list'; depth is searched in mode 'auto'"),
    ({"removed_blocks": ["layer1.1"], "depth": False},
     r"learner\.options\.removed_blocks: got \['layer1\.1'\] with mode 'auto' and depth false"),
    ({"removed_blocks": "layer1.1", "mode": "uniform"}, r"learner\.options\.removed_blocks"),
])
def test_depth_options_are_checked_where_the_config_is_read(options, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ChannelPruningConfig, options, path="learner.options")


def test_a_block_name_that_is_not_removable_names_the_field_the_value_and_the_allowed_names():
    config = from_dict(ChannelPruningConfig, {"mode": "uniform", "removed_blocks": ["layer1.1", "layer2.0"]},
                       path="learner.options")
    assert config.removed_blocks == ("layer1.1", "layer2.0")
    with pytest.raises(ConfigError, match=r"removed_blocks: got 'layer2\.0', not a removable residual block of this "
                                          r"model; removable: layer1\.0, layer1\.1, .*layer3\.2$"):
        ChannelPruning(config).check(tiny_resnet20(), SHAPE)


def test_depth_on_a_model_without_removable_blocks_says_so():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    learner = ChannelPruning(ChannelPruningConfig(depth=True))
    message = r"depth: got true, but the model \(Sequential\) has no removable residual block"
    with pytest.raises(ConfigError, match=message):
        learner.check(plain, SHAPE)  # the run's preflight
    with pytest.raises(ConfigError, match=message):
        learner.search_space(plain, SHAPE, SearchConfig())


# ---- the space


def test_the_space_has_the_groups_then_one_dimension_per_removable_block():
    learner, space = _space(0.3)
    assert space.names[:12] == tuple(macs_table(tiny_resnet20(), SHAPE).names)
    assert space.names[12:] == dimension_names(BLOCKS) == tuple(f"block:{b}" for b in BLOCKS)
    assert len(space.features) == len(space.names) == 19  # DDPG: a state row per dimension
    # a block's row: index, trunk channels (twice), kernel 0, stride 1, positions, its two convs' MACs
    assert space.features[12] == (12.0, 16.0, 16.0, 0.0, 1.0, 256.0, 2 * 256 * 9 * 16 * 16)
    assert (space.low, space.high) == (LOW, 1.0)
    # the values fill two fields: keep ratios (one per group) and the removed blocks' names
    config = space.apply(learner.config, _vector([1.0] * 12, ["layer1.1", "layer3.2"]))
    assert len(config.layer_keep_ratios) == 12 and config.removed_blocks == ("layer1.1", "layer3.2")
    # a trial records its keep ratios and its model's removed blocks: the space's vector again
    assert space.recorded(config.layer_keep_ratios, ["layer1.1", "layer3.2"]) == list(
        _vector(config.layer_keep_ratios, ["layer1.1", "layer3.2"]))
    # without depth, the space is as it was
    _, width = _space(0.3, depth=False)
    assert width.names == space.names[:12] and width.split is None and len(width.features) == 12


def test_a_block_value_below_the_middle_of_the_box_removes_it():
    ratios, removed = split_values([0.5, 0.5, 0.54, 0.56], ["a", "b"], low=0.1)  # middle: 0.55
    assert ratios == (0.5, 0.5) and removed == ("a",)


# ---- projection


def test_projection_keeps_the_proposals_blocks_meets_the_budget_and_is_idempotent():
    _, space = _space(0.3)
    budget = space.budget
    proposal = _vector([1.0] * 12, ["layer1.1", "layer3.1"])
    projected = space.project(proposal)
    assert budget.removed(projected) == ("layer1.1", "layer3.1")
    assert projected[12:] == (1.0, LOW, 1.0, 1.0, 1.0, LOW, 1.0)  # block values said plainly
    assert 0.27 < budget.cost(projected) <= 0.3  # spent, not wasted
    kept = budget.kept(projected)
    assert budget.cost(projected) == pytest.approx(
        joint_macs(macs_table(tiny_resnet20(), SHAPE), budget.removed(projected), kept)
        / macs_table(tiny_resnet20(), SHAPE).macs_of_counts(SIZES))
    again = space.project(projected)
    assert again[12:] == projected[12:] and budget.kept(again) == kept


def test_a_target_out_of_reach_by_width_is_reached_by_removing_blocks():
    # every group at keep ratio 0.1 (round_to 4) leaves 0.033 of ResNet-20's MACs: 0.02 needs blocks removed
    _, width = _space(0.02, depth=False)
    with pytest.raises(ConfigError, match=r"target_macs_ratio: got 0\.02; the smallest reachable .* is 0\.033"):
        width.project([1.0] * 12)
    _, space = _space(0.02)
    proposal = _vector([1.0] * 12)[:12] + (1.0, 0.2, 0.9, 0.3, 1.0, 0.8, 1.0)  # layer1.1 and layer2.1 proposed out
    projected = space.project(proposal)
    removed = space.budget.removed(projected)
    assert {"layer1.1", "layer2.1"} <= set(removed)  # the proposal's own removals are kept
    assert removed == tuple(b for b in BLOCKS if b in removed)  # in forward order
    # more were removed, lowest value first (ties: the later block first), and no more than needed
    extra = set(removed) - {"layer1.1", "layer2.1"}
    order = ["layer3.1", "layer1.2", "layer3.2", "layer2.2", "layer1.0"]
    assert extra and extra == set(order[: len(extra)])
    assert space.budget.cost(projected) <= 0.02
    assert space.project(projected)[12:] == projected[12:]
    # below even every block removed at the floor: the error says what is reachable
    _, hopeless = _space(0.001)
    with pytest.raises(ConfigError, match=r"and all 7 removable blocks removed is 0\.00"):
        hopeless.project([1.0] * 19)


def test_ddpg_searches_the_depth_space_within_the_budget():
    from search_algs.ddpg.searcher import DDPGSearcher

    _, space = _space(0.3)
    searcher = DDPGSearcher(space, metric="accuracy", mode="max", seed=0, num_warmup=2)
    for i in range(4):
        values = space.values_from(searcher.suggest(f"t{i}"))
        assert len(values) == 19 and space.budget.cost(values) <= 0.3 + 1e-9
        assert space.budget.cost(space.project(values)) <= 0.3
        searcher.on_trial_complete(f"t{i}", {"accuracy": 0.5 + 0.01 * i, "epoch": 1})


# ---- prepare, checkpoint


def _candidate(removed: Sequence[str]) -> tuple[ChannelPruning, nn.Module]:
    ratios = [0.25, 0.5, 0.75, 1.0, 0.5, 0.5, 0.25, 0.75, 0.5, 0.25, 1.0, 0.5]
    learner = ChannelPruning(ChannelPruningConfig(mode="list", layer_keep_ratios=tuple(ratios), round_to=1,
                                                  criterion="l1", removed_blocks=tuple(removed)))
    return learner, learner.prepare(tiny_resnet20(), tiny_data())


def test_prepare_removes_the_blocks_then_prunes_what_remains_to_the_joint_macs():
    removed = ("layer1.1", "layer3.2")
    learner, model = _candidate(removed)
    assert removed_blocks(model) == list(removed)
    table = macs_table(tiny_resnet20(), SHAPE)
    kept = [kept_channel_count(n, r, 1) for n, r in zip(table.sizes, learner.config.layer_keep_ratios, strict=True)]
    assert model_stats(model, SHAPE).macs == joint_macs(table, removed, kept)
    # the groups that went with the blocks are not reported; the others keep their counts, by name
    assert "layer1.1.conv1" not in learner.kept_channels and "layer3.2.conv1" not in learner.kept_channels
    assert learner.kept_channels == {name: k for name, k in zip(table.names, kept, strict=True)
                                     if name not in ("layer1.1.conv1", "layer3.2.conv1")}
    with torch.no_grad():
        assert torch.isfinite(model.eval()(tiny_data().train.tensors[0])).all()


def test_a_depth_and_width_candidate_round_trips_through_a_checkpoint(tmp_path):
    _, model = _candidate(("layer1.0", "layer2.2"))
    model.eval()
    path = save_checkpoint(tmp_path / "model.pt", model, model_config=ModelConfig("resnet20"), input_shape=SHAPE,
                           num_classes=10)
    loaded, info = load_checkpoint(path)
    assert info.removed_blocks == ("layer1.0", "layer2.2")
    inputs = tiny_data().train.tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))


# ---- the knapsack start


def test_the_knapsack_start_with_depth_meets_a_budget_width_alone_cannot():
    learner, space = _space(0.02)
    start = learner.starting_proposal(tiny_resnet20(), tiny_data(), space)
    assert len(start) == 19 and all(space.low <= v <= space.high for v in start)
    assert space.budget.removed(start)  # 0.02 needs blocks gone
    assert space.budget.cost(start) <= 0.02
    assert space.budget.removed(space.project(start)) == space.budget.removed(start)  # a trial keeps its blocks


def test_the_knapsack_start_with_depth_meets_a_loose_budget():
    learner, space = _space(0.5)
    start = learner.starting_proposal(tiny_resnet20(), tiny_data(), space)
    assert 0.4 < space.budget.cost(start) <= 0.5


# ---- latency


@dataclass(frozen=True)
class DepthTable:
    """1 ms of overhead, 0.002 ms per channel kept and 0.3 ms per block left in: 1 + 0.002 * 448 + 2.1 = 3.996 ms
    unpruned; every group at 0.1 (round_to 1: 2 + 2 + ... channels) still pays the blocks' 2.1 ms."""

    sizes: tuple[int, ...] = SIZES
    blocks: tuple[str, ...] = BLOCKS

    def predict(self, kept: Sequence[int], removed: Collection[str] = ()) -> float:
        return 1.0 + 0.002 * sum(kept) + 0.3 * (len(self.blocks) - len(set(removed)))


def test_a_latency_budget_with_depth_asks_for_a_depth_table_and_removes_blocks_to_reach_its_target():
    asked = []

    def source(*, depth: bool = False) -> TargetLatency:
        asked.append(depth)
        return TargetLatency(DepthTable(), reference_ms=4.0, name="a synthetic runtime", step=1)

    learner = ChannelPruning(ChannelPruningConfig(depth=True, round_to=1))
    search = SearchConfig(budget=Budget.LATENCY, target_speedup=1.5)  # 2.67 ms: width alone reaches 3.2 at best
    space = learner.search_space(tiny_resnet20(), SHAPE, search, source)
    assert asked == [True]
    projected = space.project([1.0] * 19)
    assert space.budget.removed(projected)
    assert space.budget.predicted_ms(projected) <= 4.0 / 1.5
    width_only = ChannelPruning(ChannelPruningConfig(round_to=1, depth=False))
    with pytest.raises(ConfigError, match=r"target_speedup: got 1\.5; the fastest reachable on a synthetic runtime"):
        width_only.search_space(tiny_resnet20(), SHAPE, search, source).project([1.0] * 12)


def test_a_latency_table_without_depth_is_refused_for_a_depth_search():
    @dataclass(frozen=True)
    class WidthTable:
        sizes: tuple[int, ...] = SIZES

        def predict(self, kept: Sequence[int], removed: Collection[str] = ()) -> float:
            return 1.0 + 0.002 * sum(kept)

    source = lambda *, depth=False: TargetLatency(WidthTable(), 2.0, "a width table")  # noqa: E731
    learner = ChannelPruning(ChannelPruningConfig(depth=True, round_to=1))
    with pytest.raises(ConfigError, match=r"depth: the latency table of a width table predicts removed blocks \[\]"):
        learner.search_space(tiny_resnet20(), SHAPE, SearchConfig(budget=Budget.LATENCY, target_speedup=1.2), source)


def test_the_table_source_builds_a_depth_plan_when_asked(monkeypatch):
    from pf_ray.latency import TablePlan
    from pf_ray.launch import target

    plans = []
    monkeypatch.setattr(target, "TABLE_PLAN", TablePlan(num_random=3))
    monkeypatch.setattr(target, "latency_table", lambda *a, plan, **k: plans.append(plan) or "table")
    monkeypatch.setattr(target, "as_target_latency", lambda table: TargetLatency(DepthTable(), 4.0, "x"))
    monkeypatch.setattr(target, "cpu_summary", lambda: {"model_name": "cpu", "kernel_flags": []})
    source = target.TableSource(tiny_resnet20(), SHAPE, TargetConfig(), log=lambda line: None)
    source(depth=True)
    assert plans == [TablePlan(num_random=3, depth=True)]


def test_the_end_of_run_measurement_times_each_candidate_with_its_removed_blocks(tmp_path, monkeypatch):
    from pf_ray.config import ExperimentConfig, Precision
    from pf_ray.latency import pruned_copy
    from pf_ray.latency.measure import Timing, export_artifact
    from pf_ray.launch import target
    from pf_ray.metrics import LAYER_VALUES, TARGET_MS

    monkeypatch.setattr(target, "TIMING", Timing(warmup=1, repeats=3, rounds=1))
    built = []

    def spy(model, shape, kept, **options):
        built.append(options["removed"])
        return pruned_copy(model, shape, kept, **options)

    monkeypatch.setattr(target, "pruned_copy", spy)
    model = tiny_resnet20().eval()
    _, space = _space(0.5)
    int8 = TargetConfig()
    files = {("baseline", "onnx"): export_artifact(model, SHAPE, TargetConfig(precision=Precision.FP32), tmp_path,
                                                   stem="baseline"),
             ("baseline", "onnx_int8"): export_artifact(model, SHAPE, int8, tmp_path, stem="baseline"),
             ("compressed", "onnx_int8"): export_artifact(pruned_copy(model, SHAPE, SIZES, removed=("layer1.1",)),
                                                          SHAPE, int8, tmp_path, stem="compressed")}
    reports = [{"model": m, "format": f, "path": str(p)} for (m, f), p in files.items()]
    trials = [{"trial_id": "width", LAYER_VALUES: list(_vector([0.5] * 12))},
              {"trial_id": "depth", LAYER_VALUES: list(_vector([0.5] * 12, ["layer1.1", "layer3.1"]))}]
    record = target.measure_on_target(ExperimentConfig(), reports, model, SHAPE, space=space, trials=trials,
                                      chosen_values=trials[1][LAYER_VALUES], latency=None, log=lambda line: None)
    assert record["measured"] and record["candidates_measured"] == 2
    assert built == [(), ("layer1.1", "layer3.1")]
    assert all(trial[TARGET_MS] > 0 for trial in trials)


def test_the_default_depth_auto_searches_blocks_under_a_latency_budget_and_its_candidates_are_valid_configs():
    """``depth: auto`` (the default): a latency budget asks for a depth table and searches blocks; every candidate
    config the space makes (removed blocks filled in) is a config the learner accepts, as a trial parses it."""
    from pf_ray.spec import parse_learner_config
    from pf_ray.strict import to_dict

    asked = []

    def source(*, depth: bool = False) -> TargetLatency:
        asked.append(depth)
        return TargetLatency(DepthTable(), reference_ms=4.0, name="a synthetic runtime", step=1)

    learner = ChannelPruning(ChannelPruningConfig(round_to=1))
    assert learner.config.depth == "auto"
    space = learner.search_space(tiny_resnet20(), SHAPE, SearchConfig(budget=Budget.LATENCY, target_speedup=1.5),
                                 source)
    assert asked == [True] and len(space.names) == 19
    candidate = space.apply(learner.config, [1.0] * 19)  # unreachable by width: blocks removed by the projection
    assert candidate.removed_blocks and candidate.depth == "auto"
    assert parse_learner_config("channel_pruning", to_dict(candidate), path="learner_config") == candidate
    macs = learner.search_space(tiny_resnet20(), SHAPE, SearchConfig(budget=Budget.MACS, target_macs_ratio=0.5),
                                source)
    assert len(macs.names) == 12 and asked == [True]  # under a MACs budget, auto searches widths only
