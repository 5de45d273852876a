"""Search algorithms over per-layer compression settings, as Ray Tune searchers, plus ASHA defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pf_ray.config import SearchAlgorithm
from pf_ray.search_space import PerLayerSpace


def make_searcher(algorithm: SearchAlgorithm, space: PerLayerSpace, *, metric: str, mode: str, seed: int,
                  num_trials: int, max_epochs: int,
                  starts: Sequence[Sequence[float]] = ()) -> tuple[Any, dict[str, Any]]:
    """A Ray Tune search algorithm for ``space`` and the Tuner's ``param_space`` that goes with it.

    Every searcher proposes the uniform candidate first, then ``starts`` (the learner's heuristic allocations,
    e.g. channel pruning's knapsack), so every search contains the classic baseline and the heuristic.
    """
    if algorithm is SearchAlgorithm.TPE:
        from search_algs.tpe import make_tpe

        # HyperOptSearch owns the space; the Tuner must not be given it a second time.
        return make_tpe(space, metric=metric, mode=mode, seed=seed, num_trials=num_trials, starts=starts), {}
    # Our own searchers get metric and mode here: Tune passes them on only when param_space is not empty.
    if algorithm is SearchAlgorithm.GP:
        from search_algs.gp import GPSearcher

        return GPSearcher(space, metric=metric, mode=mode, seed=seed, starts=starts,
                          num_initial_points=max(2, min(10, num_trials // 4))), {}
    if algorithm is SearchAlgorithm.DDPG:
        from search_algs.ddpg.searcher import DDPGSearcher

        return DDPGSearcher(space, metric=metric, mode=mode, seed=seed, num_trials=num_trials,
                            max_epochs=max_epochs, starts=starts), {}
    if algorithm is SearchAlgorithm.RANDOM:
        from search_algs.random_search import RandomSearcher

        return RandomSearcher(space, metric=metric, mode=mode, seed=seed, starts=starts), {}
    if algorithm is SearchAlgorithm.KNAPSACK:
        from search_algs.knapsack import KnapsackSearcher

        return KnapsackSearcher(space, metric=metric, mode=mode, starts=starts), {}
    raise ValueError(f"no searcher for {algorithm!r}")  # unreachable: the config enum is checked on load
