"""What every learner is: a frozen config dataclass plus a class with three hooks (registered by name)."""

from __future__ import annotations

from typing import Protocol

from torch import nn

from pf_ray.data import DataBundle


class Learner(Protocol):
    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        """Raise, before any data is read, what ``prepare`` would raise on this model (nothing to compress, a
        per-layer list of the wrong length): ``launch.prepare`` calls it so bad input fails before the run."""

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        """Compress ``model`` before fine-tuning (e.g. prune channels); may return a new module."""

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimiser step of fine-tuning (e.g. re-apply masks); usually nothing."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Called after fine-tuning; returns the model to evaluate and export."""
