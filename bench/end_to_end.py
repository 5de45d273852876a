"""The deployable result side by side: the FP32 original vs the pruned model in FP32 and INT8, on ONNX Runtime and
on ExecuTorch (XNNPACK): test accuracy (each runtime's own), file size, batch-1 latency (median and p95, at each
``--threads``) and batch-32 throughput, all measured in one process with the models interleaved over ``--rounds``
rounds (median of the rounds' medians), so a change in machine load hits every model alike.

The two models come from a finished ``pf-ray compress`` run (``--run RUN_DIR``: the baseline checkpoint recorded in
its results.json and ``artifacts/compressed.pt``) or are named directly. Artifacts are made afresh with pf-ray's
exporters (INT8 calibrated on ``--calibration-samples`` training images). ExecuTorch programs have a fixed batch,
so throughput uses a second, batch-32 program; ExecuTorch's XNNPACK thread pool is set to each ``--threads`` value.

    python bench/end_to_end.py --run runs/e2e-bench --threads 1 2 --out bench/results/end_to_end.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # first: puts the repository root on sys.path
import torch
from _common import log

from pf_ray.checkpoint import load_checkpoint, read_checkpoint
from pf_ray.config import DatasetConfig, executorch_installed
from pf_ray.data import load_data
from pf_ray.export import export_onnx, measure_latency, quantize_onnx_int8, runtime_accuracy
from pf_ray.export.verify import dataset_inputs, open_session
from pf_ray.metrics import model_stats
from pf_ray.strict import from_dict

THROUGHPUT_BATCH = 32


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.time()
    baseline_path, compressed_path = _checkpoints(args)
    info, _ = read_checkpoint(compressed_path)
    dataset = from_dict(DatasetConfig, info.extra.get("dataset") or {"name": args.dataset}, path="dataset")
    data = load_data(dataset)
    models = {name: load_checkpoint(path, expect_input_shape=data.input_shape)[0]
              for name, path in (("original", baseline_path), ("pruned", compressed_path))}
    calibration = dataset_inputs(data.train, limit=args.calibration_samples)
    with tempfile.TemporaryDirectory(prefix="pf_ray_e2e_") as work:
        artifacts = _artifacts(models, data, calibration, Path(work), args)
        rows = _measure(artifacts, models, data, args)
    result = {
        "command": _common.command_line("end_to_end.py", argv),
        "environment": _common.environment(),
        "checkpoints": {"original": str(baseline_path), "pruned": str(compressed_path)},
        "settings": {"threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                     "calibration_samples": args.calibration_samples, "test_examples": len(data.test)},
        "rows": rows,
        "wall_seconds": round(time.time() - started, 1),
    }
    _common.write_json(args.out, result)
    print(markdown(result))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished pf-ray compress run folder")
    parser.add_argument("--baseline-checkpoint", type=Path)
    parser.add_argument("--compressed-checkpoint", type=Path)
    parser.add_argument("--dataset", default="fashion_mnist", help="when the checkpoint does not record one")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=200, help="timed batch-1 runs per model, thread count, round")
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/results/end_to_end.json"))
    args = parser.parse_args(argv)
    if args.run is None and (args.baseline_checkpoint is None or args.compressed_checkpoint is None):
        parser.error("give --run RUN_DIR, or both --baseline-checkpoint and --compressed-checkpoint")
    return args


def _checkpoints(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.run is None:
        return args.baseline_checkpoint, args.compressed_checkpoint
    results = json.loads((args.run / "results.json").read_text())
    return Path(results["baseline"]["checkpoint"]), args.run / "artifacts" / "compressed.pt"


def _artifacts(models, data, calibration, work: Path, args) -> dict[str, dict[str, Any]]:
    """label -> {model, runtime, path (batch 1), throughput_path (batch 32)}."""
    shape = data.input_shape
    found: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        fp32 = export_onnx(model, shape, work / f"{name}.onnx")
        int8 = quantize_onnx_int8(fp32, work / f"{name}.int8.onnx", calibration)
        found[f"{name} FP32 ONNX Runtime"] = {"model": name, "path": fp32, "throughput_path": fp32}
        found[f"{name} INT8 ONNX Runtime"] = {"model": name, "path": int8, "throughput_path": int8}
    if executorch_installed():
        from pf_ray.export.executorch_pte import export_pte

        for name, model in models.items():
            log(f"ExecuTorch: lowering {name} (FP32 and INT8, batch 1 and {THROUGHPUT_BATCH})")
            for precision, images in (("FP32", None), ("INT8", calibration)):
                paths = [export_pte(model, shape, work / f"{name}.{precision}.b{batch}.pte", calibration=images,
                                    batch_size=batch) for batch in (1, THROUGHPUT_BATCH)]
                found[f"{name} {precision} ExecuTorch"] = {"model": name, "path": paths[0],
                                                          "throughput_path": paths[1]}
    else:
        log("ExecuTorch is not installed: its rows are left out (pip install 'pf-ray[executorch]')")
    return found


def _measure(artifacts, models, data, args) -> list[dict[str, Any]]:
    stats = {name: model_stats(model, data.input_shape) for name, model in models.items()}
    rows = {label: {"artifact": label, "model": entry["model"], "macs": stats[entry["model"]].macs,
                    "size_bytes": entry["path"].stat().st_size,
                    "test_accuracy": runtime_accuracy(open_session(entry["path"]), data.test),
                    "latency_b1": {str(t): {"median_ms": [], "p95_ms": []} for t in args.threads},
                    "throughput_b32": {str(t): [] for t in args.threads}}
            for label, entry in artifacts.items()}
    for label, row in rows.items():
        log(f"{label}: test accuracy {row['test_accuracy']:.4f}, {row['size_bytes'] / 1024:.0f} KiB")
    for round_index in range(args.rounds):
        log(f"latency round {round_index + 1}/{args.rounds}")
        for threads in args.threads:
            for label, entry in artifacts.items():
                row = rows[label]
                single = measure_latency(open_session(entry["path"], threads), data.input_shape, 1,
                                         repeats=args.repeats)
                row["latency_b1"][str(threads)]["median_ms"].append(single["median_ms"])
                row["latency_b1"][str(threads)]["p95_ms"].append(single["p95_ms"])
                batched = measure_latency(open_session(entry["throughput_path"], threads), data.input_shape,
                                          THROUGHPUT_BATCH, repeats=max(10, args.repeats // 10))
                row["throughput_b32"][str(threads)].append(1000.0 * THROUGHPUT_BATCH / batched["median_ms"])
    for row in rows.values():  # the median over rounds; each round's figure is kept too
        row["rounds"] = {"latency_b1": row["latency_b1"], "throughput_b32": row["throughput_b32"]}
        row["latency_b1"] = {t: {key: statistics.median(values) for key, values in per_threads.items()}
                             for t, per_threads in row["latency_b1"].items()}
        row["throughput_b32"] = {t: statistics.median(v) for t, v in row["throughput_b32"].items()}
    return list(rows.values())


def markdown(result: dict[str, Any]) -> str:
    threads = [str(t) for t in result["settings"]["threads"]]
    rows = result["rows"]
    reference = next(r for r in rows if r["artifact"] == "original FP32 ONNX Runtime")
    header = ["artifact", "test accuracy", "MACs", "size"]
    header += [f"b1 median / p95 ms ({t} thr)" for t in threads] + [f"b1 speed-up ({t} thr)" for t in threads]
    header += [f"b32 images/s ({t} thr)" for t in threads]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["artifact"], f"{100 * row['test_accuracy']:.2f}%", f"{row['macs'] / 1e6:.1f}M",
                 f"{row['size_bytes'] / 1024:.0f} KiB"]
        cells += [f"{row['latency_b1'][t]['median_ms']:.3f} / {row['latency_b1'][t]['p95_ms']:.3f}" for t in threads]
        cells += [f"{reference['latency_b1'][t]['median_ms'] / row['latency_b1'][t]['median_ms']:.2f}x"
                  for t in threads]
        cells += [f"{row['throughput_b32'][t]:.0f}" for t in threads]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
