"""Artifacts verified on aarch64 kernels: the ARM builds of ONNX Runtime and ExecuTorch (XNNPACK), run under
user-mode emulation (qemu-aarch64).

Integer kernels differ between architectures (rounding, dot-product paths), so an INT8 model that agrees on x86 may
not agree on ARM. ``ensure_environment`` builds the emulated environment into a cache folder (``python -m
pf_ray.aarch64``, ``make aarch64``); ``run_on_aarch64`` runs one artifact on a batch of images there;
``verify_on_aarch64`` reports its accuracy and top-1 agreement with the x86 runtime (and with PyTorch) on the same
images, e.g. a subset of the test set. Emulation is 80-400x slower than native: the numbers are accuracy and
agreement, never latency.
"""

from __future__ import annotations

from pf_ray.aarch64.environment import Aarch64Environment, cache_dir, ensure_environment, find_environment
from pf_ray.aarch64.run import (
    ARCH,
    DEFAULT_CPU,
    Aarch64Report,
    CpuModel,
    cpu_model,
    run_on_aarch64,
    verify_on_aarch64,
)

__all__ = [
    "ARCH",
    "DEFAULT_CPU",
    "Aarch64Environment",
    "Aarch64Report",
    "CpuModel",
    "cache_dir",
    "cpu_model",
    "ensure_environment",
    "find_environment",
    "run_on_aarch64",
    "verify_on_aarch64",
]
