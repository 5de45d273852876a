"""The per-layer search space as a Ray Tune space: one flat key per layer (``layer_00``, ``layer_01``, ...).

Every searcher samples the same box ``[low, high]^n``; the trial then projects the proposal onto the budget
(``PerLayerSpace.project``), so all searchers are compared on equal terms and none scores a candidate that
misses the budget. Flat keys, not a nested list: HyperOpt fails on nested spaces with initial points.
"""

from __future__ import annotations

from typing import Any

from pf_ray.search_space import PerLayerSpace


def tune_space(space: PerLayerSpace) -> dict[str, Any]:
    from ray import tune

    return {key: tune.uniform(space.low, space.high) for key in space.keys()}


def uniform_starting_point(space: PerLayerSpace) -> dict[str, float]:
    """Every layer alike: after projection this is the uniform candidate at the budget (the classic baseline)."""
    return {key: space.high for key in space.keys()}
