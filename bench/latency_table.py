"""Latency tables of channel pruning's candidates: how well a fitted per-group table predicts measured latency.

For each model and target, ``pf_ray.latency.latency_table`` measures candidates in context (single-group sweeps,
dense sweeps for the step, random candidates), fits the table, and checks it on random candidates it never saw.
Reported: build time, measurements, held-out median and largest relative error (also of the simplest model tried:
base + per-layer MACs rounded up to a block), where latency steps, and the CPU model and flags. Untrained weights
(latency does not depend on their values). Tables are built afresh unless ``--cache`` names a folder.

    python bench/latency_table.py --models resnet20 mobilenet_v2 \\
        --targets onnxruntime:fp32 onnxruntime:int8 --out bench/results/latency_table.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import _common  # first: puts the repository root on sys.path
import torch

from pf_ray.config import ModelConfig, Precision, Runtime, TargetConfig
from pf_ray.latency import TablePlan, latency_table, plan_for
from pf_ray.latency.cache import cpu_summary
from pf_ray.models import build_model

MODELS = {  # name -> (input shape, width multiplier)
    "resnet20": ((1, 28, 28), 1.0),
    "mobilenet_v2": ((3, 32, 32), 0.5),
}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)
    results = _common.Results(args.out, _common.result_header("latency_table.py", argv, args) | {
        "cpu": cpu_summary(), "tables": []})
    with tempfile.TemporaryDirectory(prefix="pf_ray_latency_bench_") as fresh:
        folder = Path(args.cache) if args.cache else Path(fresh)
        for name in args.models:
            shape, width = MODELS[name]
            model = build_model(ModelConfig(name=name, width_multiplier=width), in_channels=shape[0],
                                num_classes=10).eval()
            for spec in args.targets:
                runtime, precision = spec.split(":")
                target = TargetConfig(runtime=Runtime(runtime), precision=Precision(precision),
                                      threads=args.threads, batch_size=args.batch_size)
                plan = replace(plan_for(target), seed=args.seed)  # ExecuTorch: the smaller plan
                load = os.getloadavg()[0]
                _common.log(f"{name} on {spec}: building (load average {load:.2f})")
                started = time.time()
                table = latency_table(model, shape, target, plan=plan, folder=folder, log=_common.log)
                results.data["tables"].append(_row(name, spec, table, time.time() - started, load, plan))
                results.save()
    print(_markdown(results.data))
    return 0


def _row(name: str, spec: str, table, wall: float, load: float, plan: TablePlan) -> dict:
    by_kind: dict[str, int] = {}
    for measured in table.training:
        by_kind[measured.kind] = by_kind.get(measured.kind, 0) + 1
    return {
        "model": name, "target": spec, "build_seconds": table.build_seconds, "wall_seconds": round(wall, 1),
        "load_average_before": load, "measurements": len(table.training) + len(table.holdout),
        "measurements_by_kind": by_kind | {"holdout": len(table.holdout)},
        "median_error": table.median_error, "max_error": table.max_error, "step": table.step,
        "step_evidence": table.step_evidence, "features": table.features.describe(),
        "full_ms": table.full_ms, "reference_ms": table.reference_ms, "notes": table.notes,
        "cross_validation_top": list(table.cross_validation[:5]), "environment": table.environment,
        "plan": asdict(plan), "holdout": [[list(m.kept), m.ms, m.predicted] for m in table.holdout],
    }


def _markdown(data: dict) -> str:
    lines = ["| model | target | unpruned (ms) | FP32 ORT (ms) | build (s) | measured | held-out median | "
             "largest | simplest model: median / largest | step | chosen features |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in data["tables"]:
        plain = row["notes"].get("baseline_model", {})
        lines.append(
            f"| {row['model']} | {row['target']} | {row['full_ms']:.3f} | {row['reference_ms']:.3f} | "
            f"{row['build_seconds']:.0f} | {row['measurements']} | {100 * row['median_error']:.1f}% | "
            f"{100 * row['max_error']:.1f}% | {100 * plain.get('median_error', float('nan')):.1f}% / "
            f"{100 * plain.get('max_error', float('nan')):.1f}% | {row['step']} | {row['features']} |")
    cpu = data["cpu"]
    lines.append(f"\nCPU: {cpu['model_name']} ({', '.join(cpu['kernel_flags'])})")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--targets", nargs="+", default=["onnxruntime:fp32", "onnxruntime:int8"],
                        help="runtime:precision, e.g. onnxruntime:int8 executorch:int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="latency cache folder (default: a fresh one, so all is measured)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/latency_table.json"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
