"""Search algorithms over per-layer compression settings, as Ray Tune searchers, plus ASHA defaults."""

from __future__ import annotations

from typing import Any

from pf_ray.candidate import PerLayerSpace
from pf_ray.config import SearchAlgorithm
from search_algs.spaces import tune_space, uniform_starting_point


def make_searcher(algorithm: SearchAlgorithm, space: PerLayerSpace, *, metric: str, mode: str, seed: int,
                  num_trials: int) -> tuple[Any, dict[str, Any]]:
    """A Ray Tune search algorithm for ``space`` and the Tuner's ``param_space`` that goes with it.

    The first trial is always the uniform candidate, so every search contains the classic baseline.
    """
    if algorithm is SearchAlgorithm.TPE:
        from search_algs.tpe import make_tpe

        # HyperOptSearch owns the space; the Tuner must not be given it a second time.
        return make_tpe(space, metric=metric, mode=mode, seed=seed, num_trials=num_trials), {}
    if algorithm is SearchAlgorithm.RANDOM:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        searcher = BasicVariantGenerator(points_to_evaluate=[uniform_starting_point(space)], random_state=seed)
        return searcher, tune_space(space)
    raise ValueError(f"no searcher for {algorithm!r}")  # unreachable: the config enum is checked on load
