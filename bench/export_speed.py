"""Latency, size and accuracy of a model and its pruned twin: PyTorch eager FP32 vs ONNX Runtime FP32 vs INT8.

Each runtime's accuracy is computed by that runtime over the test set; latency is the median of ``--repeats``
timed runs (after 20 warm-up runs) on one fixed random batch, with ``--threads`` threads, at each batch size.
Without ``--pruned-checkpoint`` the baseline is pruned to a 0.5 keep ratio per group (channel counts rounded to
multiples of 8) and not fine-tuned: its accuracy then shows the cost of pruning alone, not of a pruned model.

    python bench/export_speed.py --model resnet20 --dataset fashion_mnist --checkpoint none \\
        --pruned-checkpoint none --threads 1 --batch-sizes 1 32 --repeats 200 --out bench/results/export_speed.json
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import time
from pathlib import Path

import _common  # first: puts the repository root on sys.path
import torch
from torch import nn

from pf_ray.config import DatasetConfig, ModelConfig
from pf_ray.data import DataBundle, load_data
from pf_ray.export import (
    agreement,
    export_onnx,
    measure_latency,
    onnx_session,
    quantize_onnx_int8,
    runtime_accuracy,
    torch_latency,
)
from pf_ray.export.verify import dataset_inputs
from pf_ray.models import build_model

CALIBRATION_SAMPLES = 256  # training images, as ExportConfig's default
PARITY_SAMPLES = 256  # test images on which the ONNX logits are compared with PyTorch's
PRUNE_KEEP_RATIO = 0.5
PRUNE_ROUND_TO = 8  # ONNX Runtime's x86 convolutions work on blocks of 8 channels (DESIGN.md)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.time()
    notes: list[str] = []
    data = load_data(DatasetConfig(name=args.dataset, test_subset=args.test_subset))
    models = {"baseline": _baseline(args, data, notes)}
    pruned = _pruned(args, data, models["baseline"], notes)
    if pruned is not None:
        models["pruned"] = pruned

    rows = []
    with tempfile.TemporaryDirectory(prefix="pf_ray_export_speed_") as work:
        for label, model in models.items():
            print(f"[{label}] measuring ...", file=sys.stderr, flush=True)
            rows += _measure(label, model.eval(), data, Path(work), args)
    for note in notes:
        print(f"NOTE: {note}")
    print(_markdown(rows, args.batch_sizes))

    result = {
        "command": _common.command_line("export_speed.py", argv),
        "environment": _common.environment(),
        "settings": {
            "model": args.model,
            "dataset": args.dataset,
            "threads": args.threads,
            "batch_sizes": args.batch_sizes,
            "repeats": args.repeats,
            "test_examples": len(data.test),
        },
        "notes": notes,
        "rows": rows,
        "wall_seconds": round(time.time() - started, 1),
    }
    _common.write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", help="registered model name (untrained fallback)")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--checkpoint", type=_optional_path, default=None, help="baseline checkpoint, or none")
    parser.add_argument(
        "--pruned-checkpoint",
        type=_optional_path,
        default=None,
        help="pruned checkpoint, or none = prune the baseline here (no fine-tuning)",
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of both runtimes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per latency figure")
    parser.add_argument("--test-subset", type=int, default=None, help="first N test images (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/export_speed.json"))
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--threads, --repeats and --batch-sizes must be at least 1")
    return args


def _optional_path(text: str) -> Path | None:
    return None if text.lower() in ("none", "") else Path(text)


def _baseline(args: argparse.Namespace, data: DataBundle, notes: list[str]) -> nn.Module:
    untrained = f"{args.model} with untrained weights: accuracy column meaningless"
    if args.checkpoint is None:
        notes.append(f"baseline: no --checkpoint; {untrained}")
        return _fresh(args.model, data)
    try:
        from pf_ray.checkpoint import load_checkpoint
    except ImportError:
        notes.append(f"baseline: pf_ray.checkpoint is not available; {untrained}")
        return _fresh(args.model, data)
    model, _ = load_checkpoint(
        args.checkpoint, expect_input_shape=data.input_shape, expect_num_classes=data.num_classes
    )
    return model


def _pruned(args: argparse.Namespace, data: DataBundle, baseline: nn.Module, notes: list[str]) -> nn.Module | None:
    if args.pruned_checkpoint is not None:
        from pf_ray.checkpoint import load_checkpoint  # asked for explicitly: a missing module is an error

        model, _ = load_checkpoint(
            args.pruned_checkpoint, expect_input_shape=data.input_shape, expect_num_classes=data.num_classes
        )
        return model
    try:
        from pf_ray.ops.channel_groups import prunable_groups
        from pf_ray.ops.pruning import prune_channels_
    except ImportError:
        notes.append("pruned: pf_ray.ops.pruning is not available; pruned rows skipped")
        return None
    model = copy.deepcopy(baseline)
    count = len(prunable_groups(model, data.input_shape))
    kept = prune_channels_(model, data.input_shape, [PRUNE_KEEP_RATIO] * count, round_to=PRUNE_ROUND_TO)
    notes.append(
        f"pruned: the baseline pruned here (L1, keep ratio {PRUNE_KEEP_RATIO} in each of {count} groups, counts "
        f"rounded to multiples of {PRUNE_ROUND_TO}: {sorted(set(kept.values()))} channels), not fine-tuned"
    )
    return model


def _fresh(name: str, data: DataBundle) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name), in_channels=data.input_shape[0], num_classes=data.num_classes)


def _measure(label: str, model: nn.Module, data: DataBundle, work: Path, args: argparse.Namespace) -> list[dict]:
    """Three rows for one model: PyTorch eager FP32, ONNX Runtime FP32, ONNX Runtime INT8."""
    from pf_ray.metrics import ACCURACY, model_stats
    from pf_ray.train import evaluate

    stats = model_stats(model, data.input_shape)
    common = {"model": label, "macs": stats.macs, "params": stats.params}
    reference = dataset_inputs(data.test, limit=PARITY_SAMPLES)

    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        accuracy = evaluate(model, data.test)[ACCURACY]
    finally:
        torch.set_num_threads(threads)
    rows = [
        {
            **common,
            "runtime": "pytorch_fp32",
            "size_bytes": weights.getbuffer().nbytes,  # torch.save(state_dict)
            "test_accuracy": accuracy,
            "top1_agreement": 1.0,
            "max_abs_diff": 0.0,
            "median_ms": {
                size: torch_latency(model, data.input_shape, size, args.threads, repeats=args.repeats)["median_ms"]
                for size in args.batch_sizes
            },
        }
    ]

    fp32_path = export_onnx(model, data.input_shape, work / f"{label}.onnx")
    calibration = dataset_inputs(data.train, limit=CALIBRATION_SAMPLES)
    int8_path = quantize_onnx_int8(fp32_path, work / f"{label}.int8.onnx", calibration)
    for runtime, path in (("onnxruntime_fp32", fp32_path), ("onnxruntime_int8", int8_path)):
        session = onnx_session(path, threads=args.threads)
        rows.append(
            {
                **common,
                "runtime": runtime,
                "size_bytes": path.stat().st_size,
                "test_accuracy": runtime_accuracy(session, data.test),
                **agreement(model, session, reference),
                "median_ms": {
                    size: measure_latency(session, data.input_shape, size, repeats=args.repeats)["median_ms"]
                    for size in args.batch_sizes
                },
            }
        )
    return rows


def _markdown(rows: list[dict], batch_sizes: list[int]) -> str:
    """One line per (model, runtime); speed-ups are against the baseline's ONNX Runtime FP32 at that batch."""
    reference = next(r for r in rows if r["model"] == "baseline" and r["runtime"] == "onnxruntime_fp32")
    header = ["model", "runtime", "MMACs", "size (kB)", "test acc"]
    for size in batch_sizes:
        header += [f"b{size} median (ms)", f"b{size} vs ORT FP32"]
    header += ["top-1 agree", "max |diff|"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["model"],
            row["runtime"],
            f"{row['macs'] / 1e6:.2f}",
            f"{row['size_bytes'] / 1e3:.0f}",
            f"{row['test_accuracy']:.4f}",
        ]
        for size in batch_sizes:
            median = row["median_ms"][size]
            cells += [f"{median:.3f}", f"{reference['median_ms'][size] / median:.2f}x"]
        cells += [f"{row['top1_agreement']:.4f}", f"{row['max_abs_diff']:.2e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
