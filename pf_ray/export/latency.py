"""A model's batch-1 latency in FP32 ONNX Runtime on *this* machine, cached per architecture: the search's
latency-in-the-loop reward (``search.reward: latency``).

A front for ``pf_ray.latency.measure`` (one cache for every latency figure, ``pf_ray.latency.cache``): the key is
the architecture (every parameter's and buffer's name and shape, the input shape), the target (here FP32 ONNX
Runtime, ``threads`` threads, batch 1), the ONNX Runtime and torch versions, the CPU (model name and flags) and the
timing, so trials on one node, or on identical nodes, share measurements and a different CPU measures for itself.
Latency depends on what else runs on the machine: trials measured while other trials train on the same cores see
slower, noisier figures.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pf_ray.config import Precision, Runtime, TargetConfig
from pf_ray.latency.cache import CACHE_ENV, cache_dir
from pf_ray.latency.measure import Timing, measure_ms, measurement_key

__all__ = ["CACHE_ENV", "TIMING", "architecture_key", "cache_dir", "latency_ms"]

TIMING = Timing(warmup=20, repeats=100, rounds=1)  # the reward's timing: one model at a time


def _target(threads: int) -> TargetConfig:
    return TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.FP32, threads=threads, batch_size=1)


def architecture_key(model: nn.Module, input_shape: tuple[int, ...], threads: int) -> str:
    """The cache entry's name (without ``.json``) of ``latency_ms(model, input_shape, threads=threads)``."""
    return measurement_key(model, input_shape, _target(threads), TIMING)


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], *, threads: int = 1,
               folder: Path | None = None) -> float:
    """Median batch-1 milliseconds of ``model`` exported to ONNX, measured once per architecture and machine."""
    return measure_ms(model, input_shape, _target(threads), timing=TIMING, folder=folder)
