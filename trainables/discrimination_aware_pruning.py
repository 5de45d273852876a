"""Ray Tune trainable: discrimination-aware channel pruning (uniform keep ratio; nothing per layer to search)."""

from __future__ import annotations

from typing import Any

from trainables.trial import TrialSetup, run_trial


def discrimination_aware_pruning(config: dict[str, Any], *, setup: TrialSetup) -> None:
    run_trial("discrimination_aware_pruning", config, setup)
