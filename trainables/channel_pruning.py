"""Ray Tune trainable: channel pruning (one trial = one candidate set of per-layer keep ratios)."""

from __future__ import annotations

from typing import Any

from trainables._common import run_trial


def channel_pruning(config: dict[str, Any], *, experiment: dict[str, Any], baseline_checkpoint: str | bytes) -> None:
    run_trial("channel_pruning", config, experiment=experiment, baseline_checkpoint=baseline_checkpoint)
