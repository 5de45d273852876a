"""The knapsack start on its own (``search.algorithm: knapsack``): the uniform candidate, then the learner's
heuristic allocation(s) (channel pruning: each channel's importance against its cost under the budget, filled
greedily, ``pf_ray.ops.knapsack``), and nothing else: a search done in two trials, for a strong answer in
minutes or a heuristic to compare the other searchers with. It learns nothing from results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.tune.search import Searcher

from pf_ray.search_space import PerLayerSpace
from search_algs.base import PerLayerSearcher


class KnapsackSearcher(PerLayerSearcher):
    """Suggests the uniform point and each start once, then ``Searcher.FINISHED`` (the search ends there)."""

    label = "KnapsackSearcher"

    def __init__(self, space: PerLayerSpace, *, metric: str | None = None, mode: str | None = None,
                 starts: Sequence[Sequence[float]] = ()) -> None:
        if not starts:
            raise ValueError("KnapsackSearcher needs a starting proposal (the learner's knapsack allocation); "
                             f"the learner of space {space.field!r} gave none")
        super().__init__(space, metric=metric, mode=mode, starts=starts)
        self._num_suggested = 0

    def suggest(self, trial_id: str) -> dict[str, float] | str:
        if self._num_suggested >= len(self._first_points):
            return Searcher.FINISHED
        point = self._first_points[self._num_suggested]
        self._num_suggested += 1
        return dict(zip(self._keys, point, strict=True))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # nothing to learn: the proposals are fixed

    def get_state(self) -> dict[str, Any]:
        return {**self.state_header(), "num_suggested": self._num_suggested}

    def set_state(self, state: dict[str, Any]) -> None:
        self.check_state_header(state)
        self._num_suggested = state["num_suggested"]
