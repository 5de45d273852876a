"""What the searchers search: one value per layer (or channel group) in a box, under the learner's budget.

Each learner with a per-layer search describes its own ``PerLayerSpace`` (the config field the values fill, the
layers' names and features, the box, the budget); searchers see only this, never the learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from pf_ray.metrics import layer_table

# How per-layer values appear in a Tune config: flat keys (nested spaces break HyperOpt's initial points).
LAYER_KEY = "layer_{:02d}"


class Budget(Protocol):
    """What a per-layer vector costs as a fraction of the baseline (e.g. of its MACs), and the allowed fraction."""

    target: float

    def cost(self, values: Sequence[float]) -> float: ...


# Columns of PerLayerSpace.features (the static part of the DDPG agent's per-layer state).
LAYER_FEATURES = ("index", "channels", "in_channels", "kernel", "stride", "output_positions", "macs")


@dataclass(frozen=True)
class PerLayerSpace:
    """What the searchers search for one learner: one value per layer (or channel group), in model order."""

    field: str  # the learner config's tuple field the values go into, e.g. "layer_keep_ratios"
    names: tuple[str, ...]  # readable layer/group names, for reports
    low: float
    high: float
    budget: Budget | None = None  # None: the learner has no budget to respect
    features: tuple[tuple[float, ...], ...] = ()  # per layer, columns LAYER_FEATURES (raw, not normalised)

    def keys(self) -> list[str]:
        return [LAYER_KEY.format(i) for i in range(len(self.names))]

    def values_from(self, config: dict[str, Any]) -> tuple[float, ...]:
        return tuple(float(config[key]) for key in self.keys())


def layer_features(model: nn.Module, input_shape: tuple[int, int, int],
                    names: Sequence[str]) -> tuple[tuple[float, ...], ...]:
    """One row of LAYER_FEATURES per searched layer, from the layer (conv/linear) that each name refers to."""
    rows = {layer.name: layer for layer in layer_table(model, input_shape)}
    features = []
    for index, name in enumerate(names):
        layer = rows[name]
        features.append((float(index), float(layer.out_channels), float(layer.in_channels),
                         float(layer.kernel_size[0] * layer.kernel_size[1]), float(layer.stride[0]),
                         float(layer.output_size[0] * layer.output_size[1]), float(layer.macs)))
    return tuple(features)
