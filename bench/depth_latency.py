"""Depth as well as width (issue 14, item 6): what removing residual blocks buys on the target, against narrowing.

ResNet-20 on 1x28x28, batch 1, 1 thread, ONNX Runtime INT8 and FP32: the unpruned model, blocks removed (every
other removable block; ResNet-8's depth; every removable block), width halved, and mixes, all timed side by side
in one interleaved call (``pf_ray.latency.measure.time_sessions``), each against FP32 ONNX Runtime of the unpruned
model. Then the INT8 latency table built with depth (``TablePlan(depth=True)``: each block removed alone, random
candidates removing each block with probability 1/4, held-out ones too): its held-out errors, with and without
removals, and its predictions for the candidates above next to their measured ratios. Untrained weights (latency
does not depend on their values); the table is built afresh unless ``--cache`` names a folder. Only ratios from
one interleaved call are comparable (another process may load the machine); the table normalises each batch by
the unpruned model timed in it.

    python bench/depth_latency.py --out bench/results/depth_latency.json
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
from pf_ray.latency import TablePlan, latency_table, pruned_copy
from pf_ray.latency.cache import cpu_summary
from pf_ray.latency.measure import Timing, export_artifact, open_artifact, time_sessions
from pf_ray.models import build_model
from pf_ray.ops.blocks import removable_blocks
from pf_ray.ops.depth import joint_macs
from pf_ray.ops.macs_budget import macs_table
from pf_ray.ops.pruning import kept_channel_count

SHAPE = (1, 28, 28)
RESNET8_KEEPS = ("layer1.0", "layer2.0", "layer3.0")  # one block per stage: ResNet-8's depth


def candidates(blocks: list[str]) -> list[tuple[str, tuple[str, ...], float, int]]:
    """(label, removed blocks, uniform keep ratio, round_to) of every candidate timed."""
    every_other = tuple(blocks[::2])
    resnet8 = tuple(b for b in blocks if b not in RESNET8_KEEPS)
    return [
        ("unpruned", (), 1.0, 1),
        ("width 0.5", (), 0.5, 8),
        ("width 0.75", (), 0.75, 4),
        (f"depth: every other removable block removed ({len(every_other)})", every_other, 1.0, 1),
        (f"depth: ResNet-8's depth ({len(resnet8)} removed)", resnet8, 1.0, 1),
        (f"depth: every removable block removed ({len(blocks)})", tuple(blocks), 1.0, 1),
        ("mix: every other removed + width 0.75", every_other, 0.75, 4),
        ("mix: every other removed + width 0.5", every_other, 0.5, 8),
        ("mix: ResNet-8's depth + width 0.75", resnet8, 0.75, 4),
        ("mix: ResNet-8's depth + width 0.5", resnet8, 0.5, 8),
    ]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(1)
    results = _common.Results(args.out, _common.result_header("depth_latency.py", argv, args) | {
        "cpu": cpu_summary()})
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet20"), in_channels=1, num_classes=10).eval()
    table = macs_table(model, SHAPE)
    blocks = [b.name for b in removable_blocks(model, SHAPE)]
    full_macs = joint_macs(table, (), table.sizes)
    rows = []
    for label, removed, ratio, round_to in candidates(blocks):
        kept = [kept_channel_count(n, ratio, round_to) for n in table.sizes]
        rows.append({"label": label, "removed": list(removed), "keep_ratio": ratio, "kept": kept,
                     "macs_ratio": round(joint_macs(table, removed, kept) / full_macs, 4)})
    results.data["blocks"] = blocks
    results.data["side_by_side"] = _side_by_side(model, rows, args)
    results.save()
    if not args.skip_table:
        results.data["table"] = _table(model, rows, args)
        results.save()
    print(_markdown(results.data))
    return 0


def _side_by_side(model, rows: list[dict], args: argparse.Namespace) -> dict:
    """Every candidate in INT8 and FP32, one interleaved call; ratios against FP32 of the unpruned model."""
    timing = Timing(warmup=args.warmup, repeats=args.repeats, rounds=args.rounds)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pf_ray_depth_bench_") as work:
        sessions, labels = [], []
        for index, row in enumerate(rows):
            candidate = pruned_copy(model, SHAPE, row["kept"], removed=tuple(row["removed"]))
            for precision in (Precision.INT8, Precision.FP32):
                target = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=precision, threads=1, batch_size=1)
                path = export_artifact(candidate, SHAPE, target, work, stem=f"candidate{index}")
                sessions.append(open_artifact(path, 1))
                labels.append((index, str(precision)))
        _common.log(f"timing {len(sessions)} sessions side by side (load average {load:.2f})")
        started = time.time()
        timed = time_sessions(sessions, SHAPE, 1, timing, log=_common.log)
        del sessions
    figures = {label: t for label, t in zip(labels, timed, strict=True)}
    reference = figures[0, "fp32"]["median_ms"]
    int8_unpruned = figures[0, "int8"]["median_ms"]
    for index, row in enumerate(rows):
        for precision in ("int8", "fp32"):
            t = figures[index, precision]
            row[f"{precision}_ms"] = round(t["median_ms"], 4)
            row[f"{precision}_rounds_ms"] = [round(v, 4) for v in t["rounds_ms"]]
            row[f"{precision}_speedup_vs_fp32_unpruned"] = round(reference / t["median_ms"], 3)
        row["int8_ratio_to_int8_unpruned"] = round(figures[index, "int8"]["median_ms"] / int8_unpruned, 4)
    return {"timing": asdict(timing), "load_average_before": load, "load_average_after": os.getloadavg()[0],
            "seconds": round(time.time() - started, 1), "reference_fp32_unpruned_ms": round(reference, 4),
            "candidates": rows}


def _table(model, rows: list[dict], args: argparse.Namespace) -> dict:
    """The INT8 table with depth, built afresh: held-out errors, and predictions for the candidates above."""
    target = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.INT8, threads=1, batch_size=1)
    plan = replace(TablePlan(depth=True), seed=args.seed)
    if args.quick_table:
        plan = replace(plan, sweep_fractions=(0.5,), dense_groups=1, num_random=100, num_holdout=40)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pf_ray_depth_table_") as fresh:
        table = latency_table(model, SHAPE, target, plan=plan, folder=args.cache or fresh, log=_common.log)
    full = table.predict(table.sizes)
    predictions = []
    for row in rows:
        predicted = table.predict(row["kept"], row["removed"]) / full
        predictions.append({"label": row["label"], "predicted_ratio_to_unpruned": round(predicted, 4),
                            "measured_ratio_to_unpruned": row.get("int8_ratio_to_int8_unpruned"),
                            "predicted_speedup_vs_fp32_unpruned": round(table.speedup(row["kept"], row["removed"]),
                                                                        3)})
    by_kind: dict[str, int] = {}
    for measured in table.training:
        by_kind[measured.kind] = by_kind.get(measured.kind, 0) + 1
    return {"plan": asdict(plan), "load_average_before": load, "load_average_after": os.getloadavg()[0],
            "build_seconds": table.build_seconds, "summary": table.summary(),
            "measurements_by_kind": by_kind | {"holdout": len(table.holdout)},
            "median_error": round(table.median_error, 5), "max_error": round(table.max_error, 5),
            "holdout_by_depth": table.notes.get("holdout_by_depth"),
            "baseline_model": table.notes.get("baseline_model"), "features": table.features.describe(),
            "step": table.step, "full_ms": round(table.full_ms, 4), "reference_ms": round(table.reference_ms, 4),
            "block_weights_ms": _block_weights(table), "predictions": predictions,
            "environment": table.environment,
            "holdout": [[list(m.kept), list(m.removed), round(m.ms, 4), round(m.predicted or 0.0, 4)]
                        for m in table.holdout]}


def _block_weights(table) -> dict[str, dict[str, float]]:
    names = table.layout.names(table.features)
    weights = dict(zip(names, table.weights, strict=True))
    return {block: {"block_ms": round(weights[f"block[{b}]"], 5),
                    "block_activation_ms": round(weights[f"block_activation[{b}]"], 5)}
            for b, block in enumerate(table.blocks)}


def _markdown(data: dict) -> str:
    side = data["side_by_side"]
    lines = [f"CPU: {data['cpu']['model_name']} ({', '.join(data['cpu']['kernel_flags'])}); FP32 ONNX Runtime "
             f"unpruned {side['reference_fp32_unpruned_ms']:.3f} ms; load average {side['load_average_before']:.2f}",
             "", "| candidate | MACs | INT8 (ms) | INT8 speed-up | FP32 (ms) | FP32 speed-up | table predicts |",
             "|---|---|---|---|---|---|---|"]
    predicted = {p["label"]: p for p in data.get("table", {}).get("predictions", [])}
    for row in side["candidates"]:
        guess = predicted.get(row["label"])
        table_says = f"{guess['predicted_speedup_vs_fp32_unpruned']:.2f}x" if guess else "-"
        lines.append(f"| {row['label']} | {100 * row['macs_ratio']:.0f}% | {row['int8_ms']:.3f} | "
                     f"{row['int8_speedup_vs_fp32_unpruned']:.2f}x | {row['fp32_ms']:.3f} | "
                     f"{row['fp32_speedup_vs_fp32_unpruned']:.2f}x | {table_says} |")
    if "table" in data:
        table = data["table"]
        lines += ["", f"INT8 table with depth: {table['summary']}", f"held out by depth: {table['holdout_by_depth']}"]
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/depth_latency.json"))
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-table", action="store_true", help="only the side-by-side timing")
    parser.add_argument("--cache", help="keep (and reuse) the table in this folder; default: built afresh")
    parser.add_argument("--quick-table", action="store_true", help="a smaller plan (about 200 candidates)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
