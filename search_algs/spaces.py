"""The per-layer search space as a Ray Tune space: one flat key per layer (``layer_00``, ``layer_01``, ...).

Every searcher samples the same box ``[low, high]^n``; the trial then projects the proposal onto the budget
(``pf_ray.candidate.project``), so all searchers are compared on equal terms and none scores a candidate that
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


def state_header(space: PerLayerSpace, metric: str | None, mode: str | None, version: int) -> dict[str, Any]:
    """The part of a searcher's saved state that says what search it belongs to."""
    return {"version": version, "keys": space.keys(), "bounds": (float(space.low), float(space.high)),
            "metric": metric, "mode": mode}


def check_state_header(searcher: str, state: dict[str, Any], space: PerLayerSpace, metric: str | None,
                       mode: str | None, version: int) -> tuple[str | None, str | None]:
    """Refuse a saved state from another search (version, space, metric or mode); returns the metric and mode
    to continue with (this searcher's where set, else the saved ones)."""
    if state.get("version") != version:
        raise ValueError(f"{searcher}: saved state version {state.get('version')!r}; supported: {version}")
    saved = (list(state["keys"]), tuple(state["bounds"]))
    this = (space.keys(), (float(space.low), float(space.high)))
    if saved != this:
        raise ValueError(f"the saved {searcher} search ran over {len(saved[0])} layers in {saved[1]}, "
                         f"but this searcher's space has {len(this[0])} layers in {this[1]}")
    for name, mine in (("metric", metric), ("mode", mode)):
        if mine is not None and state[name] is not None and mine != state[name]:
            raise ValueError(f"the saved {searcher} search used {name}={state[name]!r}, "
                             f"but this searcher has {name}={mine!r}")
    return metric or state["metric"], mode or state["mode"]
