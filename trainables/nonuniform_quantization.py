"""Ray Tune trainable: trained-codebook quantization (one trial = one candidate set of per-layer bit widths)."""

from __future__ import annotations

from typing import Any

from trainables.trial import TrialSetup, run_trial


def nonuniform_quantization(config: dict[str, Any], *, setup: TrialSetup) -> None:
    run_trial("nonuniform_quantization", config, setup)
