"""Ray Tune trainable: full-precision fine-tuning (nothing to search; used for plain retraining runs)."""

from __future__ import annotations

from typing import Any

from trainables.trial import TrialSetup, run_trial


def full_precision(config: dict[str, Any], *, setup: TrialSetup) -> None:
    run_trial("full_precision", config, setup)
