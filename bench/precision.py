"""Joint pruning and precision (issue 14, item 5): what keeping each layer in FP32 inside the INT8 model costs on the
target, and what it buys back in INT8 accuracy.

ResNet-20 on Fashion-MNIST (a trained baseline checkpoint, e.g. the one a default ``pf-ray compress`` caches), ONNX
Runtime INT8, batch 1, 1 thread. The latency table built with precision and depth (``TablePlan(precision=True,
depth=True)``, what ``learner.options.mixed_precision: true`` asks for; read from the cache when the run built it):
its held-out errors with and without FP32 layers, and for each layer its measured latency in FP32 alone (the rest
INT8 and unpruned, timed side by side with the all-INT8 model by the table's builder) against the all-INT8 model.
Then the test accuracy of the INT8 file (``quantized_accuracy``: the real ``.int8.onnx``, calibrated on 256
training images as the export is) all INT8, with each layer alone in FP32, and with every layer in FP32; and the
PyTorch FP32 model's.

    python bench/precision.py --baseline RUN_OR_CACHE/baseline.pt --out bench/results/precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import _common  # noqa: F401  (first: puts the repository root on sys.path)
import torch
from torch.utils.data import DataLoader

from pf_ray.checkpoint import load_checkpoint
from pf_ray.config import DatasetConfig, Precision, Runtime, TargetConfig
from pf_ray.data import load_data
from pf_ray.export.quantized_eval import quantized_accuracy
from pf_ray.export.verify import dataset_inputs
from pf_ray.latency import latency_table, plan_for
from pf_ray.latency.cache import cpu_summary
from pf_ray.metrics import ACCURACY
from pf_ray.ops.macs_budget import macs_table
from pf_ray.train import evaluate

TARGET = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.INT8, threads=1, batch_size=1)
CALIBRATION_IMAGES = 256  # export.calibration_samples' default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="a trained ResNet-20 Fashion-MNIST checkpoint (.pt)")
    parser.add_argument("--cache", default=None, help="latency table cache folder (default: pf-ray's own)")
    parser.add_argument("--out", default="bench/results/precision.json")
    args = parser.parse_args()
    started = time.perf_counter()
    data = load_data(DatasetConfig(name="fashion_mnist"))
    model = load_checkpoint(args.baseline, expect_input_shape=data.input_shape)[0].eval()
    plan = replace(plan_for(TARGET), depth=True, precision=True)
    table = latency_table(model, data.input_shape, TARGET, plan=plan, folder=args.cache, log=print)
    layers = macs_table(model, data.input_shape).layer_names()

    full = next(m.ms for m in table.training if m.kind == "full")
    alone = {m.fp32[0]: m.ms for m in table.training if m.kind == "precision" and len(m.fp32) == 1}
    every = next(m.ms for m in table.training if m.kind == "precision" and len(m.fp32) == len(layers))

    calibration = dataset_inputs(data.train, limit=CALIBRATION_IMAGES)
    batches = list(DataLoader(data.test, batch_size=1000, shuffle=False))
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    def int8_accuracy(fp32: tuple[str, ...]) -> float:
        return quantized_accuracy(model, data.input_shape, TARGET, calibration, images, labels, fp32_layers=fp32)

    all_int8 = int8_accuracy(())
    rows = []
    for name in layers:
        accuracy = int8_accuracy((name,))
        rows.append({"layer": name, "ms_fp32_alone": alone[name], "ms_added": alone[name] - full,
                     "ms_added_predicted": table.predict(table.sizes, fp32=[name]) - table.predict(table.sizes),
                     "int8_accuracy": accuracy, "accuracy_gained": accuracy - all_int8})
        print(f"  {name:24s} +{1000 * (alone[name] - full):6.1f} us  INT8 accuracy {100 * accuracy:.2f}% "
              f"({100 * (accuracy - all_int8):+.2f} pt)")
    result = {
        "command": "python bench/precision.py --baseline BASELINE.pt",
        "cpu": cpu_summary(),
        "target": "onnxruntime int8, 1 thread, batch 1",
        "table": {"median_error": table.median_error, "max_error": table.max_error,
                  "holdout_by_precision": table.notes.get("holdout_by_precision"),
                  "holdout_by_depth": table.notes.get("holdout_by_depth"), "build_seconds": table.build_seconds,
                  "measurements": len(table.training) + len(table.holdout)},
        "all_int8_ms": full, "every_layer_fp32_ms": every, "reference_fp32_ms": table.reference_ms,
        "torch_fp32_accuracy": evaluate(model, data.test)[ACCURACY],
        "all_int8_accuracy": all_int8, "every_layer_fp32_accuracy": int8_accuracy(tuple(layers)),
        "median_ms_added": statistics.median(row["ms_added"] for row in rows),
        "layers": rows, "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"all INT8 {full:.3f} ms at {100 * all_int8:.2f}%; every layer FP32 {every:.3f} ms at "
          f"{100 * result['every_layer_fp32_accuracy']:.2f}%; FP32 ONNX Runtime {table.reference_ms:.3f} ms; "
          f"PyTorch FP32 {100 * result['torch_fp32_accuracy']:.2f}%; table held-out median error "
          f"{100 * table.median_error:.1f}% -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
