"""Ray Tune trainable: trained-codebook quantization (one trial = one candidate set of per-layer bit widths)."""

from __future__ import annotations

from typing import Any

from pf_ray.spec import RunSpec
from trainables.trial import run_trial


def nonuniform_quantization(config: dict[str, Any], *, spec: RunSpec, baseline_checkpoint: str | bytes) -> None:
    run_trial("nonuniform_quantization", config, spec=spec, baseline_checkpoint=baseline_checkpoint)
