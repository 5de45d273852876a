"""What pf-ray's own searchers (GP, DDPG, random) share: a per-layer space, Tune's metric and mode, and a search
state that is saved with Tune's experiment and refused when it belongs to another search."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from pf_ray.search_space import PerLayerSpace
from search_algs.spaces import uniform_starting_point

MODES = ("min", "max")
STATE_VERSION = 1  # of every searcher's get_state(); a saved state of another version is refused


class PerLayerSearcher(Searcher):
    """One level under Tune's ``Searcher``: each subclass implements ``suggest``, ``on_trial_complete``,
    ``get_state`` (starting from ``state_header()``) and ``set_state`` (starting from ``check_state_header``).

    Every searcher proposes the uniform point first, then ``starts`` (the learner's heuristic allocations, e.g.
    channel pruning's knapsack), before its own suggestions, so a search never ends worse than those.

    Args:
        space: the per-layer space; suggestions use its flat keys ``space.keys()``.
        starts: proposals to make right after the uniform one, each one value per layer within the box.
        metric, mode: what to optimise; may also come later through ``set_search_properties`` (Tune hands
            ``TuneConfig``'s metric and mode on only when the Tuner's param_space is not empty).
    """

    label = "Searcher"  # the class's name in messages

    def __init__(self, space: PerLayerSpace, *, metric: str | None, mode: str | None,
                 starts: Sequence[Sequence[float]] = ()) -> None:
        self._check_mode(mode)
        if not space.names:
            raise ValueError(f"{self.label}: space {space.field!r} has no layers; expected at least one")
        if not space.low < space.high:
            raise ValueError(f"{self.label}: space.low must be below space.high, but got low={space.low!r}, "
                             f"high={space.high!r}")
        for start in starts:
            if len(start) != len(space.names) or not all(space.low <= v <= space.high for v in start):
                raise ValueError(f"{self.label}: a starting proposal needs {len(space.names)} values in "
                                 f"[{space.low}, {space.high}], but got {list(start)!r}")
        super().__init__(metric=metric, mode=mode)
        self._space = space
        self._keys = space.keys()
        # What every search proposes first: the uniform point, then the learner's heuristic starts (the knapsack)
        self._first_points = [tuple(uniform_starting_point(space)[key] for key in self._keys),
                              *(tuple(float(v) for v in start) for start in starts)]

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Take metric and mode from the Tuner where given; the space is the searcher's own (Tune overwrites the
        per-layer keys of ``config`` with each suggestion)."""
        self._check_mode(mode)
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def save(self, checkpoint_path: str) -> None:
        # Pickle, like Tune's own searchers (HyperOptSearch, OptunaSearch): the state is plain Python + numpy.
        Path(checkpoint_path).write_bytes(pickle.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(pickle.loads(Path(checkpoint_path).read_bytes()))

    def state_header(self) -> dict[str, Any]:
        """The part of the saved state that says which search it belongs to."""
        return {"version": STATE_VERSION, "keys": self._keys,
                "bounds": (float(self._space.low), float(self._space.high)), "metric": self._metric,
                "mode": self._mode}

    def check_state_header(self, state: dict[str, Any]) -> None:
        """Refuse a saved state of another search (version, space, metric or mode); continue with this
        searcher's metric and mode where set, else the saved ones."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.label}: saved state version {state.get('version')!r}; supported: "
                             f"{STATE_VERSION}")
        saved = (list(state["keys"]), tuple(state["bounds"]))
        this = (self._keys, (float(self._space.low), float(self._space.high)))
        if saved != this:
            raise ValueError(f"the saved {self.label} search ran over {len(saved[0])} layers in {saved[1]}, "
                             f"but this searcher's space has {len(this[0])} layers in {this[1]}")
        for name, mine in (("metric", self._metric), ("mode", self._mode)):
            if mine is not None and state[name] is not None and mine != state[name]:
                raise ValueError(f"the saved {self.label} search used {name}={state[name]!r}, "
                                 f"but this searcher has {name}={mine!r}")
        self._metric = self._metric or state["metric"]
        self._mode = self._mode or state["mode"]

    def _require_metric_and_mode(self, caller: str) -> None:
        if not self._metric or self._mode not in MODES:
            raise ValueError(f"{self.label} needs a metric and a mode in {MODES} before {caller}, but has "
                             f"metric={self._metric!r}, mode={self._mode!r}; pass them to {self.label}(...) "
                             f"(Tune hands TuneConfig's metric and mode on only when param_space is not empty)")

    def _check_mode(self, mode: str | None) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"{self.label}: mode must be one of {MODES}, but got {mode!r}")
