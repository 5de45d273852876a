"""The latency table's fit, on a synthetic runtime with a known structure: recovered within 1-2%, composed without
a model, carried as plain data; and where latency steps."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from pf_ray.errors import ConfigError
from pf_ray.latency import LatencyTable, TablePlan, fit_table
from pf_ray.latency.build import _random
from pf_ray.latency.features import FeatureSet, Layout
from pf_ray.latency.steps import efficient_counts, step_from_sweeps
from pf_ray.ops.channel_groups import LayerMacs
from tests.latency.conftest import SyntheticRuntime

PLAN = TablePlan(num_random=160, num_holdout=60)


@pytest.fixture(scope="module")
def fitted(resnet_table):
    runtime = SyntheticRuntime(resnet_table)
    return runtime, fit_table(resnet_table, runtime, PLAN)


def test_the_fit_recovers_a_structured_runtime(fitted, resnet_table) -> None:
    runtime, table = fitted
    assert table.median_error < 0.01 and table.max_error < 0.03  # held out: never seen by the fit
    rng = random.Random(7)  # fresh random candidates, against the runtime's exact (noise-free) latency
    fresh = np.array([_random(tuple(resnet_table.sizes), rng, PLAN) for _ in range(300)])
    errors = np.abs(table.predict_many(fresh) - runtime.exact(fresh)) / runtime.exact(fresh)
    assert np.median(errors) < 0.01 and errors.max() < 0.02
    assert table.predict(resnet_table.sizes) == pytest.approx(float(runtime.exact([resnet_table.sizes])[0]), rel=0.01)
    # the simplest model (MACs rounded up to a block, no misalignment terms) cannot describe this runtime
    assert table.notes["baseline_model"]["median_error"] > 5 * table.median_error
    assert len(table.training) + len(table.holdout) > PLAN.num_random and runtime.calls >= 4


def test_predict_needs_no_model_and_the_table_is_plain_data(fitted) -> None:
    _, table = fitted

    class NoTorch(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, nn.Module | torch.Tensor):
                raise AssertionError(f"the table holds a {type(obj).__name__}")
            return NotImplemented

    import io

    NoTorch(io.BytesIO()).dump(table)
    copy = pickle.loads(pickle.dumps(table))
    from_json = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    kept = [max(1, n // 2) for n in table.sizes]
    assert copy.predict(kept) == from_json.predict(kept) == table.predict(kept) > 0
    assert from_json.holdout == table.holdout and from_json.features == table.features
    assert table.predict_ratios([0.5] * len(table.sizes), round_to=1) == pytest.approx(table.predict(kept))
    assert table.speedup(table.sizes) == pytest.approx(table.reference_ms / table.predict(table.sizes))


def test_predict_checks_its_input(fitted) -> None:
    _, table = fitted
    with pytest.raises(ConfigError, match=f"got 2 counts; expected {len(table.sizes)}"):
        table.predict([1, 2])
    with pytest.raises(ConfigError, match=r"kept\[0\] \(conv1\): got 0; allowed range is \[1, 16\]"):
        table.predict([0, *table.sizes[1:]])


def test_features_match_the_macs_table(resnet_table) -> None:
    """``work`` with block 1 is each layer's exact kept fraction of its MACs (LayerMacs.macs)."""
    layout = Layout.of(resnet_table.layers, resnet_table.sizes)
    kept = [max(1, n // 4) for n in resnet_table.sizes]
    work = layout.design([kept], FeatureSet(block=1, aligns=(), activations=False))[0, 1:]
    full = [layer.macs(resnet_table.sizes, resnet_table.sizes) for layer in resnet_table.layers]
    exact = [layer.macs(kept, resnet_table.sizes) / f for layer, f in zip(resnet_table.layers, full, strict=True)]
    assert work == pytest.approx(exact)


def test_depthwise_work_follows_the_output_channels() -> None:
    depthwise = LayerMacs("dw", positions=4, kernel=9, in_channels=16, out_channels=16, groups=16,
                          in_members=[(0, 16)], out_members=[(0, 16)])
    layout = Layout.of([depthwise], [16])
    assert layout.design([[8]], FeatureSet(block=1, activations=False))[0, 1] == pytest.approx(0.5)
    assert layout.design([[9]], FeatureSet(block=8, activations=False))[0, 1] == pytest.approx(1.0)


def _sweep(block: int, size: int = 64, noise: float = 0.0, seed: int = 0) -> dict[int, float]:
    rng = np.random.default_rng(seed)
    return {c: (1.0 + 0.05 * -(-c // block)) * (1 + noise * rng.standard_normal()) for c in range(1, size + 1)}


@pytest.mark.parametrize("block", [4, 8, 16])
def test_the_step_is_where_latency_steps(block) -> None:
    sweeps = {"a": _sweep(block, noise=0.001), "b": _sweep(block, size=32, noise=0.001, seed=1)}
    step, evidence = step_from_sweeps(sweeps, {"a": 64, "b": 32})
    assert step == block, evidence
    assert all(record["shape"] == "steps" for record in evidence["sweeps"].values())


def test_sweeps_without_steps_are_no_evidence() -> None:
    smooth = {c: 1.0 + 0.05 * c for c in range(1, 17)}  # every channel counts
    flat = {c: 1.0 for c in range(1, 17)}  # no channel counts
    assert efficient_counts(flat, 0.01) == [16] and efficient_counts(smooth, 0.001) == list(range(1, 17))
    step, evidence = step_from_sweeps({"smooth": smooth, "flat": flat, "stepped": _sweep(16)},
                                      {"smooth": 16, "flat": 16, "stepped": 64})
    assert step == 16 and evidence["sweeps"]["smooth"]["shape"] == "smooth"
    assert evidence["sweeps"]["flat"]["shape"] == "flat"
    assert step_from_sweeps({"flat": flat}, {"flat": 16})[0] == 1


def test_the_rounding_step_is_the_grid_that_reaches_the_lowest_latency(fitted) -> None:
    """A runtime that computes 16-channel blocks and pays 0.5 ms when a group's count leaves them (unless whole):
    the sweeps' step said 4, but on 4's and 8's grids the fastest candidates are misaligned, so 16 is chosen; a
    runtime with no penalty has every grid equally fast at its floor, so the finest, the step itself, stays."""
    from dataclasses import replace

    _, table = fitted

    class Blocks16(LatencyTable):
        def predict_many(self, kept):
            kept, sizes = np.atleast_2d(np.asarray(kept, float)), np.asarray(self.sizes)
            off = ((kept % 16 != 0) & (kept < sizes)).any(axis=1)
            return 1.0 + 0.001 * (np.ceil(kept / 16) * 16).sum(axis=1) + 0.5 * off

    class NoPenalty(Blocks16):
        def predict_many(self, kept):
            return 1.0 + 0.001 * (np.ceil(np.atleast_2d(np.asarray(kept, float)) / 16) * 16).sum(axis=1)

    fields = {name: getattr(table, name) for name in table.__dataclass_fields__}
    assert Blocks16(**{**fields, "step": 4}).rounding_step() == 16
    assert Blocks16(**{**fields, "step": 16}).rounding_step() == 16
    assert NoPenalty(**{**fields, "step": 4}).rounding_step() == 4
    assert replace(table, step=2).rounding_step() % 2 == 0  # always a multiple of the measured step


def test_every_candidate_keeps_a_grouped_convolutions_groups_equal(resnet_table) -> None:
    """A group whose channels are the outputs of a grouped convolution (groups=2) can only keep even counts: every
    candidate the table measures rounds that group's count to a multiple of 2 (an odd count cannot be pruned)."""
    from tests.user_graphs import GROUPED, SHAPE as USER_SHAPE, shuffle_user_net
    from pf_ray.ops.macs_budget import macs_table
    from pf_ray.ops.pruning import group_multiples

    user = shuffle_user_net()
    names = macs_table(user, USER_SHAPE).names
    multiples = dict(zip(names, group_multiples(user, USER_SHAPE), strict=True))
    assert {name: multiples[name] for name in GROUPED} == {name: 2 for name in GROUPED}
    assert {m for name, m in multiples.items() if name not in GROUPED} == {1}

    steps = tuple(2 if g % 3 == 0 else 1 for g in range(len(resnet_table.sizes)))
    asked: list[tuple[int, ...]] = []
    runtime = SyntheticRuntime(resnet_table)

    def measure(vectors):
        asked.extend(tuple(v) for v in vectors)
        return runtime(vectors)

    fit_table(resnet_table, measure, TablePlan(num_random=40, num_holdout=10), multiples=steps)
    odd = [(g, v[g]) for v in asked for g, m in enumerate(steps) if m == 2 and v[g] % 2]
    assert asked and not odd
    assert any(v[g] < n for v in asked for g, n in enumerate(resnet_table.sizes) if steps[g] == 2)
