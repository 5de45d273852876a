"""Ray Tune trainable: weight sparsification (one trial = one candidate set of per-layer sparsities)."""

from __future__ import annotations

from typing import Any

from trainables._common import run_trial


def weight_sparsification(config: dict[str, Any], *, experiment: dict[str, Any],
                          baseline_checkpoint: str | bytes) -> None:
    run_trial("weight_sparsification", config, experiment=experiment, baseline_checkpoint=baseline_checkpoint)
