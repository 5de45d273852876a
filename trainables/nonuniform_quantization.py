"""Ray Tune trainable: trained-codebook quantization (one trial = one candidate set of per-layer bit widths)."""

from __future__ import annotations

from typing import Any

from trainables._common import run_trial


def nonuniform_quantization(config: dict[str, Any], *, experiment: dict[str, Any],
                            baseline_checkpoint: str | bytes) -> None:
    run_trial("nonuniform_quantization", config, experiment=experiment, baseline_checkpoint=baseline_checkpoint)
