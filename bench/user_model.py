"""A user's own model file with channel splits, shuffles and grouped convolutions, compressed end to end (issue 15):
runs ``pf-ray compress examples/user_shuffle_net.yaml`` (or reads the results of such a run) and prints what the
acceptance asks: smaller, faster, as accurate after the retrain, and the groups left unpruned.

    python bench/user_model.py                                   # runs the example (45 min on a busy 2-core machine)
    python bench/user_model.py --results runs/<run>/results.json # only the summary of an earlier run

The summary is also written to bench/results/user_shuffle_net.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import REPO_ROOT, write_json

EXAMPLE = "examples/user_shuffle_net.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="results.json of a finished run (default: run the example)")
    parser.add_argument("--storage", default="runs", help="storage.path of the run this script starts")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench/results/user_shuffle_net.json")
    args = parser.parse_args(argv)
    results = args.results
    if results is None:
        name = "user-shuffle-net"
        subprocess.run(["pf-ray", "compress", EXAMPLE, "--set", f"storage.path={args.storage}", "--set",
                        f"storage.name={name}"], cwd=REPO_ROOT, check=True)
        results = REPO_ROOT / args.storage / name / "results.json"
    data = json.loads(results.read_text())
    rows = {f"{a['model']}.{a['format']}": a for a in data["artifacts"]}
    summary = {
        "command": data["command"], "seconds": data["seconds"], "cpu": data["target"]["cpu"],
        "skipped_groups": data["skipped_groups"],
        "artifacts": {key: {"test_accuracy": a["test_accuracy"], "macs": a["macs"], "params": a["params"],
                            "latency_ms": {b: round(t["median_ms"], 4) for b, t in a["latency"].items()}}
                      for key, a in rows.items()},
    }
    write_json(args.out, summary)
    cpu = data["target"]["cpu"]
    print(f"command: {data['command']}  ({data['seconds'] / 60:.0f} min)\nCPU: {cpu['model_name']} ({' '.join(cpu['kernel_flags'])})")
    print("| artifact | test accuracy | MACs | params | ms b1 | ms b32 |\n|---|---:|---:|---:|---:|---:|")
    for key, a in summary["artifacts"].items():
        ms = a["latency_ms"]
        print(f"| {key} | {a['test_accuracy']:.2%} | {a['macs'] / 1e6:.2f}M | {a['params'] / 1e3:.1f}k | "
              f"{ms.get('1', float('nan')):.3f} | {ms.get('32', float('nan')):.3f} |")
    for group in data["skipped_groups"]:
        print(f"left unpruned: {group['name']}: {group['reason']}")
    base, comp = rows["baseline.onnx_int8"], rows["compressed.onnx_int8"]
    drop = 100 * (base["test_accuracy"] - comp["test_accuracy"])
    print(f"INT8: {drop:+.2f} pt accuracy lost, MACs x{comp['macs'] / base['macs']:.2f}, batch-1 latency "
          f"{base['latency']['1']['median_ms'] / comp['latency']['1']['median_ms']:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
