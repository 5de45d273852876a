"""Ray Tune trainable: weight sparsification (one trial = one candidate set of per-layer sparsities)."""

from __future__ import annotations

from typing import Any

from trainables.trial import TrialSetup, run_trial


def weight_sparsification(config: dict[str, Any], *, setup: TrialSetup) -> None:
    run_trial("weight_sparsification", config, setup)
