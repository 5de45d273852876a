"""Ray Tune trainable: the framework's own INT8 path, pt2e + ExecuTorch (nothing per layer to search)."""

from __future__ import annotations

from typing import Any

from pf_ray.spec import RunSpec
from trainables.trial import run_trial


def native_int8(config: dict[str, Any], *, spec: RunSpec, baseline_checkpoint: str | bytes) -> None:
    run_trial("native_int8", config, spec=spec, baseline_checkpoint=baseline_checkpoint)
