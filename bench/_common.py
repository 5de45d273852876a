"""Shared helpers of the bench scripts; importing this module makes the repository's ``pf_ray`` importable."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # `python bench/x.py` puts bench/, not the repository root, on sys.path.
    sys.path.insert(0, str(REPO_ROOT))


def environment() -> dict[str, object]:
    """Where a figure was measured: versions, processor, cores, and how busy the machine was."""
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "processor": processor(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews latency
    }


def processor() -> str:
    """The CPU's model name (Linux), else whatever the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
