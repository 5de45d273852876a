"""Full-precision training: no compression; it trains the baseline and the teacher (PocketFlow's FullPrecLearner)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pf_ray.data import DataBundle
from pf_ray.registry import LEARNERS


@dataclass(frozen=True)
class FullPrecisionConfig:
    """No options: the training schedule lives in the experiment's train sections."""


@LEARNERS.register("full_precision", config=FullPrecisionConfig)
class FullPrecision:
    def __init__(self, config: FullPrecisionConfig) -> None:
        self.config = config

    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        pass  # any model trains

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        return model

    def on_step(self, model: nn.Module, step: int) -> None:
        pass

    def finalize(self, model: nn.Module) -> nn.Module:
        return model
