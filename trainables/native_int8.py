"""Ray Tune trainable: the framework's own INT8 path, pt2e + ExecuTorch (nothing per layer to search)."""

from __future__ import annotations

from typing import Any

from trainables._common import run_trial


def native_int8(config: dict[str, Any], *, experiment: dict[str, Any],
                baseline_checkpoint: str | bytes) -> None:
    run_trial("native_int8", config, experiment=experiment, baseline_checkpoint=baseline_checkpoint)
