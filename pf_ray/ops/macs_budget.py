"""MACs after pruning, analytically, and the projection of a keep-ratio proposal onto a MACs budget.

The search projects every candidate onto the budget, many times per second: MACs come from a per-layer table of
(MACs, input group, output group) traced once per model, equal to those of the really pruned model.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from pf_ray.errors import ConfigError, ModelError
from pf_ray.ops.channel_groups import LayerMacs, trace_groups
from pf_ray.ops.depth_space import project_with_blocks, split_values
from pf_ray.ops.projection import Unreachable, project_keep_ratios
from pf_ray.ops.pruning import check_keep_ratios, kept_channel_count, with_whole_groups


@dataclass(frozen=True)
class MacsTable:
    """The groups' sizes and every conv/linear call: plain data, no reference to the model."""

    names: tuple[str, ...]  # prunable groups, in order
    sizes: tuple[int, ...]  # channels per prunable group
    layers: tuple[LayerMacs, ...]

    def layer_names(self) -> list[str]:
        """The conv/linear layers (module names), each once, in forward order: those a precision search may leave
        in FP32."""
        return list(dict.fromkeys(layer.name for layer in self.layers))

    def macs(self, keep_ratios: Sequence[float], round_to: int) -> int:
        kept = [kept_channel_count(n, r, round_to) for n, r in zip(self.sizes, keep_ratios, strict=True)]
        return self.macs_of_counts(kept)

    def macs_of_counts(self, kept: Sequence[int]) -> int:
        """MACs with ``kept[i]`` channels left in group i."""
        return sum(layer.macs(kept, self.sizes) for layer in self.layers)


def block_layers(table: MacsTable, block: str) -> list[int]:
    """Indices of ``table.layers`` inside the block (module ``block`` and its descendants)."""
    return [i for i, layer in enumerate(table.layers) if layer.name.startswith(f"{block}.")]


def without_blocks(table: MacsTable, removed: Collection[str]) -> MacsTable:
    """``table`` of the model with the ``removed`` blocks gone: their layers dropped, the groups those of the
    original model (names, sizes and indices), so that kept counts per original group still apply; a group whose
    layers were all in removed blocks no longer counts (``vanished_groups``).

    Raises ConfigError for a name under which the table has no layer."""
    gone: set[int] = set()
    for name in dict.fromkeys(removed):
        inside = block_layers(table, name)
        if not inside:
            raise ConfigError(f"removed block {name!r}: the model has no conv/linear layer under this name")
        gone.update(inside)
    return replace(table, layers=tuple(layer for i, layer in enumerate(table.layers) if i not in gone))


def without_groups(table: MacsTable, excluded: Collection[str]) -> MacsTable:
    """``table`` with the groups ``excluded`` left whole: gone from its names and sizes (the others keep their
    order), their layers' MACs fixed at their full channel counts. Unknown names are ignored."""
    kept = [i for i, name in enumerate(table.names) if name not in set(excluded)]
    if len(kept) == len(table.names):
        return table
    index = {old: new for new, old in enumerate(kept)}
    layers = tuple(
        replace(layer, in_members=[(index[g], c) for g, c in layer.in_members if g in index],
                out_members=[(index[g], c) for g, c in layer.out_members if g in index])
        for layer in table.layers)
    return MacsTable(tuple(table.names[i] for i in kept), tuple(table.sizes[i] for i in kept), layers)


def uniform_keep_ratio(table: MacsTable, macs_ratio: float, round_to: int, lowest: float) -> float:
    """The largest uniform keep ratio (to 0.01, at least ``lowest``) whose pruning of every group of ``table``
    leaves at most ``macs_ratio`` of its MACs; ``lowest`` when none does (groups left whole hold too many: pass
    ``without_groups(table, skipped)``)."""
    full = table.macs([1.0] * len(table.names), round_to)
    for percent in range(100, round(lowest * 100) - 1, -1):
        if table.macs([percent / 100] * len(table.names), round_to) <= macs_ratio * full:
            return percent / 100
    return lowest


@dataclass(frozen=True)
class MacsBudget:
    """Channel pruning's budget: the MACs left by per-group keep ratios (after rounding), as a fraction of the
    unpruned model's. With ``blocks`` (a depth search), a vector is the keep ratios then one value per block
    (``ops.depth_space``), and the MACs are those of the model with the removed blocks gone. Plain data (the
    table, no model): searchers carry it to the Ray driver."""

    target: float  # search.target_macs_ratio
    table: MacsTable
    round_to: int
    min_ratio: float  # no group's keep ratio below this (the search box's bottom)
    blocks: tuple[str, ...] = ()  # depth: the removable residual blocks, in forward order
    # groups left unpruned (channel pruning's excluded_groups), not in ``table``: (position among all the model's
    # groups, channels) each
    whole: tuple[tuple[int, int], ...] = ()

    def kept(self, values: Sequence[float]) -> list[int]:
        """The channels each group of ``table`` keeps with these keep ratios (what the pruned model has)."""
        ratios = split_values(values, self.blocks, self.min_ratio)[0]  # the blocks' values are not counts
        return [kept_channel_count(n, r, self.round_to) for n, r in zip(self.table.sizes, ratios, strict=True)]

    def counts(self, values: Sequence[float]) -> list[int]:
        """``kept`` for every group of the model's ``macs_table``, those left whole included."""
        return with_whole_groups(self.kept(values), self.whole)

    def removed(self, values: Sequence[float]) -> tuple[str, ...]:
        """The residual blocks a vector removes (none without ``blocks``)."""
        return split_values(values, self.blocks, self.min_ratio)[1]

    def fp32(self, values: Sequence[float]) -> tuple[str, ...]:
        """None: a layer left in FP32 does not change MACs (a precision search budgets latency)."""
        return ()

    def cost(self, values: Sequence[float]) -> float:
        return self._without(self.removed(values)).macs_of_counts(self.kept(values)) / self._full

    @functools.cached_property
    def _full(self) -> int:
        return self.table.macs_of_counts(self.table.sizes)

    @functools.cached_property
    def _tables(self) -> dict[tuple[str, ...], MacsTable]:
        return {(): self.table}  # the table without each set of removed blocks asked for so far

    def _without(self, removed: tuple[str, ...]) -> MacsTable:
        # the knapsack and the projection ask for the cost of thousands of vectors, on a few sets of removed blocks
        if removed not in self._tables:
            self._tables[removed] = without_blocks(self.table, removed)
        return self._tables[removed]

    def project(self, values: Sequence[float]) -> tuple[float, ...]:
        """``project_to_budget``: the proposal scaled (its shape kept) to spend the budget, then topped up; with
        ``blocks``, at the MACs left by its removed blocks, removing more where the budget needs it
        (``ops.depth_space.project_with_blocks``)."""
        if not self.blocks:
            return project_to_budget(self.table, values, self.target, round_to=self.round_to,
                                     min_ratio=self.min_ratio)
        full = self._full

        def width(ratios: Sequence[float], removed: tuple[str, ...]) -> tuple[float, ...]:
            return project_keep_ratios(self.table.sizes, ratios, self._without(removed).macs_of_counts,
                                       self.target * full, round_to=self.round_to, min_ratio=self.min_ratio)

        try:
            return project_with_blocks(values, self.blocks, self.min_ratio, width)
        except Unreachable as error:
            raise ConfigError(
                f"search.target_macs_ratio: got {self.target:g}; the smallest reachable with round_to="
                f"{self.round_to}, min ratio {self.min_ratio:g} and all {len(self.blocks)} removable blocks removed "
                f"is {error.smallest / full:.3f}"
            ) from None


# model -> (parameter shapes, input shape, table); a pruned or resized model gets a fresh table
_TABLES: weakref.WeakKeyDictionary[nn.Module, tuple[Any, tuple[int, ...], MacsTable]] = weakref.WeakKeyDictionary()


def macs_table(model: nn.Module, input_shape: Sequence[int]) -> MacsTable:
    """The model's MACs as a function of per-group keep ratios (picklable: searchers carry it to the budget)."""
    fingerprint = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    cached = _TABLES.get(model)
    if cached is not None and cached[0] == fingerprint and cached[1] == tuple(input_shape):
        return cached[2]
    trace = trace_groups(model, input_shape)
    table = MacsTable(
        tuple(g.name for g in trace.groups), tuple(g.num_channels for g in trace.groups), tuple(trace.layers)
    )
    _TABLES[model] = (fingerprint, tuple(input_shape), table)
    return table


def macs_after(model: nn.Module, input_shape: Sequence[int], keep_ratios: Sequence[float], round_to: int) -> int:
    """Conv + linear multiply-accumulates per example that ``prune_channels_`` with these arguments leaves
    (bias additions not counted). Computed from a per-layer table, without pruning anything."""
    table = macs_table(model, input_shape)
    check_keep_ratios(keep_ratios, table.names)
    return table.macs(keep_ratios, round_to)


def project_to_budget(
    table: MacsTable,
    keep_ratios: Sequence[float],
    target_macs_ratio: float,
    *,
    round_to: int,
    min_ratio: float,
    model_name: str | None = None,
) -> tuple[float, ...]:
    """The proposal projected onto ``target_macs_ratio`` of the unpruned MACs (``ops.projection``'s scale and
    top-up: the proposal's shape kept, the budget spent). Raises ConfigError if even every ratio at ``min_ratio``
    misses the target.

    Args:
        table: the model's ``macs_table``.
        model_name: named in the error for a model without prunable groups (e.g. its class name).
    """
    if not 0.0 < target_macs_ratio <= 1.0:
        raise ConfigError(f"search.target_macs_ratio: got {target_macs_ratio!r}; allowed range is (0, 1]")
    if not 0.0 < min_ratio <= 1.0:
        raise ConfigError(f"min_keep_ratio: got {min_ratio!r}; allowed range is (0, 1]")
    if not table.names:
        model = "the model" if model_name is None else f"the model ({model_name})"
        raise ModelError(
            f"{model} has no prunable channel group (no conv/linear layer whose outputs "
            f"can be removed without changing the model's output), so search.target_macs_ratio="
            f"{target_macs_ratio:g} cannot be reached by pruning"
        )
    check_keep_ratios(keep_ratios, table.names)
    full = table.macs([1.0] * len(table.names), round_to)
    try:
        return project_keep_ratios(table.sizes, keep_ratios, table.macs_of_counts, target_macs_ratio * full,
                                   round_to=round_to, min_ratio=min_ratio)
    except Unreachable as error:
        raise ConfigError(
            f"search.target_macs_ratio: got {target_macs_ratio:g}; the smallest reachable with "
            f"round_to={round_to} and min ratio {min_ratio:g} is {error.smallest / full:.3f}"
        ) from None
