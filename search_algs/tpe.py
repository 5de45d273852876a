"""TPE (Bergstra et al., NeurIPS 2011) through Ray Tune's HyperOptSearch, over the per-layer space."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pf_ray.search_space import PerLayerSpace
from search_algs.spaces import tune_space, uniform_starting_point


def make_tpe(space: PerLayerSpace, *, metric: str, mode: str, seed: int, num_trials: int,
             starts: Sequence[Sequence[float]] = ()):
    from ray.tune.search.hyperopt import HyperOptSearch

    class FiniteHyperOptSearch(HyperOptSearch):
        """Ray's HyperOptSearch hands a NaN or infinite metric to hyperopt as a valid loss, which skews TPE's
        densities; here such a trial counts as failed (hyperopt then ignores it), like an errored one."""

        def on_trial_complete(self, trial_id, result=None, error=False):
            value = (result or {}).get(self.metric)
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            super().on_trial_complete(trial_id, result, error=error or not finite)

    # hyperopt's default of 20 random start-up points would leave a small search with no model-based step:
    # use about a third of the budget (at least 2) for random exploration.
    n_initial_points = max(2, min(20, num_trials // 3))
    return FiniteHyperOptSearch(
        # hyperopt's own space objects (converting here, not in the Tuner, keeps the searcher usable alone)
        space=HyperOptSearch.convert_search_space(tune_space(space)),
        metric=metric,
        mode=mode,
        points_to_evaluate=[uniform_starting_point(space),
                            *(dict(zip(space.keys(), map(float, start), strict=True)) for start in starts)],
        n_initial_points=n_initial_points,
        random_state_seed=seed,
    )
