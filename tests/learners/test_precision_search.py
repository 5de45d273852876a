"""Precision as a searched dimension of channel pruning on an INT8 target (``learner.options.mixed_precision``): the
config's checks, the space (groups, blocks, then one value per conv/linear layer), projection onto a latency budget
that keeps the proposal's FP32 layers and quantizes them back where the target needs it, the knapsack start (all
INT8), the fields a candidate gets, and the table source's refusal of an FP32 target."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import pytest

from pf_ray.config import Budget, Precision, Scoring, SearchConfig, TargetConfig
from pf_ray.errors import ConfigError
from pf_ray.learners.channel_pruning import ChannelPruning, ChannelPruningConfig
from pf_ray.ops.latency_budget import LatencyBudget, TargetLatency
from pf_ray.ops.macs_budget import macs_table
from pf_ray.ops.precision_space import dimension_names, is_fp32, join_tail, split_tail
from pf_ray.spec import parse_learner_config
from pf_ray.strict import from_dict, to_dict
from tests.tiny import SHAPE, tiny_data, tiny_resnet20

SIZES = (16,) * 4 + (32,) * 4 + (64,) * 4  # ResNet-20's 12 groups
LAYERS = tuple(macs_table(tiny_resnet20(), SHAPE).layer_names())  # its 21 convs and the fc, forward order
LOW = 0.1


@dataclass(frozen=True)
class PrecisionTable:
    """1 ms of overhead, 0.002 ms per channel kept, 0.1 ms more per layer left in FP32: 1.896 ms unpruned and INT8."""

    sizes: tuple[int, ...] = SIZES
    precision_layers: tuple[str, ...] = LAYERS

    def predict(self, kept: Sequence[int], removed: Collection[str] = (), fp32: Collection[str] = ()) -> float:
        return 1.0 + 0.002 * sum(kept) + 0.1 * len(set(fp32))


def _source(asked: list | None = None, table=None):
    def source(*, depth: bool = False, precision: bool = False) -> TargetLatency:
        if asked is not None:
            asked.append((depth, precision))
        return TargetLatency(table or PrecisionTable(), reference_ms=4.0, name="a synthetic runtime", step=1)
    return source


def _space(speedup: float = 3.0, **options):
    learner = ChannelPruning(ChannelPruningConfig(mixed_precision=True, depth=False, round_to=1, **options))
    search = SearchConfig(budget=Budget.LATENCY, target_speedup=speedup)
    return learner, learner.search_space(tiny_resnet20(), SHAPE, search, _source())


def _vector(ratios: Sequence[float], fp32: Collection[str] = ()) -> tuple[float, ...]:
    return join_tail(ratios, LAYERS, tuple(fp32), LOW)


# ---- config


@pytest.mark.parametrize("options, message", [
    ({"mixed_precision": True, "mode": "list", "layer_keep_ratios": [0.5] * 12},
     r"learner\.options\.mixed_precision: got true with mode 'list'; precision is searched in mode 'auto'"),
    ({"fp32_layers": ["conv1"]},
     r"learner\.options\.fp32_layers: got \['conv1'\] with mode 'auto' and mixed_precision false"),
])
def test_precision_options_are_checked_where_the_config_is_read(options, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ChannelPruningConfig, options, path="learner.options")


def test_an_fp32_layer_that_is_not_a_layer_names_the_field_the_value_and_the_layers():
    learner = ChannelPruning(ChannelPruningConfig(mode="uniform", fp32_layers=("conv1", "layer9.conv")))
    with pytest.raises(ConfigError, match=r"fp32_layers: got 'layer9\.conv', not a conv/linear layer of this model; "
                                          r"its layers: conv1, layer1\.0\.conv1"):
        learner.check(tiny_resnet20(), SHAPE)
    ChannelPruning(ChannelPruningConfig(mode="uniform", fp32_layers=("conv1", "fc"))).check(tiny_resnet20(), SHAPE)


@pytest.mark.parametrize("search, message", [
    (SearchConfig(budget=Budget.MACS, target_macs_ratio=0.5), r"mixed_precision: true needs search\.budget latency"),
    (SearchConfig(budget=Budget.LATENCY, target_speedup=2.0, scoring=Scoring.PROXY),
     r"mixed_precision: true needs search\.scoring fine_tune"),
])
def test_a_precision_search_needs_a_latency_budget_and_fine_tuned_trials(search, message):
    learner = ChannelPruning(ChannelPruningConfig(mixed_precision=True, depth=False))
    with pytest.raises(ConfigError, match=message):
        learner.search_space(tiny_resnet20(), SHAPE, search, _source())


def test_a_latency_table_without_precision_is_refused_for_a_precision_search():
    @dataclass(frozen=True)
    class WidthTable:
        sizes: tuple[int, ...] = SIZES

        def predict(self, kept: Sequence[int], removed: Collection[str] = ()) -> float:
            return 1.0 + 0.002 * sum(kept)

    learner = ChannelPruning(ChannelPruningConfig(mixed_precision=True, depth=False))
    with pytest.raises(ConfigError, match=r"mixed_precision: the latency table of a synthetic runtime predicts FP32 "
                                          r"layers \[\]"):
        learner.search_space(tiny_resnet20(), SHAPE, SearchConfig(budget=Budget.LATENCY, target_speedup=1.2),
                             _source(table=WidthTable()))


def test_the_table_source_refuses_precision_on_an_fp32_target_and_asks_for_a_precision_plan(monkeypatch):
    from pf_ray.latency import TablePlan
    from pf_ray.launch import target

    plans = []
    monkeypatch.setattr(target, "TABLE_PLAN", TablePlan(num_random=3))
    monkeypatch.setattr(target, "latency_table", lambda *a, plan, **k: plans.append(plan) or "table")
    monkeypatch.setattr(target, "as_target_latency", lambda table: TargetLatency(PrecisionTable(), 4.0, "x"))
    monkeypatch.setattr(target, "cpu_summary", lambda: {"model_name": "cpu", "kernel_flags": []})
    fp32 = target.TableSource(tiny_resnet20(), SHAPE, TargetConfig(precision=Precision.FP32), log=lambda line: None)
    with pytest.raises(ConfigError, match=r"mixed_precision: true needs an INT8 deployment target.*got "
                                          r"target\.precision fp32"):
        fp32(precision=True)
    target.TableSource(tiny_resnet20(), SHAPE, TargetConfig(), log=lambda line: None)(precision=True)
    assert plans == [TablePlan(num_random=3, precision=True)]


# ---- the space


def test_the_space_has_the_groups_then_one_dimension_per_layer_and_fills_fp32_layers():
    asked = []
    learner = ChannelPruning(ChannelPruningConfig(mixed_precision=True, depth=False, round_to=1))
    space = learner.search_space(tiny_resnet20(), SHAPE, SearchConfig(budget=Budget.LATENCY, target_speedup=1.5),
                                 _source(asked))
    assert asked == [(False, True)]
    assert len(LAYERS) == 22 and LAYERS[0] == "conv1" and LAYERS[-1] == "fc"
    assert space.names[12:] == dimension_names(LAYERS) == tuple(f"fp32:{name}" for name in LAYERS)
    assert len(space.features) == len(space.names) == 34 and space.features[12][0] == 12.0  # DDPG's state rows
    config = space.apply(learner.config, _vector([1.0] * 12, ["conv1", "fc"]))
    assert config.fp32_layers == ("conv1", "fc") and config.removed_blocks == ()
    # what a trial records (keep ratios and FP32 layers) is the space's vector again
    assert space.recorded(config.layer_keep_ratios, (), config.fp32_layers) == list(
        _vector(config.layer_keep_ratios, ["conv1", "fc"]))
    # every candidate config is one the learner accepts, as a trial parses it
    assert parse_learner_config("channel_pruning", to_dict(config), path="learner_config") == config


def test_a_layer_value_below_the_middle_of_the_box_keeps_it_fp32():
    assert is_fp32(0.54, LOW) and not is_fp32(0.56, LOW)  # middle: 0.55
    head, fp32 = split_tail([0.5, 0.5, 0.54, 0.56], 2, ["a", "b"], LOW)
    assert head == (0.5, 0.5) and fp32 == ("a",)
    assert split_tail([0.5, 0.5], 2, ["a", "b"], LOW) == ((0.5, 0.5), ())  # no tail: all INT8
    with pytest.raises(ValueError, match="expected 2"):
        split_tail([0.5, 0.5, 0.1], 2, ["a", "b"], LOW)


# ---- projection onto the latency budget (PrecisionTable: hand-computed)


def test_projection_keeps_the_proposals_fp32_layers_at_a_latency_that_counts_them():
    # target 2.0x: 2.0 ms. With conv1 and fc FP32 (0.2 ms) the channels get 0.8 ms: 400 of 448 channels at most
    _, space = _space(2.0)
    budget = space.budget
    projected = space.project(_vector([1.0] * 12, ["conv1", "fc"]))
    assert budget.fp32(projected) == ("conv1", "fc")
    assert projected[12:] == _vector([], ["conv1", "fc"])  # said plainly: LOW for FP32, 1 for INT8
    assert 390 <= sum(budget.kept(projected)) <= 400
    assert budget.predicted_ms(projected) <= 2.0
    int8 = space.project(_vector([1.0] * 12))
    assert budget.fp32(int8) == () and 440 <= sum(budget.kept(int8)) <= 448  # 0.2 ms more for the channels


def test_fp32_layers_are_quantized_back_nearest_the_threshold_first_when_the_target_needs_it():
    # target 3.2x: 1.25 ms. Every group at 0.1 keeps 2+2+2+2+3+3+3+3+6+6+6+6 = 44 channels: 1.088 ms, so at most one
    # FP32 layer fits (1.188 ms); of the proposal's three, the two whose values are nearest the threshold go back
    _, space = _space(3.2)
    proposal = list(_vector([1.0] * 12, ["conv1", "layer2.0.conv1", "fc"]))
    proposal[12 + LAYERS.index("conv1")] = 0.50
    proposal[12 + LAYERS.index("layer2.0.conv1")] = 0.20
    proposal[12 + LAYERS.index("fc")] = 0.30
    projected = space.project(proposal)
    assert space.budget.fp32(projected) == ("layer2.0.conv1",)
    assert space.budget.predicted_ms(projected) <= 1.25
    with pytest.raises(ConfigError, match=r"target_speedup: got 4; the fastest reachable"):
        _space(4.0)[1].project(proposal)  # 1.0 ms: out of reach even all INT8


def test_a_budget_without_precision_layers_reads_vectors_as_before():
    budget = LatencyBudget(0.5, PrecisionTable(), 4.0, 1, LOW)
    assert budget.fp32([1.0] * 12) == () and budget.predicted_ms([1.0] * 12) == pytest.approx(1.896)


# ---- the learner


def test_the_knapsack_start_is_all_int8_within_the_budget():
    learner, space = _space(2.5)
    start = learner.starting_proposal(tiny_resnet20(), tiny_data(), space)
    assert len(start) == 34 and start[12:] == (1.0,) * 22
    assert space.budget.fp32(start) == () and space.budget.predicted_ms(start) <= 4.0 / 2.5


def test_fp32_layers_inside_removed_blocks_are_not_exported_and_trials_are_scored_on_int8():
    learner = ChannelPruning(ChannelPruningConfig(mode="uniform", removed_blocks=("layer1.1",),
                                                  fp32_layers=("conv1", "layer1.1.conv2", "fc")))
    assert learner.fp32_layers() == ("conv1", "fc")
    assert not learner.scores_int8()
    assert ChannelPruning(ChannelPruningConfig(mixed_precision=True)).scores_int8()
