"""A model's latency on a deployment target, measured: exported with pf-ray's own exporters to the target's artifact
(FP32 or INT8 QDQ ONNX, FP32 or INT8 ExecuTorch XNNPACK), opened on its runtime with the target's threads, and
timed on a batch of ``target.batch_size`` inputs.

Timing: ``rounds`` rounds; in each, every model measured together runs ``warmup`` untimed then ``repeats`` timed
batches (the models in a shuffled order); a model's figure is the median over rounds of its rounds' medians. Models
timed together are interleaved, so a change of load on the machine (other processes on shared cores) hits them
alike: compare only figures measured side by side.

Weights' values do not change latency, and INT8 calibration ranges do not either: INT8 artifacts are calibrated
on fixed random inputs unless calibration images are given.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pf_ray.config import Precision, Runtime, TargetConfig
from pf_ray.errors import ExportError
from pf_ray.latency import cache

Log = Callable[[str], None]
CALIBRATION_IMAGES = 16  # random calibration inputs for INT8 artifacts (ranges do not change latency)


@dataclass(frozen=True)
class Timing:
    """How a figure is timed (part of every cache key)."""

    warmup: int = 10  # untimed runs before each round's timed runs
    repeats: int = 40  # timed runs per round
    rounds: int = 5  # rounds; models measured together are interleaved within each

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.rounds < 1:
            raise ExportError(f"timing: got {self}; expected warmup >= 0, repeats >= 1 and rounds >= 1")


def fixed_inputs(input_shape: Sequence[int], count: int, seed: int = 0) -> np.ndarray:
    """The same random float32 inputs on every call (every model is timed on identical inputs)."""
    return np.random.default_rng(seed).standard_normal((count, *input_shape), dtype=np.float32)


def export_artifact(model: nn.Module, input_shape: Sequence[int], target: TargetConfig, folder: str | Path, *,
                    stem: str = "model", calibration: torch.Tensor | None = None,
                    fp32_layers: Sequence[str] = ()) -> Path:
    """``model`` written as the target's artifact under ``folder``: ``<stem>.onnx``, ``<stem>.int8.onnx``,
    ``<stem>.pte`` or ``<stem>.int8.pte`` (ExecuTorch programs with a fixed batch of ``target.batch_size``).

    ``fp32_layers``: module names (``model.named_modules()``) whose convolutions and linear layers an INT8
    artifact keeps in FP32; an FP32 target ignores them (everything is FP32)."""
    from pf_ray.export.onnx import export_onnx

    folder, shape = Path(folder), tuple(input_shape)
    int8 = target.precision is Precision.INT8
    if int8 and calibration is None:
        calibration = torch.from_numpy(fixed_inputs(shape, CALIBRATION_IMAGES, seed=1))
    if target.runtime is Runtime.EXECUTORCH:
        from pf_ray.export.executorch_pte import export_pte

        path = folder / (f"{stem}.int8.pte" if int8 else f"{stem}.pte")
        return export_pte(model, shape, path, calibration=calibration if int8 else None,
                          batch_size=target.batch_size, fp32_layers=fp32_layers)
    fp32 = export_onnx(model, shape, folder / f"{stem}.onnx")
    if not int8:
        return fp32
    from pf_ray.export.int8 import quantize_onnx_int8

    return quantize_onnx_int8(fp32, folder / f"{stem}.int8.onnx", calibration, batch_size=len(calibration),
                              fp32_layers=fp32_layers)


def open_artifact(path: str | Path, threads: int) -> Any:
    """The artifact on its own runtime (ExecuTorch for ``.pte``, else ONNX Runtime) with ``threads`` threads."""
    from pf_ray.export import verify

    return verify.open_session(path, threads=threads)


def time_sessions(sessions: Sequence[Any], input_shape: Sequence[int], batch_size: int, timing: Timing, *,
                  log: Log | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Every session timed on one fixed batch, interleaved over ``timing.rounds`` rounds: per session its median
    (ms) and each round's median."""
    feeds = [{s.get_inputs()[0].name: fixed_inputs(input_shape, batch_size)} for s in sessions]
    rounds: list[list[float]] = [[] for _ in sessions]
    order = np.random.default_rng(seed)
    previous_threads = torch.get_num_threads()
    try:
        for round_index in range(timing.rounds):
            for index in order.permutation(len(sessions)):
                session, feed = sessions[index], feeds[index]
                for _ in range(timing.warmup):
                    session.run(None, feed)
                seconds = np.empty(timing.repeats)
                for repeat in range(timing.repeats):
                    start = time.perf_counter()
                    session.run(None, feed)
                    seconds[repeat] = time.perf_counter() - start
                rounds[index].append(float(np.median(seconds)) * 1e3)
            if log is not None and len(sessions) > 1:
                log(f"  timed round {round_index + 1}/{timing.rounds} of {len(sessions)} models")
    finally:
        torch.set_num_threads(previous_threads)
    return [{"median_ms": statistics.median(values), "rounds_ms": values} for values in rounds]


def measure_models(models: Sequence[nn.Module], input_shape: Sequence[int], target: TargetConfig, *,
                   timing: Timing = Timing(), log: Log | None = None) -> list[float]:
    """Median milliseconds of each model on the target, all timed side by side (not cached: each figure is only
    comparable with the others of the same call)."""
    with tempfile.TemporaryDirectory(prefix="pf_ray_latency_") as work:
        sessions = []
        for index, model in enumerate(models):
            path = export_artifact(model, input_shape, target, work, stem=f"candidate{index}")
            sessions.append(open_artifact(path, target.threads))
        timed = time_sessions(sessions, input_shape, target.batch_size, timing, log=log)
        del sessions  # closes them before their files go
    return [t["median_ms"] for t in timed]


def measurement_key(model: nn.Module, input_shape: Sequence[int], target: TargetConfig, timing: Timing) -> str:
    """The cache key of one model's figure on one target (see ``pf_ray.latency.cache``)."""
    return cache.cache_key("measurement", cache.architecture(model, input_shape), cache.target_parts(target),
                           asdict(timing))


def measure_ms(model: nn.Module, input_shape: Sequence[int], target: TargetConfig, *, timing: Timing = Timing(),
               folder: str | Path | None = None) -> float:
    """Median milliseconds of a batch of ``target.batch_size`` inputs through ``model`` on the target, measured
    once per architecture, target, runtime version, CPU and timing (then read from the cache)."""
    entry = Path(folder or cache.cache_dir()) / f"{measurement_key(model, input_shape, target, timing)}.json"
    cached = cache.read_entry(entry, "median_ms")
    if isinstance(cached, int | float) and cached > 0:
        return float(cached)
    (timed,) = _measure_one(model, input_shape, target, timing)
    cache.write_entry(entry, {"median_ms": timed["median_ms"], "rounds_ms": timed["rounds_ms"],
                              "target": {k: str(v) for k, v in asdict(target).items()},
                              "cpu": cache.cpu_summary(), "runtime": cache.runtime_version(target.runtime)})
    return float(timed["median_ms"])


def reference_target(target: TargetConfig) -> TargetConfig:
    """FP32 ONNX Runtime with the target's threads and batch size: the speed-up's denominator."""
    return replace(target, runtime=Runtime.ONNXRUNTIME, precision=Precision.FP32)


def reference_ms(model: nn.Module, input_shape: Sequence[int], target: TargetConfig, *, timing: Timing = Timing(),
                 folder: str | Path | None = None) -> float:
    """The FP32 ONNX Runtime latency of ``model`` with the target's threads and batch size (cached)."""
    return measure_ms(model, input_shape, reference_target(target), timing=timing, folder=folder)


def _measure_one(model: nn.Module, input_shape: Sequence[int], target: TargetConfig,
                 timing: Timing) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="pf_ray_latency_") as work:
        session = open_artifact(export_artifact(model, input_shape, target, work), target.threads)
        return time_sessions([session], input_shape, target.batch_size, timing)
