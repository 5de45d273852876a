"""Uniform random search over the per-layer box, the control every searcher is compared against
(Bergstra & Bengio, JMLR 2012)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from pf_ray.search_space import PerLayerSpace
from search_algs.spaces import uniform_starting_point

MODES = ("min", "max")
_STATE_VERSION = 1


class RandomSearcher(Searcher):
    """Suggests the uniform point first (every layer at ``space.high``; the trial projects it onto the budget,
    giving the classic uniform candidate), then points drawn uniformly from ``[space.low, space.high]^n``.

    Results teach it nothing, by design; it still takes them (NaN, errored and early-stopped alike) so it runs
    under Tune exactly like the other searchers, and counts them in ``num_completed``. Seeded: the same seed gives
    the same points, also across ``save``/``restore``.

    Args:
        space: the per-layer space; suggestions use its flat keys ``space.keys()``.
        metric: the result key (unused for sampling; kept for Tune's bookkeeping).
        mode: "max" or "min".
        seed: seeds the only random generator.
    """

    def __init__(self, space: PerLayerSpace, *, metric: str | None = None, mode: str | None = None,
                 seed: int = 0) -> None:
        _check_mode(mode)
        if not space.names:
            raise ValueError(f"RandomSearcher: space {space.field!r} has no layers; expected at least one")
        if not space.low <= space.high:
            raise ValueError(f"RandomSearcher: space.low must not exceed space.high, but got low={space.low!r}, "
                             f"high={space.high!r}")
        super().__init__(metric=metric, mode=mode)
        self._space = space
        self._keys = space.keys()
        self._rng = np.random.default_rng(seed)
        self._num_suggested = 0
        self.num_completed = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Take metric and mode from the Tuner where given; the space is the searcher's own."""
        _check_mode(mode)
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict[str, float]:
        if self._num_suggested == 0:
            point = uniform_starting_point(self._space)
        else:
            values = self._rng.uniform(self._space.low, self._space.high, size=len(self._keys))
            point = {key: float(value) for key, value in zip(self._keys, values, strict=True)}
        self._num_suggested += 1
        return point

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.num_completed += 1

    def get_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "keys": list(self._keys),
                "bounds": (float(self._space.low), float(self._space.high)), "metric": self._metric,
                "mode": self._mode, "rng": self._rng.bit_generator.state, "num_suggested": self._num_suggested,
                "num_completed": self.num_completed}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"RandomSearcher: saved state version {state.get('version')!r}; supported: "
                             f"{_STATE_VERSION}")
        this_space = (list(self._keys), (float(self._space.low), float(self._space.high)))
        if (state["keys"], tuple(state["bounds"])) != this_space:
            raise ValueError(f"RandomSearcher: the saved search ran over {len(state['keys'])} layers in "
                             f"{tuple(state['bounds'])}; this searcher's space has {len(self._keys)} layers in "
                             f"{this_space[1]}")
        self._metric = self._metric or state["metric"]
        self._mode = self._mode or state["mode"]
        self._rng.bit_generator.state = state["rng"]
        self._num_suggested = state["num_suggested"]
        self.num_completed = state["num_completed"]

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(pickle.loads(Path(checkpoint_path).read_bytes()))


def _check_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"RandomSearcher: mode must be one of {MODES}, but got {mode!r}")
