"""Ray Tune trainable: weight sparsification (one trial = one candidate set of per-layer sparsities)."""

from __future__ import annotations

from typing import Any

from pf_ray.spec import RunSpec
from trainables.trial import run_trial


def weight_sparsification(config: dict[str, Any], *, spec: RunSpec, baseline_checkpoint: str | bytes) -> None:
    run_trial("weight_sparsification", config, spec=spec, baseline_checkpoint=baseline_checkpoint)
