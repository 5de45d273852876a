"""Ray Tune trainable: the framework's own INT8 path, pt2e + ExecuTorch (nothing per layer to search)."""

from __future__ import annotations

from typing import Any

from trainables.trial import TrialSetup, run_trial


def native_int8(config: dict[str, Any], *, setup: TrialSetup) -> None:
    run_trial("native_int8", config, setup)
