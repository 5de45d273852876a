"""LASSO channel pruning's cost per search trial: the first trial (which computes what depends on the baseline
alone) and the later ones (which read it: pf_ray.ops.feature_cache), for torchvision ResNet-18 and MobileNet-v2
at 3x32x32 and 3x96x96, with each feature source (``learner.options.features``: "pruned", He et al.'s sequential
reconstruction; "baseline", every group on the baseline's features).

Each trial prunes a fresh copy of the same (untrained, seeded) baseline with the learner's ``prepare``: uniform keep
ratios 0.5, 0.4, 0.6, ... (a different candidate each time), ``num_batches`` x 64 synthetic images. Between trials
the in-process cache is cleared, as a search trial runs in its own process: a later trial reads the disk cache
(a fresh folder per model, resolution and source). Prints the CPU model (lscpu's "Model name"), the load average
and one line per trial: seconds, and the split (shared baseline features, own sampling, selection, refit).

    python bench/lasso_cost.py                 # the figures of the report (about 20 minutes on 2 cores)
    python bench/lasso_cost.py --quick         # MobileNet-v2 at 3x32x32, 2 batches, 2 trials
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import os
import subprocess
import tempfile
import time
from contextlib import redirect_stdout

import _common  # noqa: F401  (first: puts the repository root on sys.path)
import torch
from torch.utils.data import TensorDataset

from pf_ray.config import ModelConfig
from pf_ray.data import DataBundle
from pf_ray.learners.channel_pruning import ChannelPruning, ChannelPruningConfig
from pf_ray.models import build_model

RATIOS = (0.5, 0.4, 0.6, 0.45, 0.55)


def cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("Model name")),
                "unknown")


def synthetic(size: int, images: int) -> DataBundle:
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(images, 3, size, size, generator=generator),
                            torch.randint(0, 10, (images,), generator=generator))
    return DataBundle(name="synthetic", train=dataset, validation=dataset, test=dataset, input_shape=(3, size, size),
                      num_classes=10, mean=(0.0,) * 3, std=(1.0,) * 3)


def trial(baseline: torch.nn.Module, data: DataBundle, ratio: float, num_batches: int,
          features: str | None) -> tuple[float, str]:
    """One candidate pruned from a copy of ``baseline``: seconds, and the learner's cost line."""
    options = {"mode": "uniform", "keep_ratio": ratio, "round_to": 8, "criterion": "lasso",
               "num_batches": num_batches}
    if features is not None:
        options["features"] = features
    learner = ChannelPruning(ChannelPruningConfig(**options))
    model = copy.deepcopy(baseline)
    output = io.StringIO()
    start = time.perf_counter()
    with redirect_stdout(output):
        learner.prepare(model, data)
    seconds = time.perf_counter() - start
    line = next((line for line in output.getvalue().splitlines() if "LASSO pruning" in line), "")
    return seconds, line.removeprefix("channel_pruning: ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MobileNet-v2 at 3x32x32, 2 batches, 2 trials")
    parser.add_argument("--models", nargs="+", default=["torchvision_resnet18", "torchvision_mobilenet_v2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 96])
    parser.add_argument("--features", nargs="+", default=["pruned", "baseline"])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--num-batches", type=int, default=10, help="the learner's default: 10 batches of 64")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes, args.trials, args.num_batches = ["torchvision_mobilenet_v2"], [32], 2, 2
    torch.set_num_threads(args.threads)
    has_features = any(field.name == "features" for field in dataclasses.fields(ChannelPruningConfig))
    if not has_features:  # the code before the feature cache: its one path
        args.features = [None]
    print(f"CPU: {cpu_model()}; torch threads: {args.threads}; load average at start: {os.getloadavg()[0]:.1f}")
    if has_features:
        from pf_ray.ops import feature_cache

    for name in args.models:
        for size in args.sizes:
            torch.manual_seed(0)
            baseline = build_model(ModelConfig(name), in_channels=3, num_classes=10).eval()
            data = synthetic(size, 64 * args.num_batches)
            for features in args.features:
                with tempfile.TemporaryDirectory() as folder:
                    os.environ["PF_RAY_FEATURE_CACHE"] = folder
                    if has_features:
                        feature_cache.clear_memory()
                    times = []
                    for index in range(args.trials):
                        seconds, line = trial(baseline, data, RATIOS[index % len(RATIOS)], args.num_batches,
                                              features)
                        times.append(seconds)
                        print(f"{name} 3x{size}x{size} features={features} trial {index + 1}: {seconds:.1f} s  "
                              f"{line}", flush=True)
                        if has_features:
                            feature_cache.clear_memory()  # the next trial runs in another process
                    later = sum(times[1:]) / max(len(times) - 1, 1)
                    print(f"{name} 3x{size}x{size} features={features}: first {times[0]:.1f} s, later (mean) "
                          f"{later:.1f} s, later/first {later / times[0]:.2f}; load average "
                          f"{os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
