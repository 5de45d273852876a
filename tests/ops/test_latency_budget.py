"""A keep-ratio proposal projected onto a latency budget (pf_ray.ops.latency_budget) on a synthetic latency table,
with the answers worked out by hand in the comments."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from pf_ray.errors import ConfigError
from pf_ray.ops.latency_budget import LatencyBudget


@dataclass(frozen=True)
class LinearTable:
    """1 ms of fixed overhead, then 0.05 ms per channel kept in group 0 (16 channels) and 0.02 ms per channel in
    group 1 (32 channels): 2.44 ms unpruned."""

    sizes: tuple[int, ...] = (16, 32)

    def predict(self, kept: Sequence[int], removed: Sequence[str] = ()) -> float:  # a width-only table
        return 1.0 + 0.05 * kept[0] + 0.02 * kept[1]


def budget(speedup: float, *, round_to: int = 1) -> LatencyBudget:
    return LatencyBudget(1 / speedup, LinearTable(), reference_ms=2.44, round_to=round_to, min_ratio=0.1,
                         target_name="a synthetic runtime")


def test_a_uniform_proposal_is_scaled_to_the_last_counts_that_fit():
    # 1.5x: at most 2.44 / 1.5 = 1.6267 ms, so 0.05 k0 + 0.02 k1 <= 0.6267. Scaling both ratios by s keeps
    # k0 = round(16 s), k1 = round(32 s): s in [0.40625, 0.421875) gives (7, 13), 0.61 ms of channels: it fits;
    # at s = 0.421875 k1 becomes 14 (0.63: over). No single step fits the 0.0167 left (+0.05 or +0.02).
    projected = budget(1.5).project([1.0, 1.0])
    assert budget(1.5).kept(projected) == [7, 13]
    assert budget(1.5).predicted_ms(projected) == pytest.approx(1.61)
    assert budget(1.5).cost(projected) <= 1 / 1.5
    assert projected[0] == pytest.approx(projected[1])  # the proposal's shape: uniform stays uniform


def test_the_remainder_is_spent_by_topping_up_single_groups():
    # round_to 4, 1.25x: at most 1.952 ms, 0.952 of channels. Scaled uniformly, k0 = round(round(16 s) / 4) * 4
    # jumps from 8 to 12 at s = 0.59375 (16 s = 9.5 rounds to 10, then to 12), when k1 is 20: (12, 20) costs 1.0,
    # over; just below it, (8, 20) costs 0.80 and fits. Top-up: +4 in group 1 (0.08) -> (8, 24) 0.88 fits and
    # keeps the proposal's order (it was uniform: no group was proposed higher); +4 more -> (8, 28) 0.96, over by
    # 0.008; +4 in group 0 (0.2), over. So (8, 24), 1.88 ms.
    tight = budget(1.25, round_to=4)
    projected = tight.project([1.0, 1.0])
    assert tight.kept(projected) == [8, 24]
    assert tight.predicted_ms(projected) == pytest.approx(1.88)
    assert projected[1] == 0.75  # a topped-up group: exactly kept / channels
    assert projected[0] == pytest.approx(0.59375)  # the other keeps the largest scale that fitted


def test_a_non_uniform_proposal_keeps_its_order():
    projected = budget(1.5).project([1.0, 0.4])
    assert projected[0] > projected[1]
    assert budget(1.5).cost(projected) <= 1 / 1.5


def test_an_unreachable_speedup_names_the_fastest_reachable():
    # every group at 0.1: k0 = round(1.6) = 2, k1 = round(3.2) = 3: 1 + 0.10 + 0.06 = 1.16 ms, 2.44 / 1.16 = 2.10x
    with pytest.raises(ConfigError, match=r"search\.target_speedup: got 3; the fastest reachable on a synthetic "
                                          r"runtime .* is 2\.10x"):
        budget(3.0).project([1.0, 1.0])


def test_a_target_met_without_pruning_keeps_every_channel():
    # the unpruned model is already 2.44 / 2.44 = 1x: a reference 3x slower (7.32 ms) makes 2x = 3.66 ms reachable
    # with nothing removed, and the projection grows the proposal to every channel
    generous = LatencyBudget(0.5, LinearTable(), reference_ms=7.32, round_to=1, min_ratio=0.1)
    assert generous.project([0.5, 0.5]) == (1.0, 1.0)
