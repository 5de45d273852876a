"""The one latency cache: measured figures (a model on a target) and fitted latency tables, as JSON files keyed by
everything that changes the figure.

A key is the SHA-256 of a JSON list of its parts: the architecture (every parameter's and buffer's name and
shape, the input shape), the target (runtime, precision, threads, batch size), the versions of the runtime and of
the exporter (torch), the CPU (model name and instruction-set flags, not the host name: identical nodes of a
cluster share their figures) and the timing settings; a table adds the settings that built it. Entries are written
atomically (``pf_ray.files.atomic_write``); an entry that cannot be read back whole is measured again.
``PF_RAY_LATENCY_CACHE`` overrides the folder (default ``~/.cache/pf_ray/latency``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pf_ray.config import Runtime, TargetConfig
from pf_ray.files import atomic_write

CACHE_ENV = "PF_RAY_LATENCY_CACHE"  # overrides the cache folder
# Bumped when the way a figure is produced changes (exporter settings, quantizer, timing procedure).
KEY_VERSION = 2
# The instruction-set flags that decide which kernels a runtime picks; recorded beside every figure.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm")


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pf_ray" / "latency")


@functools.cache
def cpu() -> tuple[str, str]:
    """The CPU's model name and its full flag list (Linux: /proc/cpuinfo, x86 ``flags`` or ARM ``Features``);
    elsewhere what the platform module knows, with no flags."""
    name = flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            field = field.strip().lower()
            if field in ("model name", "hardware", "cpu part") and not name:
                name = value.strip()
            elif field in ("flags", "features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def cpu_summary() -> dict[str, Any]:
    """The CPU's model name and which of ``KERNEL_FLAGS`` it has: what a figure should be reported with."""
    name, flags = cpu()
    present = set(flags.split())
    return {"model_name": name, "machine": platform.machine(),
            "kernel_flags": [flag for flag in KERNEL_FLAGS if flag in present]}


def runtime_version(runtime: Runtime) -> str:
    if runtime is Runtime.EXECUTORCH:
        try:
            return "executorch " + importlib.metadata.version("executorch")
        except importlib.metadata.PackageNotFoundError:
            return "executorch (not installed)"
    import onnxruntime

    return "onnxruntime " + onnxruntime.__version__


def architecture(model: nn.Module, input_shape: Sequence[int]) -> list[Any]:
    """What of a model decides its latency: every parameter's and buffer's name and shape, and the input shape
    (weights' values do not)."""
    return [[[name, list(tensor.shape)] for name, tensor in model.state_dict().items()], list(input_shape)]


def target_parts(target: TargetConfig) -> list[Any]:
    """The target and everything about this machine and installation that changes its figures."""
    name, flags = cpu()
    return [str(target.runtime), str(target.precision), target.threads, target.batch_size,
            runtime_version(target.runtime), "torch " + torch.__version__, name, flags, KEY_VERSION]


def cache_key(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_entry(path: Path, field: str) -> Any | None:
    """``field`` of the JSON entry at ``path``; None when there is none or it is damaged (then: measure again)."""
    try:
        value = json.loads(path.read_text())[field]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value


def write_entry(path: Path, payload: dict[str, Any]) -> None:
    # Concurrent trials may both measure: either result is a valid entry, and a reader never sees half a file.
    atomic_write(path, json.dumps(payload))
