"""Channel pruning: remove whole channels, residual trunks included (He et al., "Channel Pruning for
Accelerating Very Deep Neural Networks", ICCV 2017; dependency groups after Fang et al., DepGraph, CVPR 2023).

Channels are chosen by the L1 norm of their filters (PocketFlow's non-LASSO option) and removed physically, so
the fine-tuned model is really smaller. Kept counts are rounded to ``round_to`` because runtimes compute in
channel blocks: unaligned counts made a 48%-MACs ResNet-20 slower than the original under ONNX Runtime.
LASSO selection with least-squares reconstruction (He et al.) is a later ``criterion``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pf_ray.config import check_choice, check_range
from pf_ray.data import DataBundle
from pf_ray.errors import ModelError
from pf_ray.ops.pruning import CRITERIA, prunable_groups, prune_channels_
from pf_ray.registry import LEARNERS


@dataclass(frozen=True)
class ChannelPruningConfig:
    layer_keep_ratios: tuple[float, ...] = ()  # one per prunable group, in model order; empty = uniform
    keep_ratio: float = 0.5  # used when layer_keep_ratios is empty
    round_to: int = 8  # kept channel counts are multiples of this (ONNX Runtime's x86 convs use blocks of 8)
    criterion: str = "l1"  # how channels are ranked: a key of pf_ray.ops.pruning.CRITERIA
    min_keep_ratio: float = 0.1  # the search's lower bound for every layer's keep ratio

    def __post_init__(self) -> None:
        for index, ratio in enumerate(self.layer_keep_ratios):
            check_range(f"layer_keep_ratios[{index}]", ratio, low=0.0, high=1.0, low_inclusive=False)
        check_range("keep_ratio", self.keep_ratio, low=0.0, high=1.0, low_inclusive=False)
        check_range("round_to", self.round_to, low=1)
        check_choice("criterion", self.criterion, CRITERIA)
        check_range("min_keep_ratio", self.min_keep_ratio, low=0.0, high=1.0, low_inclusive=False)


def search_dimensions(model: nn.Module, input_shape: tuple[int, int, int]) -> list[str]:
    """The names of the prunable groups: one keep ratio per name, in this order, is a ``layer_keep_ratios``."""
    return [group.name for group in prunable_groups(model, input_shape)]


@LEARNERS.register("channel_pruning", config=ChannelPruningConfig)
class ChannelPruning:
    """One-shot pruning in ``prepare``; fine-tuning then trains the smaller model as it is."""

    def __init__(self, config: ChannelPruningConfig) -> None:
        self.config = config
        self.kept_channels: dict[str, int] = {}  # group name -> channels kept, filled by prepare

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        num_groups = len(search_dimensions(model, data.input_shape))
        if num_groups == 0:
            raise ModelError(
                f"channel_pruning: the model ({type(model).__name__}) has no prunable channel group: "
                "no conv/linear layer whose outputs can be removed without changing the model's output"
            )
        ratios = self.config.layer_keep_ratios or (self.config.keep_ratio,) * num_groups
        self.kept_channels = prune_channels_(
            model, data.input_shape, ratios, round_to=self.config.round_to, criterion=self.config.criterion
        )
        return model

    def on_step(self, model: nn.Module, step: int) -> None:
        pass  # nothing to re-apply: the removed channels no longer exist

    def finalize(self, model: nn.Module) -> nn.Module:
        return model
