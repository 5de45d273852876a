"""A model's batch-1 latency in ONNX Runtime on *this* machine, cached per architecture: the search's
latency-in-the-loop reward (``search.reward: latency``).

The cache key is the architecture (every parameter's and buffer's name and shape, the input shape), the thread
count, the ONNX Runtime version and the machine (host name and processor), so trials on one node share
measurements and a different node measures for itself. Latency depends on the machine that measures it and on
what else runs there: trials measured while other trials train on the same cores see slower, noisier figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from pf_ray.files import atomic_write

CACHE_ENV = "PF_RAY_LATENCY_CACHE"  # overrides the cache folder
WARMUP = 20
REPEATS = 100


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pf_ray" / "latency")


def architecture_key(model: nn.Module, input_shape: tuple[int, ...], threads: int) -> str:
    import onnxruntime

    shapes = [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]
    machine = (platform.node(), platform.machine(), platform.processor())
    text = json.dumps([shapes, list(input_shape), threads, onnxruntime.__version__, machine])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], *, threads: int = 1,
               folder: Path | None = None) -> float:
    """Median batch-1 milliseconds of ``model`` exported to ONNX, measured once per architecture and machine."""
    from pf_ray.export.onnx import export_onnx
    from pf_ray.export.verify import measure_latency, onnx_session

    folder = folder or cache_dir()
    entry = folder / f"{architecture_key(model, input_shape, threads)}.json"
    try:
        return float(json.loads(entry.read_text())["median_ms"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not measured yet (or a damaged entry): measure
    with tempfile.TemporaryDirectory(prefix="pf_ray_latency_") as work:
        path = export_onnx(model, input_shape, Path(work) / "candidate.onnx")
        previous = torch.get_num_threads()
        try:
            timed = measure_latency(onnx_session(path, threads=threads), input_shape, 1, warmup=WARMUP,
                                    repeats=REPEATS)
        finally:
            torch.set_num_threads(previous)
    # concurrent trials may both measure; either result is a valid entry
    atomic_write(entry, json.dumps({"median_ms": timed["median_ms"], "p95_ms": timed["p95_ms"]}))
    return float(timed["median_ms"])
