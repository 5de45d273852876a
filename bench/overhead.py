"""Orchestration cost per trial: in-process Tune trial vs a Tune trial running a 1- or 2-worker TorchTrainer.

Each trial does a fixed amount of "work" (a sleep of --work-seconds per epoch, so the work is known exactly)
and reports once per epoch. The overhead of a trial is its wall time from the trial function's entry to its
return, minus the work; we also give the time from entry to the first report, minus one epoch of work (what
ASHA waits for before it can judge a trial). Trials run one at a time. Every setting runs in a fresh Python
process with its own local Ray, because ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is read when Ray Train starts.

    python bench/overhead.py --trials 5 --epochs 2 --work-seconds 0.5 --out bench/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [
    # (label, workers per trial (0 = in-process), health-check interval or None for Ray's default)
    ("in-process", 0, None),
    ("Ray Train, 1 worker", 1, None),
    ("Ray Train, 2 workers", 2, None),
    ("Ray Train, 1 worker, health check 0.1 s", 1, "0.1"),
    ("Ray Train, 2 workers, health check 0.1 s", 2, "0.1"),
]


def _child(workers: int, trials: int, epochs: int, work_seconds: float) -> dict:
    """Runs in a fresh process: start Ray, run the trials one at a time, return per-trial timings."""
    import ray
    from ray import tune

    def train_loop(config: dict) -> None:
        import ray.train

        for epoch in range(config["epochs"]):
            time.sleep(config["work_seconds"])
            ray.train.report({"epoch": epoch + 1, "reported_at": time.time()})

    def trial(config: dict) -> None:
        entered = time.time()
        if workers == 0:
            for epoch in range(epochs):
                time.sleep(work_seconds)
                tune.report({"epoch": epoch + 1, "reported_at": time.time()})
            tune.report({"epoch": epochs + 1, "entered": entered, "returned": time.time()})
            return
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
        from ray.tune.integration.ray_train import TuneReportCallback

        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"epochs": epochs, "work_seconds": work_seconds},
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=tune.get_context().get_trial_id(),
                                 storage_path=os.path.join(tune.get_context().get_trial_dir(), "train"),
                                 callbacks=[TuneReportCallback()]),
        )
        trainer.fit()
        tune.report({"epoch": epochs + 1, "entered": entered, "returned": time.time()})

    with tempfile.TemporaryDirectory() as storage:
        ray.init(num_cpus=workers + 1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="ERROR", log_to_driver=False)
        started = time.time()
        grid = tune.Tuner(
            tune.with_resources(trial, {"cpu": 1 if workers == 0 else 0.25}),
            param_space={"index": tune.grid_search(list(range(trials)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=storage, name="overhead", verbose=0),
        ).fit()
        wall = time.time() - started
        ray.shutdown()
    # The last report of each trial carries its entry and return times; its first carries when the first
    # epoch's report left the worker.
    rows = [(r.metrics, r.metrics_dataframe.sort_values("epoch").iloc[0]) for r in grid]
    return {
        "total_overhead_s": [last["returned"] - last["entered"] - epochs * work_seconds for last, _ in rows],
        "first_report_overhead_s": [first["reported_at"] - last["entered"] - work_seconds for last, first in rows],
        "tuner_wall_per_trial_overhead_s": (wall - trials * epochs * work_seconds) / trials,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--work-seconds", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    parser.add_argument("--child", nargs=1, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.trials, args.epochs, args.work_seconds)))
        return

    results = []
    for label, workers, interval in SETTINGS:
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
        if interval is not None:
            env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
        command = [sys.executable, __file__, "--child", str(workers), "--trials", str(args.trials),
                   "--epochs", str(args.epochs), "--work-seconds", str(args.work_seconds)]
        print(f"running: {label} ...", file=sys.stderr, flush=True)
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        timings = json.loads(output.strip().splitlines()[-1])
        results.append({"setting": label, "workers": workers, "health_check_interval_s": interval, **timings})

    print(f"\n{args.trials} trials each, {args.epochs} epochs of {args.work_seconds} s work, one trial at a time\n")
    print("| setting | overhead per trial, median (min-max) | entry to first report minus work, median | "
          "Tuner wall per trial minus work |")
    print("|---|---:|---:|---:|")
    for row in results:
        total = row["total_overhead_s"]
        print(f"| {row['setting']} | {statistics.median(total):.2f} s ({min(total):.2f}-{max(total):.2f}) | "
              f"{statistics.median(row['first_report_overhead_s']):.2f} s | "
              f"{row['tuner_wall_per_trial_overhead_s']:.2f} s |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"trials": args.trials, "epochs": args.epochs,
                                    "work_seconds": args.work_seconds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
