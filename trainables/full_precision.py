"""Ray Tune trainable: full-precision fine-tuning (nothing to search; used for plain retraining runs)."""

from __future__ import annotations

from typing import Any

from trainables._common import run_trial


def full_precision(config: dict[str, Any], *, experiment: dict[str, Any], baseline_checkpoint: str | bytes) -> None:
    run_trial("full_precision", config, experiment=experiment, baseline_checkpoint=baseline_checkpoint)
