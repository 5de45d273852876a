"""Cluster scale: Tune's scheduling on simulated clusters of 1, 2 and 4 nodes, and the searchers' ``suggest``
latency as their history grows.

1. Scheduling. A ``ray.cluster_utils.Cluster`` of ``--nodes`` nodes (all on this machine, every address on
   127.0.0.1), each with ``--cpus-per-node`` logical CPUs, runs ``--waves`` x (nodes x CPUs per node) trials of a
   function trainable that only sleeps: ``--trial-seconds`` in ``--reports`` equal steps, one ``tune.report`` per
   step, with a synthetic score of its config. One trial holds 1 CPU, ``max_concurrent_trials`` is the cluster's CPU
   count, the searcher is a real one from ``search_algs.make_searcher`` (``--searcher``, pf-ray's default TPE) over
   a ``--dims``-layer space, no scheduler (FIFO: ASHA off, so every trial sleeps its full time and the ideal time
   is exact), ``reuse_actors`` off as in ``pf-ray compress``. Ideal time = trials x trial seconds / slots; scheduling
   efficiency = ideal / measured (the Tuner's ``fit()`` wall time; cluster start-up not counted), also given
   from the first trial's start on (without Tune's own start-up, which a long search pays once); the driver's CPU
   time during ``fit()`` per trial is Tune's controller plus the searcher, the serial part that real nodes would
   not share out. Logical CPUs may
   exceed the real cores because trials only sleep: this measures what Ray, Tune and the searcher cost per trial
   (actor start, scheduling, result handling, ``suggest``), not training. Every cluster size runs in a fresh Python
   process with its own Ray temp folder, so no other ``ray.init()`` on the machine can attach to it.
2. ``suggest`` latency of the DDPG and GP searchers at ``--sizes`` observations in the same space: the searcher is
   fed that many trials through its real Tune interface (``suggest``, then ``on_trial_complete`` with a synthetic
   score at the final epoch), then ``--calls`` more trials are timed one at a time (``suggest`` timed, wall and
   CPU time; then ``on_trial_complete``, also timed; each adds one observation). DDPG: one searcher grows through
   the sizes (it trains in ``on_trial_complete``, so feeding is the slow part), with ``make_searcher``'s settings
   except a warm-up of half the smallest size, so every timed suggestion is the actor's. GP: a fresh searcher per
   size with ``num_initial_points`` = size - 1, so the fed trials are cheap random points and every timed one is
   a GP step; with its default cap on the observations it fits (``MAX_GP_OBSERVATIONS``), and without the cap at
   the sizes above it.

The space: one keep ratio in [0.1, 1] per conv layer of a plain 20-conv CNN on 1x28x28 inputs, with its MACs
budget (50%, channels rounded to 8) and layer features, as ``pf_ray.candidate.search_space`` builds them; the
synthetic score of a config is -mean((value - 0.6)^2).

    python bench/scale.py --out bench/results/scale.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Before anything imports Ray: every Ray address on 127.0.0.1, no token file written (as in tests/conftest.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"

import _common  # noqa: E402  (puts the repository root on sys.path)
import numpy as np  # noqa: E402
from _common import log  # noqa: E402

from pf_ray.metrics import EPOCH, SCORE  # noqa: E402
from pf_ray.search_space import PerLayerSpace  # noqa: E402

EPOCHS = 3  # the epoch every latency-bench trial reports last: all of them count as finished
OPTIMUM = 0.6  # every layer's best value in the synthetic score
TARGET_MACS_RATIO = 0.5
ROUND_TO = 8
MIN_KEEP_RATIO = 0.1  # the box's bottom, which the budget's projection keeps to (as the learner's)
PARTS = {"scheduling": "scheduling", "suggest": "suggest_latency"}  # part -> its key in the JSON
LATENCY_TARGET_MS = 50.0  # the goal for suggest at the largest size


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child_nodes is not None:  # one cluster size, in its own process
        print(json.dumps(_scheduling(args.child_nodes, args)))
        return 0
    started = time.time()
    command = _common.command_line("scale.py", argv)
    settings = {key: value for key, value in vars(args).items() if key not in ("out", "child_nodes")}
    result: dict[str, Any] = {"command": command, "environment": _common.environment(), "settings": settings,
                              "scheduling": [], "suggest_latency": []}
    if set(args.parts) != set(PARTS) and args.out.exists():  # one part again: the other's figures are kept
        previous = json.loads(args.out.read_text())
        for part, key in PARTS.items():
            if part not in args.parts:
                result[key] = previous.get(key, [])
                result[f"{part}_from"] = previous.get(f"{part}_from") or {
                    "command": previous.get("command"), "environment": previous.get("environment")}
    save = _common.Results(args.out, result, started=started).save

    for nodes in args.nodes if "scheduling" in args.parts else []:
        log(f"scheduling: {nodes} node(s) x {args.cpus_per_node} CPUs, {args.waves * nodes * args.cpus_per_node} "
            f"trials of {args.trial_seconds} s")
        result["scheduling"].append(_run_child(nodes, args))
        row = result["scheduling"][-1]
        log(f"  {row['wall_s']:.1f} s, {row['trials_per_minute']:.1f} trials/min, efficiency {row['efficiency']:.2f}")
        save()
    space = synthetic_space(args.dims)
    for row in _suggest_latency(space, args.sizes, args.calls, args.seed) if "suggest" in args.parts else []:
        result["suggest_latency"].append(row)
        save()
    print(markdown(result))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4], help="cluster sizes to simulate")
    parser.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs per simulated node")
    parser.add_argument("--waves", type=int, default=2, help="trials = waves x the cluster's CPUs")
    parser.add_argument("--trial-seconds", type=float, default=4.0, help="each trial's sleep, in all")
    parser.add_argument("--reports", type=int, default=4, help="tune.report calls per trial (epochs)")
    parser.add_argument("--searcher", default="tpe", choices=["random", "tpe", "gp", "ddpg"],
                        help="the searcher of the scheduling runs")
    parser.add_argument("--dims", type=int, default=20, help="layers in the search space")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 500],
                        help="observations fed to a searcher before its suggest is timed")
    parser.add_argument("--calls", type=int, default=20, help="timed suggest calls per searcher and size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS),
                        help="what to measure (default: both); a part left out keeps its figures from --out")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument("--child-nodes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = sorted(args.sizes)
    if sizes[0] < 2 or any(later - earlier < args.calls for earlier, later in itertools.pairwise(sizes)):
        parser.error(f"--sizes must be at least 2 (the GP needs 2 observations) and at least --calls "
                     f"({args.calls}) apart (DDPG's history grows by the timed calls), but got {args.sizes}")
    args.sizes = sizes
    return args


def synthetic_space(dims: int) -> PerLayerSpace:
    """Keep ratios for the ``dims`` conv layers of a plain CNN, with the MACs budget and features of the real thing."""
    from torch import nn

    from pf_ray.learners.channel_pruning import search_dimensions
    from pf_ray.ops.macs_budget import MacsBudget, macs_table
    from pf_ray.search_space import layer_features

    layers: list[nn.Module] = []
    channels_in, shape = 1, (1, 28, 28)
    for index in range(dims):
        stage = min(2, 3 * index // dims)  # 16, 32, 64 channels; the resolution halves at each new stage
        channels = 16 * 2**stage
        stride = 2 if index > 0 and stage != min(2, 3 * (index - 1) // dims) else 1
        layers += [nn.Conv2d(channels_in, channels, 3, stride=stride, padding=1), nn.ReLU()]
        channels_in = channels
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels_in, 10))
    names = tuple(search_dimensions(model, shape))
    if len(names) != dims:
        raise RuntimeError(f"the synthetic CNN has {len(names)} prunable groups, expected {dims}")
    budget = MacsBudget(TARGET_MACS_RATIO, macs_table(model, shape), ROUND_TO, min_ratio=MIN_KEEP_RATIO)
    return PerLayerSpace("layer_keep_ratios", names, low=MIN_KEEP_RATIO, high=1.0, budget=budget,
                         features=layer_features(model, shape, names))


def synthetic_score(config: dict[str, float]) -> float:
    values = np.array([config[key] for key in sorted(config) if key.startswith("layer_")])
    return float(-np.mean((values - OPTIMUM) ** 2))


# ------------------------------------------------------------------------------------------------------------------
# 1. Scheduling on a simulated cluster (runs in a child process per cluster size).


def _run_child(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pfscale-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
        # Ray writes the address of "the latest cluster" under its temp folder; a private one keeps a plain
        # ray.init() elsewhere on this machine from attaching to this cluster.
        env = {**os.environ, "RAY_TMPDIR": ray_tmp}
        env.pop("RAY_ADDRESS", None)
        command = [sys.executable, __file__, "--child-nodes", str(nodes), "--cpus-per-node", str(args.cpus_per_node),
                   "--waves", str(args.waves), "--trial-seconds", str(args.trial_seconds), "--reports",
                   str(args.reports), "--searcher", args.searcher, "--dims", str(args.dims), "--seed", str(args.seed)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {nodes}-node run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scheduling(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.cluster_utils import Cluster

    from pf_ray.config import SearchAlgorithm
    from search_algs import make_searcher

    slots = nodes * args.cpus_per_node
    num_trials = args.waves * slots
    space = synthetic_space(args.dims)
    searcher, param_space = make_searcher(SearchAlgorithm(args.searcher), space, metric=SCORE, mode="max",
                                          seed=args.seed, num_trials=num_trials, max_epochs=args.reports)
    step_seconds, reports = args.trial_seconds / args.reports, args.reports

    def sleeper(config: dict) -> None:
        entered = time.time()
        score = synthetic_score(config)
        node = ray.get_runtime_context().get_node_id()
        for epoch in range(1, reports + 1):
            time.sleep(step_seconds)
            tune.report({SCORE: score, EPOCH: epoch, "entered": entered, "reported_at": time.time(),
                         "node_id": node})

    load_before = os.getloadavg()[0]
    started = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node,
                                                            "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=args.cpus_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        cluster_start = time.time() - started
        alive = [node for node in ray.nodes() if node["Alive"]]
        if len(alive) != nodes or ray.cluster_resources().get("CPU") != slots:
            raise RuntimeError(f"expected {nodes} nodes and {slots} CPUs, got {len(alive)} nodes and "
                               f"{ray.cluster_resources()}")
        addresses = sorted({node["NodeManagerAddress"] for node in alive} | {cluster.address})
        with tempfile.TemporaryDirectory() as storage:
            fit_started, fit_started_cpu = time.time(), time.process_time()
            grid = tune.Tuner(
                tune.with_resources(sleeper, {"cpu": 1}),
                param_space=param_space,
                tune_config=tune.TuneConfig(search_alg=searcher, metric=SCORE, mode="max", num_samples=num_trials,
                                            max_concurrent_trials=slots,
                                            trial_dirname_creator=lambda trial: trial.trial_id),
                run_config=tune.RunConfig(storage_path=storage, name="scale", verbose=0),
            ).fit()
            wall = time.time() - fit_started
            driver_cpu = time.process_time() - fit_started_cpu  # Tune's controller and the searcher, all threads
    finally:
        ray.shutdown()
        cluster.shutdown()
    errors = [result.error for result in grid if result.error]
    if len(grid) != num_trials or errors:
        raise RuntimeError(f"{len(grid)} of {num_trials} trials ran, {len(errors)} failed: {errors[:1]}")
    trials = sorted(({"entered_s": r.metrics["entered"] - fit_started, "returned_s": r.metrics["reported_at"]
                      - fit_started, "node_id": r.metrics["node_id"], "epochs": r.metrics[EPOCH]} for r in grid),
                    key=lambda trial: trial["entered_s"])
    ideal = num_trials * args.trial_seconds / slots
    per_node: dict[str, int] = {}
    for trial in trials:
        per_node[trial["node_id"]] = per_node.get(trial["node_id"], 0) + 1
    return {
        "nodes": nodes, "cpus_per_node": args.cpus_per_node, "slots": slots, "trials": num_trials,
        "trial_seconds": args.trial_seconds, "reports_per_trial": args.reports, "searcher": args.searcher,
        "scheduler": "FIFO (no ASHA)", "cluster_start_s": round(cluster_start, 2), "wall_s": round(wall, 2),
        "trials_per_minute": round(60 * num_trials / wall, 2), "ideal_s": ideal, "efficiency": round(ideal / wall, 3),
        "first_trial_entered_s": round(trials[0]["entered_s"], 2),  # Tune's start-up, from fit()
        # Past the start-up: what a longer search would see.
        "efficiency_after_first_trial": round(ideal / (wall - trials[0]["entered_s"]), 3),
        "last_trial_returned_s": round(max(trial["returned_s"] for trial in trials), 2),
        "driver_cpu_s": round(driver_cpu, 2), "driver_cpu_s_per_trial": round(driver_cpu / num_trials, 3),
        "trials_per_node": sorted(per_node.values(), reverse=True), "addresses": addresses,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "per_trial": trials,
    }


# ------------------------------------------------------------------------------------------------------------------
# 2. suggest latency against the number of observations.


def _suggest_latency(space: PerLayerSpace, sizes: list[int], calls: int, seed: int) -> list[dict[str, Any]]:
    """Rows of suggest timings: DDPG at each size, GP (capped) at each size, GP without a cap above the cap."""
    from search_algs.ddpg.searcher import DDPGSearcher
    from search_algs.gp import MAX_GP_OBSERVATIONS, GPSearcher

    rows = []
    # DDPG learns in on_trial_complete (~0.1-0.3 s per trial here), so one searcher grows through the sizes.
    # make_searcher's settings, but a warm-up short enough that every timed suggestion is the actor's.
    ddpg = DDPGSearcher(space, metric=SCORE, mode="max", seed=seed, num_trials=sizes[-1] + calls,
                        num_warmup=sizes[0] // 2, max_epochs=EPOCHS)
    fed = 0
    for size in sizes:
        log(f"suggest latency: ddpg at {size} observations")
        fed = _feed(ddpg, size - fed, first=fed)
        rows.append({"searcher": "ddpg", "max_observations_fitted": None, **_time(ddpg, size, calls)})
        fed += calls
    # GP: the uniform point, then random points up to `size` observations (cheap), so every timed suggestion is
    # a GP step; a fresh searcher per size. Without the cap only where it applies: below it both are one code path.
    for cap in (MAX_GP_OBSERVATIONS, None):
        for size in sizes:
            if cap is None and size <= MAX_GP_OBSERVATIONS:
                continue
            label = "gp" if cap is not None else "gp, no cap"
            log(f"suggest latency: {label} at {size} observations")
            gp = GPSearcher(space, metric=SCORE, mode="max", seed=seed, num_initial_points=size - 1,
                            max_observations=cap)
            _feed(gp, size)
            rows.append({"searcher": label, "max_observations_fitted": cap, **_time(gp, size, calls)})
    return rows


def _feed(searcher: Any, count: int, first: int = 0) -> int:
    """``count`` trials through suggest and on_trial_complete, each finished with its synthetic score."""
    for index in range(first, first + count):
        config = searcher.suggest(f"trial{index}")
        searcher.on_trial_complete(f"trial{index}", {SCORE: synthetic_score(config), EPOCH: EPOCHS})
    return first + count


def _time(searcher: Any, size: int, calls: int) -> dict[str, Any]:
    """``calls`` more trials, one at a time, each suggest and on_trial_complete timed (wall and CPU)."""
    load_before = os.getloadavg()[0]
    suggest_s, suggest_cpu_s, complete_s = [], [], []
    for index in range(calls):
        started, started_cpu = time.perf_counter(), time.thread_time()
        config = searcher.suggest(f"timed{size}-{index}")
        suggest_s.append(time.perf_counter() - started)
        suggest_cpu_s.append(time.thread_time() - started_cpu)  # this thread's CPU time: what load does not inflate
        started = time.perf_counter()
        searcher.on_trial_complete(f"timed{size}-{index}", {SCORE: synthetic_score(config), EPOCH: EPOCHS})
        complete_s.append(time.perf_counter() - started)
    row = {
        "observations": size, "calls": calls,
        "median_ms": round(1000 * statistics.median(suggest_s), 2),
        "p95_ms": round(1000 * float(np.percentile(suggest_s, 95)), 2),
        "cpu_median_ms": round(1000 * statistics.median(suggest_cpu_s), 2),
        "on_trial_complete_median_ms": round(1000 * statistics.median(complete_s), 2),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "suggest_s": suggest_s, "suggest_cpu_s": suggest_cpu_s, "on_trial_complete_s": complete_s,
    }
    log(f"  suggest median {row['median_ms']:.1f} ms (CPU {row['cpu_median_ms']:.1f} ms), p95 {row['p95_ms']:.1f} ms")
    return row


# ------------------------------------------------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        f"Scheduling: sleep trainables of {settings['trial_seconds']} s ({settings['reports']} reports), 1 CPU each, "
        f"{settings['waves']} waves, searcher {settings['searcher']}, no ASHA",
        "",
        "| nodes | logical CPUs | trials | ideal (s) | measured (s) | trials per minute | scheduling efficiency | "
        "fit() to first trial (s) | efficiency from the first trial on | driver CPU per trial (s) | "
        "trials per node |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["scheduling"]:
        lines.append(f"| {row['nodes']} | {row['slots']} | {row['trials']} | {row['ideal_s']:.1f} | "
                     f"{row['wall_s']:.1f} | {row['trials_per_minute']:.1f} | {row['efficiency']:.2f} | "
                     f"{row['first_trial_entered_s']:.1f} | {row['efficiency_after_first_trial']:.2f} | "
                     f"{row['driver_cpu_s_per_trial']:.2f} | "
                     f"{'/'.join(map(str, row['trials_per_node']))} |")
    lines += [
        "",
        f"suggest latency, {settings['dims']} dimensions, {settings['calls']} timed calls per row "
        f"(target: under {LATENCY_TARGET_MS:.0f} ms at the largest size)",
        "",
        "| searcher | observations | suggest median (ms) | suggest p95 (ms) | suggest CPU time median (ms) | "
        "on_trial_complete median (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["suggest_latency"]:
        lines.append(f"| {row['searcher']} | {row['observations']} | {row['median_ms']:.1f} | {row['p95_ms']:.1f} | "
                     f"{row['cpu_median_ms']:.1f} | {row['on_trial_complete_median_ms']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
