"""Gaussian-process Bayesian optimisation over the per-layer space (Snoek, Larochelle & Adams, NeurIPS 2012).

Ray's own ``BayesOptSearch`` calls ``UtilityFunction``, which bayesian-optimization 2 removed, so this is a small
Ray Tune ``Searcher`` on the 3.x pieces: ``TargetSpace.register()``, the ``UpperConfidenceBound`` /
``ExpectedImprovement`` formulas (``base_acq``), and the GP that ``BayesianOptimization`` itself builds. The
acquisition is maximised here, not by the acquisition's own ``suggest``: that one refines the best random
candidates with L-BFGS-B on finite-difference gradients (21 GP predictions per gradient in 20 dimensions), which
took 0.5 s per suggestion on the 2-core machine; a vectorised random search around the best candidates finds as
good a point in a few batched predictions (``GPSearcher._maximise``; figures in docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np
from bayes_opt.acquisition import AcquisitionFunction, ExpectedImprovement, UpperConfidenceBound
from bayes_opt.target_space import TargetSpace
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import Matern
from threadpoolctl import threadpool_limits

from pf_ray.metrics import EPOCH, finite_number
from pf_ray.search_space import PerLayerSpace
from search_algs.base import PerLayerSearcher

logger = logging.getLogger(__name__)

MIN_OBSERVATIONS = 2  # fewer finite observations than this and the GP has nothing to fit: sample at random
NUM_RANDOM_CANDIDATES = 1_000  # acquisition evaluated at this many uniform random points (one batched GP call)...
NUM_LOCAL_SEARCHES = 3  # ...then around the best few: per round, LOCAL_SAMPLES Gaussian steps from each
LOCAL_SAMPLES = 100
LOCAL_STEPS = tuple(0.2 * 0.7**i for i in range(10))  # each round's step, as a fraction of the box's width
# The GP is fitted on at most this many observations: the best half and the most recent half (see
# GPSearcher._training_set). Fitting costs O(n^3) per likelihood evaluation and predicting O(n^2) per candidate: in
# 20 dimensions on the 2-core machine a suggestion took 1.5-2 s at 500 observations without the cap (bench/scale.py).
MAX_GP_OBSERVATIONS = 100
GP_RESTARTS = 1  # random restarts of the GP's likelihood optimiser (bayesian-optimization uses 5)

Point = tuple[float, ...]  # one value per layer, in space.keys() order


class Acquisition(StrEnum):
    UCB = "ucb"  # upper confidence bound: mean + kappa * std
    EI = "ei"  # expected improvement over the best observation by more than xi


class GPSearcher(PerLayerSearcher):
    """GP-based Bayesian optimisation over the box ``[space.low, space.high]^n``, one flat key per layer.

    Suggestions, in order: the uniform point (every layer at ``space.high``, the classic baseline once the trial
    projects it onto the budget), then the ``starts`` (the learner's heuristic, e.g. the knapsack), then
    ``num_initial_points`` uniformly random points, then the maximiser of the
    acquisition function of a GP (Matern 5/2, as bayesian-optimization sets it up) fitted to every observation.
    The GP steps start only once ``MIN_OBSERVATIONS`` trials have reported finite metrics; until then (start-up
    trials still running, or failed) further random points are suggested.

    Cost bound: past ``max_observations`` distinct observations the GP is fitted on the best
    ``max_observations // 2`` of them plus the most recent ones up to ``max_observations`` in all (the pending
    points' lies come on top). The best keep the model accurate where the acquisition exploits; the most recent
    keep it accurate where the search is now. The observations left out still count as known points (no
    suggestion repeats them) and still set the lie. At or below the cap every observation is used, exactly as
    without a cap.

    What a finished trial teaches the GP (``on_trial_complete``):

    - a trial that **errored** teaches nothing: a crash, an out-of-memory kill or a lost spot node says nothing
      about how good the point is, and a made-up metric would mislead the GP (STYLE: never turn a failure into a
      fake metric). Its point leaves the pending set, so it no longer repels other suggestions;
    - a trial whose metric is **NaN, infinite or missing** (diverged fine-tuning, no report before it ended) is
      treated the same way: the GP cannot fit a non-finite value, and any finite stand-in would be invented;
    - a trial **stopped early by ASHA** (its last ``result["epoch"]`` is below the largest epoch seen so far) is
      registered with its truncated metric, as Tune's own searchers do. ASHA stopped it because it was behind its
      peers at the same epoch, so a lower value than it might have reached points the GP the right way, and it
      can never pass for the best point (finished trials outrank it). Skipping these trials instead would hide
      most of the search from the GP (with reduction factor 4, three trials in four stop at the first rung), and
      the GP would keep proposing the regions ASHA has just rejected. ``counts["early_stopped"]`` counts them.

    ``on_trial_result`` is not overridden: intermediate results are ASHA's business; the GP learns from the last
    result only.

    Args:
        space: the per-layer search space; suggestions use its flat keys ``space.keys()``.
        metric: the result key to optimise. May come later through ``set_search_properties`` from
            ``TuneConfig(metric=..., mode=...)``, but Tune calls that only when the Tuner's param_space is not empty.
        mode: "max" or "min"; "min" is minimised by maximising the negated metric.
        seed: seeds the random start-up points and the GP's optimisers (one ``numpy`` RandomState).
        num_initial_points: random points after the uniform one and the starts, before the first GP suggestion.
        acquisition: "ucb" (upper confidence bound) or "ei" (expected improvement).
        kappa: UCB's exploration weight, in standard deviations.
        xi: EI's required improvement, in the metric's own units (0.01 = one accuracy point for accuracy in [0, 1]).
        max_observations: the most observations the GP is fitted on (see "Cost bound"); None: all of them.
    """

    label = "GPSearcher"

    def __init__(self, space: PerLayerSpace, *, metric: str | None = None, mode: str | None = None, seed: int = 0,
                 num_initial_points: int = 3, acquisition: str = "ucb", kappa: float = 2.576,
                 xi: float = 0.01, max_observations: int | None = MAX_GP_OBSERVATIONS,
                 starts: Sequence[Sequence[float]] = ()) -> None:
        if not isinstance(num_initial_points, int) or num_initial_points < 0:
            raise ValueError(f"num_initial_points must be an integer >= 0, but got {num_initial_points!r}")
        allowed = [choice.value for choice in Acquisition]
        if acquisition not in allowed:
            raise ValueError(f"unknown acquisition {acquisition!r}; allowed: {allowed}")
        if kappa < 0 or xi < 0:
            raise ValueError(f"kappa and xi must be >= 0, but got kappa={kappa}, xi={xi}")
        if max_observations is not None and (not isinstance(max_observations, int)
                                             or max_observations < 2 * MIN_OBSERVATIONS):
            raise ValueError(f"max_observations must be an integer >= {2 * MIN_OBSERVATIONS} or None, but got "
                             f"{max_observations!r}")
        super().__init__(space, metric=metric, mode=mode, starts=starts)
        self._bounds = {key: (float(space.low), float(space.high)) for key in self._keys}
        self._num_initial_points = num_initial_points
        self._acquisition = Acquisition(acquisition)
        self._kappa = float(kappa)
        self._xi = float(xi)
        self._max_observations = max_observations

        # Everything below is the search state that save() keeps.
        self._rng = np.random.RandomState(seed)  # the only source of randomness, the GP's optimisers included
        self._observations: list[tuple[Point, float]] = []  # (point, metric as reported, not sign-flipped)
        self._pending: dict[str, Point] = {}  # trial id -> point, for trials suggested but not yet complete
        self._num_suggested = 0
        self._max_epoch = -math.inf
        self.counts = {"errored": 0, "invalid_metric": 0, "early_stopped": 0}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Take metric and mode from the Tuner (where given) and check that ``config`` leaves nothing to sample.

        The searcher owns its space: ``config`` may repeat the per-layer keys (Tune overwrites them with the
        suggestion) but must not hold other values to sample, which nothing here would ever fill in.
        """
        from ray.tune.search.variant_generator import parse_spec_vars

        _, domain_vars, grid_vars = parse_spec_vars(config or {})
        foreign = ["/".join(map(str, path)) for path, _ in domain_vars + grid_vars
                   if len(path) != 1 or path[0] not in self._keys]
        if foreign:
            raise ValueError(f"GPSearcher samples only the per-layer keys {self._keys[0]}..{self._keys[-1]}, but "
                             f"the Tuner's param_space also asks it to sample {foreign}; make those fixed values")
        super().set_search_properties(metric, mode, config)
        self._require_metric_and_mode(f"set_search_properties(metric={metric!r}, mode={mode!r})")
        return True

    def suggest(self, trial_id: str) -> dict[str, float]:
        self._require_metric_and_mode("suggest()")
        starts = len(self._first_points)
        if self._num_suggested < starts:
            point = self._first_points[self._num_suggested]
        elif (self._num_suggested < starts + self._num_initial_points
              or len(self._distinct_observations()) < MIN_OBSERVATIONS):
            point = self._random_point()
        else:
            # One BLAS thread: the GP's matrices are tiny (observations x observations), so extra threads only
            # spin, and on a busy driver they compete with the trials (3-4x slower seen on a loaded 2-core host).
            with threadpool_limits(limits=1, user_api="blas"):
                point = self._gp_point()
        self._num_suggested += 1
        self._pending[trial_id] = point
        return dict(zip(self._keys, point, strict=True))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Register the trial's last metric; errored and non-finite trials are dropped (see the class docstring)."""
        point = self._pending.pop(trial_id, None)
        if point is None:
            # A trial this searcher does not know: suggested in the instant before a driver was killed, after
            # the searcher's state was saved but before the trial list was (a resumed search then runs it).
            # Its point is in the result's config, so it is not lost.
            point = self._point_from((result or {}).get("config"))
            if point is None:
                logger.debug("GPSearcher: ignoring trial %s, which it did not suggest", trial_id)
                return
        if error:
            self.counts["errored"] += 1
            return
        value = finite_number((result or {}).get(self._metric))
        if value is None:
            self.counts["invalid_metric"] += 1
            logger.warning("GPSearcher: trial %s ended without a finite %r (got %r); not registered", trial_id,
                           self._metric, None if result is None else result.get(self._metric))
            return
        epoch = result.get(EPOCH)
        if epoch is not None:
            if epoch < self._max_epoch:
                self.counts["early_stopped"] += 1
            self._max_epoch = max(self._max_epoch, epoch)
        self._observations.append((point, value))

    def _point_from(self, config: Any) -> tuple[float, ...] | None:
        """The point of a trial config holding every key of this space as a number, else None."""
        if not isinstance(config, dict):
            return None
        values = [finite_number(config.get(key)) for key in self._keys]
        return None if any(value is None for value in values) else tuple(float(value) for value in values)

    def get_state(self) -> dict[str, Any]:
        return {
            **self.state_header(),
            "observations": list(self._observations),
            "pending": dict(self._pending),
            "rng": self._rng.get_state(),
            "num_suggested": self._num_suggested,
            "max_epoch": self._max_epoch,
            "counts": dict(self.counts),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue a saved search; the space must be the same, and so must metric and mode where both are set."""
        self.check_state_header(state)
        self._observations = list(state["observations"])
        self._pending = dict(state["pending"])
        self._rng.set_state(state["rng"])
        self._num_suggested = state["num_suggested"]
        self._max_epoch = state["max_epoch"]
        self.counts = dict(state["counts"])

    @property
    def observations(self) -> list[tuple[dict[str, float], float]]:
        """Every registered (config, metric) pair, in completion order."""
        return [(dict(zip(self._keys, point, strict=True)), value) for point, value in self._observations]

    @property
    def pending(self) -> dict[str, dict[str, float]]:
        """Trial id -> config, for the trials suggested and not yet complete."""
        return {trial_id: dict(zip(self._keys, point, strict=True)) for trial_id, point in self._pending.items()}

    def _random_point(self) -> Point:
        values = self._rng.uniform(self._space.low, self._space.high, size=len(self._keys))
        return tuple(float(v) for v in values)

    def _distinct_observations(self) -> dict[Point, float]:
        """Point -> value to maximise; a point observed twice keeps its first value (the GP's space rejects
        duplicates, and re-evaluations happen only through restarts)."""
        sign = 1.0 if self._mode == "max" else -1.0
        distinct: dict[Point, float] = {}
        for point, value in self._observations:
            distinct.setdefault(point, sign * value)
        return distinct

    def _gp_point(self) -> Point:
        """The acquisition maximiser of a GP fitted to the observations plus a constant lie at each pending point.

        Concurrency: each pending point is registered with the worst value observed so far (the pessimistic
        "constant liar", Ginsbourger et al. 2010), so the GP's mean is low and its variance near zero there and
        the acquisition looks elsewhere: trials in flight at once get distinct points. We keep the lies ourselves
        rather than use bayes_opt's ``ConstantLiar`` wrapper because that wrapper knows only the points it
        suggested itself (not the uniform and random start-up points still running), drops a lie only when an
        observation lands on it (so the point of an errored or NaN trial would repel suggestions for ever), and
        keeps its lies in its own state, apart from Tune's trial ids. A fresh GP per suggestion, fed from our own
        records, makes the GP a pure function of (observations, pending, RNG state), which is also what
        makes save/restore exact.
        """
        observed = self._distinct_observations()
        data = TargetSpace(None, self._bounds)
        for point, target in self._training_set(observed).items():
            data.register(np.array(point), target)
        lie = min(observed.values())
        for point in dict.fromkeys(self._pending.values()):  # distinct, in suggestion order
            if point not in observed:
                data.register(np.array(point), lie)
        # bayesian-optimization's own GP (BayesianOptimization builds the same one), with one restart of the
        # likelihood's optimiser instead of 5: the Matern kernel has a single length scale, a 1-D optimisation
        # that the extra restarts did not change here, and each cost as much as the acquisition search.
        gp = GaussianProcessRegressor(kernel=Matern(nu=2.5), alpha=1e-6, normalize_y=True,
                                      n_restarts_optimizer=GP_RESTARTS, random_state=self._rng)
        with warnings.catch_warnings():  # sklearn warns about length scales at their bounds: not actionable here
            warnings.simplefilter("ignore")
            gp.fit(data.params, data.target)
        point = tuple(float(v) for v in self._maximise(gp, y_max=float(np.max(data.target))))
        if not all(math.isfinite(v) for v in point) or self._is_known(point):
            # The acquisition optimiser failed or landed on a point already tried or running: a random point
            # still teaches the GP something, a repeat would not.
            logger.debug("GPSearcher: GP suggestion %s unusable, taking a random point", point)
            return self._random_point()
        return point

    def _maximise(self, gp: GaussianProcessRegressor, *, y_max: float) -> np.ndarray:
        """The candidate with the highest acquisition: ``NUM_RANDOM_CANDIDATES`` uniform points, then
        ``len(LOCAL_STEPS)`` rounds that each draw ``LOCAL_SAMPLES`` Gaussian steps (the round's step times the
        box's width) from each of the ``NUM_LOCAL_SEARCHES`` best points so far, clipped to the box. Every round is
        one batched GP prediction; the best point seen wins (never worse than the random candidates alone)."""
        acquisition = self._make_acquisition()
        if isinstance(acquisition, ExpectedImprovement):
            acquisition.y_max = y_max  # what ExpectedImprovement.suggest would set: the best target registered

        def value(points: np.ndarray) -> np.ndarray:
            mean, std = gp.predict(points, return_std=True)
            with np.errstate(divide="ignore", invalid="ignore"):  # EI at a known point: std 0
                return np.nan_to_num(acquisition.base_acq(mean, std), nan=-np.inf)

        low, high, dims = self._space.low, self._space.high, len(self._keys)
        points = self._rng.uniform(low, high, size=(NUM_RANDOM_CANDIDATES, dims))
        values = value(points)
        for step in LOCAL_STEPS:
            starts = points[np.argsort(values)[-NUM_LOCAL_SEARCHES:]]
            moves = self._rng.normal(0.0, step * (high - low), size=(len(starts), LOCAL_SAMPLES, dims))
            around = np.clip(starts[:, None, :] + moves, low, high).reshape(-1, dims)
            points, values = np.vstack([points, around]), np.concatenate([values, value(around)])
        return points[int(np.argmax(values))]

    def _training_set(self, observed: dict[Point, float]) -> dict[Point, float]:
        """What the GP is fitted on: every observation up to the cap; past it, the best ``cap // 2`` (ties: the
        earlier) and the most recent of the others up to the cap. Completion order is kept either way."""
        cap = self._max_observations
        if cap is None or len(observed) <= cap:
            return observed
        points = list(observed)  # completion order
        best = set(sorted(points, key=lambda point: observed[point], reverse=True)[:cap // 2])  # stable sort
        others = [point for point in points if point not in best]
        kept = best | set(others[len(others) - (cap - len(best)):])
        return {point: value for point, value in observed.items() if point in kept}

    def _make_acquisition(self) -> AcquisitionFunction:
        if self._acquisition is Acquisition.UCB:
            return UpperConfidenceBound(kappa=self._kappa)
        return ExpectedImprovement(xi=self._xi)

    def _is_known(self, point: Point) -> bool:
        tolerance = 1e-6 * (self._space.high - self._space.low)
        known = [p for p, _ in self._observations] + list(self._pending.values())
        return any(max(abs(a - b) for a, b in zip(point, other, strict=True)) <= tolerance for other in known)
