"""torchvision classifiers pruned toward half their MACs: what pf-ray leaves unpruned, what pruning costs, and
what it buys in ONNX Runtime FP32 and INT8 at batch 1 (issue 15's benchmark).

For each model (untrained, ``torchvision:NAME``, 3 x SIDE x SIDE input, 10 classes; batch-norm statistics set from
one batch of random images so the logits are not all alike):

1. the channel groups the safety check leaves unpruned (``ops.safe_pruning.unsafe_groups`` at keep ratio 0.3,
   round_to 8, as channel_pruning's default);
2. the largest uniform keep ratio of the other groups that reaches half the MACs (``uniform_keep_ratio``);
3. pruning wall time: L1 selection, and (for ``--lasso-models``) LASSO selection with reconstruction (He et al.)
   on 10 batches of 32 random images, as a search's first trial (nothing shared yet) and as a later trial of the
   same search, with features from the model being pruned (exact, the default) and from the baseline;
4. MACs and parameters before and after (the L1-pruned model: LASSO keeps the same counts);
5. ONNX Runtime FP32 and static INT8 (QDQ, 64 calibration images) latency at batch 1 with 1 thread, the four
   models of one network interleaved over rounds (a change in machine load hits all of them alike);
6. parity of the pruned FP32 ONNX model with PyTorch on 128 random images (top-1 agreement, largest logit
   difference), and the INT8 model's top-1 agreement with PyTorch.

    python bench/models.py                      # the table in docs/benchmarks.md (about 30 minutes on 2 cores)
    python bench/models.py --quick              # 3 small models at 64 px, fewer rounds (a few minutes)

Figures are per machine: the CPU model and flags are recorded with them. Untrained weights: latency, MACs and
pruning cost do not depend on training; accuracy is not measured here.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import Results, interleaved_latency, log, result_header

FAMILIES = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2_x0_5", "squeezenet1_0",
            "densenet121", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny"]
QUICK = ["resnet18", "mobilenet_v3_small", "squeezenet1_0"]
LASSO_MODELS = ["resnet18", "mobilenet_v2"]  # LASSO on all ten would take hours here
NUM_CLASSES = 10
TARGET_MACS_RATIO = 0.5
LOWEST_KEEP_RATIO = 0.3
ROUND_TO = 8
LASSO_BATCHES, LASSO_BATCH_SIZE = 10, 32  # channel_pruning's num_batches; 320 images sampled per layer
PARITY_IMAGES, CALIBRATION_IMAGES = 128, 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"torchvision names (default: {FAMILIES})")
    parser.add_argument("--side", type=int, default=96, help="input height and width in pixels")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds, the models interleaved")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model and round")
    parser.add_argument("--lasso-models", nargs="*", default=LASSO_MODELS,
                        help="the models whose LASSO pruning is timed (minutes each on 2 cores)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} at 64 px, 3 rounds of 20")
    parser.add_argument("--out", type=Path, default=Path("bench/results/models.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.side, args.rounds, args.repeats = args.models or QUICK, 64, 3, 20
        args.lasso_models = [m for m in args.lasso_models if m in args.models]
    models = args.models or FAMILIES
    results = Results(args.out, {**result_header("models.py", argv, args), "cpu": cpu_description(), "models": []})
    for name in models:
        log(f"{name}: start")
        row = measure(name, args)
        results.data["models"].append(row)
        results.save()
        log(f"{name}: {summary_line(row)}")
    print(markdown_table(results.data["models"], args.side))
    print(f"\nwritten: {args.out}")
    return 0


def cpu_description() -> dict[str, str]:
    """``lscpu``'s model name and the instruction-set flags that change INT8 and alignment results."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return {"model_name": fields.get("Model name", "").strip(), "flags": " ".join(f for f in wanted if f in flags)}


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pf_ray.config import ModelConfig
    from pf_ray.export.int8 import quantize_onnx_int8
    from pf_ray.export.onnx import export_onnx
    from pf_ray.export.verify import MAX_ABS_DIFF, TOP1_AGREEMENT, agreement, onnx_session
    from pf_ray.metrics import model_stats
    from pf_ray.models import build_model
    from pf_ray.models.torchvision_models import example_input_shape
    from pf_ray.ops.macs_budget import macs_table, uniform_keep_ratio, without_groups
    from pf_ray.ops.pruning import prune_channels_
    from pf_ray.ops.safe_pruning import unsafe_groups

    shape = example_input_shape(name, args.side)
    torch.manual_seed(0)
    model = build_model(ModelConfig(f"torchvision:{name}"), in_channels=shape[0], num_classes=NUM_CLASSES,
                        input_shape=shape)
    calibrate_batch_norm_(model, shape)
    groups = macs_table(model, shape).names
    started = time.perf_counter()
    skipped = unsafe_groups(model, shape, LOWEST_KEEP_RATIO, ROUND_TO)
    check_seconds = time.perf_counter() - started
    skipped_names = {group.name for group in skipped}
    ratio = uniform_keep_ratio(without_groups(macs_table(model, shape), skipped_names), TARGET_MACS_RATIO, ROUND_TO,
                               LOWEST_KEEP_RATIO)
    ratios = {g: ratio for g in groups if g not in skipped_names}

    pruned = copy.deepcopy(model)
    started = time.perf_counter()
    kept = prune_channels_(pruned, shape, ratios, round_to=ROUND_TO, criterion="l1")
    l1_seconds = time.perf_counter() - started
    lasso = lasso_seconds(model, shape, ratios, kept) if name in args.lasso_models else None

    before, after = model_stats(model, shape), model_stats(pruned, shape)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(PARITY_IMAGES, *shape, generator=generator)
    calibration = torch.randn(CALIBRATION_IMAGES, *shape, generator=generator)
    with tempfile.TemporaryDirectory() as work:
        paths = {}
        for label, network in (("before", model), ("after", pruned)):
            paths[f"{label} fp32"] = export_onnx(network, shape, Path(work) / f"{label}.onnx")
            paths[f"{label} int8"] = quantize_onnx_int8(paths[f"{label} fp32"], Path(work) / f"{label}.int8.onnx",
                                                        calibration)
        sessions = {label: onnx_session(path, threads=1) for label, path in paths.items()}
        parity = agreement(pruned, sessions["after fp32"], images)
        int8_parity = agreement(pruned, sessions["after int8"], images)
        medians, _ = interleaved_latency(sessions, {label: [1] for label in sessions}, shape, rounds=args.rounds,
                                         repeats=args.repeats)
    latency = {label: round(medians[label]["1"], 4) for label in sessions}
    return {
        "model": name, "input_shape": list(shape), "groups": len(groups),
        "skipped": [{"name": g.name, "reason": g.reason} for g in skipped], "safety_check_seconds": round(check_seconds, 1),
        "keep_ratio": ratio, "macs_before": before.macs, "macs_after": after.macs,
        "params_before": before.params, "params_after": after.params,
        "l1_seconds": round(l1_seconds, 2), "lasso": lasso, "latency_ms": latency,
        "speedup_fp32": round(latency["before fp32"] / latency["after fp32"], 3),
        "speedup_int8": round(latency["before int8"] / latency["after int8"], 3),
        "top1_agreement": parity[TOP1_AGREEMENT], "max_abs_diff": parity[MAX_ABS_DIFF],
        "int8_top1_agreement": int8_parity[TOP1_AGREEMENT],
    }


def lasso_seconds(model: Any, shape: tuple[int, int, int], ratios: dict[str, float],
                  expected: dict[str, int]) -> dict[str, Any]:
    """LASSO pruning of ``model`` at ``ratios`` (with reconstruction), timed as a search's first trial (nothing
    shared yet: a fresh feature cache) and as a later one (the second call of the same search), for each feature
    source (``prune_channels_``'s ``features``); the counts must be those L1 kept."""
    import os

    import torch

    from pf_ray.ops.pruning import prune_channels_

    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(LASSO_BATCH_SIZE, *shape, generator=generator) for _ in range(LASSO_BATCHES)]
    timings: dict[str, Any] = {}
    for features in ("pruned", "baseline"):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PF_RAY_FEATURE_CACHE"] = cache  # the first trial of a new search finds nothing
            times = []
            for trial in (1, 2):
                candidate, costs = copy.deepcopy(model), {}
                started = time.perf_counter()
                kept = prune_channels_(candidate, shape, ratios, round_to=ROUND_TO, criterion="lasso",
                                       batches=batches, features=features, costs=costs)
                times.append(time.perf_counter() - started)
                log(f"  LASSO features={features} trial {trial}: {times[-1]:.1f} s {costs}")
                if kept != expected:
                    raise RuntimeError(f"LASSO kept {kept}; L1 kept {expected}")
            timings[features] = {"first_seconds": round(times[0], 1), "later_seconds": round(times[1], 1)}
    os.environ.pop("PF_RAY_FEATURE_CACHE", None)
    return timings


def calibrate_batch_norm_(model: Any, shape: tuple[int, int, int]) -> None:
    """Batch-norm statistics from one batch of 16 random images (an untrained deep model's activations otherwise
    shrink towards zero and every image gets the same logits); the model is left in eval mode."""
    import torch
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(16, *shape, generator=torch.Generator().manual_seed(2)))
    model.eval()


def summary_line(row: dict[str, Any]) -> str:
    return (f"MACs {row['macs_before'] / 1e6:.0f}M -> {row['macs_after'] / 1e6:.0f}M, "
            f"{len(row['skipped'])}/{row['groups']} groups unpruned, FP32 {row['speedup_fp32']}x, "
            f"INT8 {row['speedup_int8']}x")


def markdown_table(rows: list[dict[str, Any]], side: int) -> str:
    header = ("| model | input | MACs before -> after | params before -> after | groups left unpruned | "
              "pruning s: L1 / LASSO first, later (exact) / later (baseline features) | ORT FP32 ms before -> after | ORT INT8 ms before -> after | "
              "top-1 agreement FP32 / INT8 | max logit diff |")
    lines = [header, "|" + "---|" * 10]
    for row in rows:
        lasso = row["lasso"]
        cost = f"{row['l1_seconds']:.1f} / " + (
            f"{lasso['pruned']['first_seconds']:.0f}, {lasso['pruned']['later_seconds']:.0f} / "
            f"{lasso['baseline']['later_seconds']:.0f}" if lasso else "not timed")
        ms = row["latency_ms"]
        lines.append(
            f"| {row['model']} | {row['input_shape'][1]}x{row['input_shape'][2]} | "
            f"{row['macs_before'] / 1e6:.0f}M -> {row['macs_after'] / 1e6:.0f}M "
            f"({row['macs_after'] / row['macs_before']:.2f}) | "
            f"{row['params_before'] / 1e6:.2f}M -> {row['params_after'] / 1e6:.2f}M | "
            f"{len(row['skipped'])} of {row['groups']} | {cost} | "
            f"{ms['before fp32']:.2f} -> {ms['after fp32']:.2f} ({row['speedup_fp32']:.2f}x) | "
            f"{ms['before int8']:.2f} -> {ms['after int8']:.2f} ({row['speedup_int8']:.2f}x) | "
            f"{row['top1_agreement']:.3f} / {row['int8_top1_agreement']:.3f} | {row['max_abs_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
