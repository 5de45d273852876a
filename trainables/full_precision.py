"""Ray Tune trainable: full-precision fine-tuning (nothing to search; used for plain retraining runs)."""

from __future__ import annotations

from typing import Any

from pf_ray.spec import RunSpec
from trainables.trial import run_trial


def full_precision(config: dict[str, Any], *, spec: RunSpec, baseline_checkpoint: str | bytes) -> None:
    run_trial("full_precision", config, spec=spec, baseline_checkpoint=baseline_checkpoint)
