"""Uniform random search over the per-layer box, the control every searcher is compared against
(Bergstra & Bengio, JMLR 2012)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pf_ray.search_space import PerLayerSpace
from search_algs.base import PerLayerSearcher


class RandomSearcher(PerLayerSearcher):
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

    label = "RandomSearcher"

    def __init__(self, space: PerLayerSpace, *, metric: str | None = None, mode: str | None = None,
                 seed: int = 0, starts: Sequence[Sequence[float]] = ()) -> None:
        super().__init__(space, metric=metric, mode=mode, starts=starts)
        self._rng = np.random.default_rng(seed)
        self._num_suggested = 0
        self.num_completed = 0

    def suggest(self, trial_id: str) -> dict[str, float]:
        if self._num_suggested < len(self._first_points):
            point = dict(zip(self._keys, self._first_points[self._num_suggested], strict=True))
        else:
            values = self._rng.uniform(self._space.low, self._space.high, size=len(self._keys))
            point = {key: float(value) for key, value in zip(self._keys, values, strict=True)}
        self._num_suggested += 1
        return point

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.num_completed += 1

    def get_state(self) -> dict[str, Any]:
        return {**self.state_header(), "rng": self._rng.bit_generator.state, "num_suggested": self._num_suggested,
                "num_completed": self.num_completed}

    def set_state(self, state: dict[str, Any]) -> None:
        self.check_state_header(state)
        self._rng.bit_generator.state = state["rng"]
        self._num_suggested = state["num_suggested"]
        self.num_completed = state["num_completed"]
