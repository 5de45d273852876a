"""Ray Tune trainable: discrimination-aware channel pruning (uniform keep ratio; nothing per layer to search)."""

from __future__ import annotations

from typing import Any

from trainables._common import run_trial


def discrimination_aware_pruning(config: dict[str, Any], *, experiment: dict[str, Any],
                                 baseline_checkpoint: str | bytes) -> None:
    run_trial("discrimination_aware_pruning", config, experiment=experiment, baseline_checkpoint=baseline_checkpoint)
