"""Ray Tune trainable: discrimination-aware channel pruning (uniform keep ratio; nothing per layer to search)."""

from __future__ import annotations

from typing import Any

from pf_ray.spec import RunSpec
from trainables.trial import run_trial


def discrimination_aware_pruning(config: dict[str, Any], *, spec: RunSpec, baseline_checkpoint: str | bytes) -> None:
    run_trial("discrimination_aware_pruning", config, spec=spec, baseline_checkpoint=baseline_checkpoint)
