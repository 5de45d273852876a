"""Sparsity maths (pf_ray.ops.sparsity): the pruning schedule, magnitude masks, per-layer allocation under the
budget, on answers worked out by hand in the comments."""

from __future__ import annotations

import pytest
import torch

from pf_ray.errors import ConfigError
from pf_ray.ops.sparsity import (
    KeptWeightsBudget,
    PruningSchedule,
    density,
    heuristic_sparsities,
    magnitude_mask,
    num_pruned,
    project_sparsities,
)

# ---- schedule


def test_schedule_follows_the_cubic_ramp():
    schedule = PruningSchedule.from_fractions(1000, 0.1, 0.5, exponent=3.0, update_every=100)
    assert (schedule.begin_step, schedule.end_step) == (100, 500)
    assert schedule.sparsity(0, 0.8) == 0.0
    assert schedule.sparsity(100, 0.8) == 0.0
    assert schedule.sparsity(200, 0.8) == pytest.approx(0.8 * (1 - 0.75**3))  # = 0.4625
    assert schedule.sparsity(300, 0.8) == pytest.approx(0.7)  # 0.8 * (1 - 0.5**3)
    assert schedule.sparsity(500, 0.8) == pytest.approx(0.8)
    assert schedule.sparsity(900, 0.8) == pytest.approx(0.8)
    assert [s for s in range(0, 1001) if schedule.update_due(s)] == [100, 200, 300, 400, 500]
    # t_e not on the update grid: masks still reach the final sparsity at t_e itself
    late = PruningSchedule.from_fractions(1000, 0.1, 0.45, update_every=100)
    assert [s for s in range(0, 1001) if late.update_due(s)] == [100, 200, 300, 400, 450]


# ---- masks


def test_magnitude_mask_zeros_exactly_the_smallest():
    weight = torch.tensor([[0.5, -0.1, 0.3], [-0.2, 0.05, 0.4]])
    # 6 weights at sparsity 0.5 -> 3 zeros: |0.05|, |-0.1|, |-0.2|
    assert magnitude_mask(weight, 0.5).tolist() == [[True, False, True], [False, False, True]]
    assert magnitude_mask(weight, 0.0).all()
    # ties: |1| three times, 2 zeros -> the first two positions go
    assert magnitude_mask(torch.tensor([1.0, -1.0, 1.0, 2.0]), 0.5).tolist() == [False, False, True, True]
    assert num_pruned(10, 0.3) == 3 and num_pruned(800, 0.9) == 720


# ---- per-layer allocation under the budget


def test_heuristic_is_proportional_to_log_size():
    # ln(10000) = 2 ln(100): s_2 = 2 s_1 and 100 s_1 + 10000 (2 s_1) = 0.5 * 10100 -> s_1 = 5050 / 20100
    values = heuristic_sparsities([100, 10000], 0.5, 0.98)
    assert values == pytest.approx((5050 / 20100, 10100 / 20100), abs=1e-12)
    assert density([100, 10000], values) == pytest.approx(0.5, abs=1e-12)


def test_heuristic_redistributes_what_clipping_leaves():
    # unclipped s_2 = 2 s_1 = 2 * 0.68 * 110 / 210 = 0.712 > 0.7: s_2 = 0.7, s_1 = (74.8 - 70) / 10 = 0.48
    values = heuristic_sparsities([10, 100], 0.68, 0.7)
    assert values == pytest.approx((0.48, 0.7), abs=1e-12)
    assert density([10, 100], values) == pytest.approx(0.32, abs=1e-12)
    with pytest.raises(ConfigError, match="sparsity: got 0.98"):
        heuristic_sparsities([1, 100], 0.98, 0.98)  # a 1-weight layer (ln 1 = 0) stays dense


@pytest.mark.parametrize(
    "values, sparsity, high, expected",
    [
        ((0.2, 0.6), 0.6, 0.98, (0.3, 0.7)),  # shift 0.1: 100 * 0.3 + 300 * 0.7 = 240 = 0.6 * 400
        ((0.1, 0.9), 0.8, 0.95, (0.35, 0.95)),  # layer 2 clipped at 0.95: 100 s_1 = 320 - 285
        ((0.0, 0.9), 0.1, 0.98, (0.0, 2 / 15)),  # layer 1 clipped at 0: 300 s_2 = 40
        ((0.98, 0.98), 0.1, 0.98, (0.1, 0.1)),  # all equal: uniform
    ],
)
def test_projection_shifts_onto_the_budget(values, sparsity, high, expected):
    projected = project_sparsities([100, 300], values, sparsity, high)
    assert projected == pytest.approx(expected, abs=1e-12)
    budget = KeptWeightsBudget(1 - sparsity, (100, 300))
    assert abs(budget.cost(projected) - budget.target) < 1e-6
