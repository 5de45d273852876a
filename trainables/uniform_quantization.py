"""Ray Tune trainable: uniform quantization-aware training (one trial = one candidate set of per-layer bit widths)."""

from __future__ import annotations

from typing import Any

from trainables.trial import TrialSetup, run_trial


def uniform_quantization(config: dict[str, Any], *, setup: TrialSetup) -> None:
    run_trial("uniform_quantization", config, setup)
