"""The GP searcher's acquisition maximiser against bayesian-optimization's own, on the same fitted GPs.

``search_algs.gp.GPSearcher`` maximises its acquisition (UCB, kappa 2.576) with a batched random search: uniform
candidates, then rounds of Gaussian steps around the best few (``GPSearcher._maximise``). bayesian-optimization's
``UpperConfidenceBound.suggest`` takes 10,000 uniform candidates and refines the best 3 with L-BFGS-B on
finite-difference gradients, which is what the searcher called before. For each objective, history size and
seed: ``size`` uniformly random points of a ``--dims``-dimensional box [0.1, 1] are scored, the searcher's GP
(Matern 5/2, normalised targets, ``GP_RESTARTS`` optimiser restarts) is fitted once, and both maximisers run on
that same GP.
Reported: the acquisition value each reaches (higher is better; they are on one scale per GP) and its CPU time.

Objectives: ``quadratic``, -mean((x - 0.6)^2) (bench/scale.py's synthetic score), and ``ackley``, Ackley's
function shifted to [0.1, 1] (many local optima).

    python bench/gp_acquisition.py --out bench/results/gp_acquisition.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _common  # first: puts the repository root on sys.path
import numpy as np
from bayes_opt.acquisition import UpperConfidenceBound
from bayes_opt.target_space import TargetSpace
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import Matern
from threadpoolctl import threadpool_limits

from pf_ray.metrics import SCORE
from pf_ray.search_space import PerLayerSpace
from search_algs.gp import GP_RESTARTS, GPSearcher

LOW, HIGH = 0.1, 1.0


def quadratic(x: np.ndarray) -> float:
    return -float(np.mean((x - 0.6) ** 2))


def ackley(x: np.ndarray) -> float:
    z = (x - 0.55) * 4
    return float(20 * np.exp(-0.2 * np.sqrt(np.mean(z**2))) + np.exp(np.mean(np.cos(2 * np.pi * z))) - 20 - np.e)


OBJECTIVES = {"quadratic": quadratic, "ackley": ackley}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gp_acquisition.json"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # sklearn's length-scale bound warnings
    space = PerLayerSpace("layer_keep_ratios", tuple(f"conv{i}" for i in range(args.dims)), low=LOW, high=HIGH)
    result: dict[str, Any] = {"command": _common.command_line("gp_acquisition.py", argv),
                              "environment": _common.environment(), "runs": []}
    with threadpool_limits(limits=1, user_api="blas"):  # as GPSearcher.suggest runs it
        for name, objective in OBJECTIVES.items():
            for size in args.sizes:
                for seed in range(args.seeds):
                    result["runs"].append(_compare(space, objective, name, size, seed))
                    run = result["runs"][-1]
                    print(f"{name} n={size} seed={seed}: L-BFGS-B {run['lbfgsb']['value']:.4f} "
                          f"({run['lbfgsb']['cpu_ms']:.0f} ms), ours {run['ours']['value']:.4f} "
                          f"({run['ours']['cpu_ms']:.0f} ms)", file=sys.stderr, flush=True)
    result["summary"] = _summary(result["runs"])
    _common.write_json(args.out, result)
    print(markdown(result))
    return 0


def _compare(space: PerLayerSpace, objective, name: str, size: int, seed: int) -> dict[str, Any]:
    rng = np.random.RandomState(seed)
    data = TargetSpace(None, {key: (LOW, HIGH) for key in space.keys()})
    for _ in range(size):
        point = rng.uniform(LOW, HIGH, len(space.keys()))
        data.register(point, objective(point))
    gp = GaussianProcessRegressor(kernel=Matern(nu=2.5), alpha=1e-6, normalize_y=True, n_restarts_optimizer=GP_RESTARTS,
                                  random_state=rng)
    gp.fit(data.params, data.target)
    ucb = UpperConfidenceBound(kappa=2.576)

    def value(point: np.ndarray) -> float:
        mean, std = gp.predict(np.atleast_2d(point), return_std=True)
        return float(ucb.base_acq(mean, std)[0])

    tic = time.process_time()
    theirs = ucb.suggest(gp, data, n_random=10_000, n_smart=3, fit_gp=False, random_state=np.random.RandomState(seed))
    theirs_ms = 1000 * (time.process_time() - tic)
    searcher = GPSearcher(space, metric=SCORE, mode="max", seed=seed)
    tic = time.process_time()
    ours = searcher._maximise(gp, y_max=float(np.max(data.target)))
    ours_ms = 1000 * (time.process_time() - tic)
    return {"objective": name, "size": size, "seed": seed,
            "lbfgsb": {"value": value(theirs), "cpu_ms": round(theirs_ms, 1)},
            "ours": {"value": value(ours), "cpu_ms": round(ours_ms, 1)}}


def _summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name in OBJECTIVES:
        for size in sorted({run["size"] for run in runs}):
            group = [run for run in runs if run["objective"] == name and run["size"] == size]
            gaps = [run["ours"]["value"] - run["lbfgsb"]["value"] for run in group]
            rows.append({
                "objective": name, "size": size, "seeds": len(group),
                "ours_higher": sum(gap > 1e-9 for gap in gaps), "equal": sum(abs(gap) <= 1e-9 for gap in gaps),
                "lbfgsb_higher": sum(gap < -1e-9 for gap in gaps),
                "median_gap": statistics.median(gaps), "worst_gap": min(gaps),
                "lbfgsb_cpu_ms": statistics.median(run["lbfgsb"]["cpu_ms"] for run in group),
                "ours_cpu_ms": statistics.median(run["ours"]["cpu_ms"] for run in group)})
    return rows


def markdown(result: dict[str, Any]) -> str:
    lines = ["| objective | observations | ours higher / equal / L-BFGS-B higher | median gap | worst gap | "
             "CPU ms, L-BFGS-B | CPU ms, ours |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["summary"]:
        lines.append(f"| {row['objective']} | {row['size']} | {row['ours_higher']} / {row['equal']} / "
                     f"{row['lbfgsb_higher']} | {row['median_gap']:+.4f} | {row['worst_gap']:+.4f} | "
                     f"{row['lbfgsb_cpu_ms']:.0f} | {row['ours_cpu_ms']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
