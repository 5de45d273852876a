"""A model's latency on *this* machine, cached per architecture: the search's latency-in-the-loop reward
(``search.reward: latency``) measures each candidate on the deployment target (``target``: runtime, precision,
threads, batch size); ``latency_ms`` is the FP32 ONNX Runtime batch-1 figure.

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

from pf_ray.config import Budget, ExperimentConfig, Precision, Runtime, TargetConfig
from pf_ray.latency.cache import CACHE_ENV, cache_dir
from pf_ray.latency.measure import Timing, measure_ms, measurement_key, reference_ms

__all__ = ["CACHE_ENV", "TIMING", "architecture_key", "cache_dir", "latency_ms", "reward_latency"]

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


def reward_latency(model: nn.Module, baseline: nn.Module, input_shape: tuple[int, ...],
                   experiment: ExperimentConfig, *, folder: Path | None = None) -> tuple[float, float]:
    """(the candidate's latency, the latency it should have), both on the deployment target on this machine:
    with a latency budget the unpruned model's FP32 ONNX Runtime latency over ``search.target_speedup``, else
    ``search.target_macs_ratio`` times the unpruned model's latency on the target."""
    target, search = experiment.target, experiment.search
    candidate = measure_ms(model, input_shape, target, timing=TIMING, folder=folder)
    if search.budget is Budget.LATENCY:
        (speedup,) = search.speedups  # each search of a Pareto set has one target
        return candidate, reference_ms(baseline, input_shape, target, timing=TIMING, folder=folder) / speedup
    return candidate, search.macs_ratio * measure_ms(baseline, input_shape, target, timing=TIMING, folder=folder)
