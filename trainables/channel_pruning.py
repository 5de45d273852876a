"""Ray Tune trainable: channel pruning (one trial = one candidate set of per-layer keep ratios)."""

from __future__ import annotations

from typing import Any

from pf_ray.spec import RunSpec
from trainables.trial import run_trial


def channel_pruning(config: dict[str, Any], *, spec: RunSpec, baseline_checkpoint: str | bytes) -> None:
    run_trial("channel_pruning", config, spec=spec, baseline_checkpoint=baseline_checkpoint)
