"""Ray Tune trainable: channel pruning (one trial = one candidate set of per-layer keep ratios)."""

from __future__ import annotations

from typing import Any

from trainables.trial import TrialSetup, run_trial


def channel_pruning(config: dict[str, Any], *, setup: TrialSetup) -> None:
    run_trial("channel_pruning", config, setup)
