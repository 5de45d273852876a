"""What the searchers search: one value per layer (or channel group) in a box, under the learner's budget.

Each learner with a per-layer search describes its own ``PerLayerSpace`` (the config field the values fill, the
layers' names and features, the box, the budget); searchers see only this, never the learner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from torch import nn

from pf_ray.errors import ConfigError
from pf_ray.metrics import layer_table

# How per-layer values appear in a Tune config: flat keys (nested spaces break HyperOpt's initial points).
LAYER_KEY = "layer_{:02d}"


class Budget(Protocol):
    """What a per-layer vector costs as a fraction of the baseline (e.g. of its MACs), the allowed fraction, and the
    nearest vector that meets it. Plain data (no model): searchers carry it to the Ray driver."""

    target: float

    def cost(self, values: Sequence[float]) -> float: ...

    def project(self, values: Sequence[float]) -> tuple[float, ...]: ...


@runtime_checkable
class KeepsChannels(Protocol):
    """A budget over channel keep ratios (channel pruning's): the kept channel counts of a vector, per group in
    ``ops.macs_budget.macs_table``'s order, which is all a candidate's latency depends on."""

    def kept(self, values: Sequence[float]) -> list[int]:
        """One count per searched group (the groups left unpruned have no value in the vector)."""

    def counts(self, values: Sequence[float]) -> list[int]:
        """One count per group of ``macs_table``, those left unpruned (whole) included."""

    def removed(self, values: Sequence[float]) -> tuple[str, ...]:
        """The residual blocks the vector removes (a depth search's; none otherwise)."""

    def fp32(self, values: Sequence[float]) -> tuple[str, ...]:
        """The layers the vector leaves in FP32 on an INT8 target (a precision search's; none otherwise)."""


class SplitsValues(Protocol):
    """How a vector fills more than one config field (channel pruning with depth or precision,
    ``ops.depth_space.SplitFields``): the fields of a projected vector, and back (the vector of given keep ratios,
    removed blocks and FP32 layers)."""

    def fields(self, values: Sequence[float]) -> dict[str, Any]: ...

    def values(self, ratios: Sequence[float], removed: Sequence[str], fp32: Sequence[str] = ()) -> tuple[float, ...]:
        ...


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
    label: str = "value"  # what one value is, for reports: "keep ratio", "sparsity", "bits"
    # Other learner config fields the space decides, set with the values (channel pruning's round_to "auto")
    fixed: tuple[tuple[str, Any], ...] = ()
    # None: the values fill ``field``; else how they fill several fields (depth: keep ratios and removed blocks)
    split: SplitsValues | None = None

    def keys(self) -> list[str]:
        return [LAYER_KEY.format(i) for i in range(len(self.names))]

    def values_from(self, config: dict[str, Any]) -> tuple[float, ...]:
        return tuple(float(config[key]) for key in self.keys())

    def project(self, values: Sequence[float]) -> tuple[float, ...]:
        """The per-layer values the learner gets for a proposal: the nearest that meet the budget (so no candidate
        that misses it is ever scored), or the proposal itself where there is no budget."""
        if len(values) != len(self.names):
            shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
            raise ConfigError(f"learner.options.{self.field}: got {len(values)} values; expected {len(self.names)} "
                              f"(one per searched layer of this model, in order: {shown})")
        return tuple(self.budget.project(values)) if self.budget is not None else tuple(float(v) for v in values)

    def apply(self, learner_config: Any, values: Sequence[float]) -> Any:
        """``learner_config`` with the projected ``values`` in its searched field (and the ``fixed`` fields), or in
        the fields ``split`` fills."""
        projected = self.project(values)
        fields = self.split.fields(projected) if self.split is not None else {self.field: projected}
        return replace(learner_config, **dict(self.fixed), **fields)

    def recorded(self, values: Sequence[float], removed: Sequence[str] = (), fp32: Sequence[str] = ()) -> list[float]:
        """A trial's vector as the space lays it out, from what it records: its searched field's values (and, in a
        depth search, the blocks its model has removed; in a precision search, its FP32 layers)."""
        if self.split is None or len(values) == len(self.names):
            return [float(v) for v in values]
        return list(self.split.values(values, removed, fp32))


def proposal_from(config: dict[str, Any]) -> tuple[float, ...] | None:
    """A searcher's per-layer values from a trial config (keys ``layer_00``, ``layer_01``, ... in order), or None
    when it has none (a learner with nothing to search runs one trial with an empty config)."""
    values = []
    while LAYER_KEY.format(len(values)) in config:
        values.append(float(config[LAYER_KEY.format(len(values))]))
    return tuple(values) if values else None


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
