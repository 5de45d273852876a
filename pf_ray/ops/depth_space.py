"""Depth as a searched dimension of channel pruning: after one keep ratio per channel group, one value per removable
residual block (``pf_ray.ops.blocks``), in the same box [min_keep_ratio, 1]; a block whose value is below the box's
middle is removed. Projected vectors say it plainly: ``min_keep_ratio`` for a removed block, 1 for a kept one.

Projection onto a budget (MACs or latency) keeps the proposal's removed blocks and scales the groups' keep ratios
as without depth (``ops.projection``), at a cost that counts the removed blocks; when even every group at the
floor misses the budget, it removes further blocks, the lowest value first, until the budget is reachable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pf_ray.ops.precision_space import join_tail, split_tail
from pf_ray.ops.projection import Unreachable

BLOCK_PREFIX = "block:"  # a block dimension's name in the space (and the report): "block:layer1.1"
KEPT = 1.0  # a kept block's projected value; a removed block's is the box's bottom (min_keep_ratio)


def dimension_names(blocks: Sequence[str]) -> tuple[str, ...]:
    return tuple(BLOCK_PREFIX + name for name in blocks)


def is_removed(value: float, low: float) -> bool:
    """A block's value below the middle of the box [low, 1] removes it."""
    return value < (low + KEPT) / 2


def split_values(values: Sequence[float], blocks: Sequence[str], low: float) -> tuple[tuple[float, ...],
                                                                                       tuple[str, ...]]:
    """(the groups' keep ratios, the removed blocks in ``blocks``' order) of a vector of groups then blocks."""
    if len(values) < len(blocks):
        raise ValueError(f"a vector of {len(values)} values cannot hold the {len(blocks)} block values at its end")
    ratios = tuple(float(v) for v in values[: len(values) - len(blocks)])
    tail = values[len(values) - len(blocks):]
    return ratios, tuple(name for name, value in zip(blocks, tail, strict=True) if is_removed(value, low))


def join_values(ratios: Sequence[float], blocks: Sequence[str], removed: Sequence[str],
                low: float) -> tuple[float, ...]:
    """The vector of keep ratios and block values (``low`` removed, 1 kept): ``split_values``' inverse."""
    gone = set(removed)
    return (*(float(r) for r in ratios), *(low if name in gone else KEPT for name in blocks))


# keep ratios, removed blocks -> the projected keep ratios (raises Unreachable)
ProjectWidth = Callable[[Sequence[float], tuple[str, ...]], tuple[float, ...]]


def project_with_blocks(values: Sequence[float], blocks: Sequence[str], low: float,
                        project_width: ProjectWidth) -> tuple[float, ...]:
    """The proposal's removed blocks kept and its keep ratios projected at a cost that counts them; if that is out
    of reach, more blocks removed, lowest value first (ties: the later block first), until it is not.

    Raises:
        Unreachable: even with every block removed (its ``smallest``: that candidate's cost at the floor).
    """
    ratios, removed = split_values(values, blocks, low)
    tail = values[len(values) - len(blocks):]
    candidates = sorted((b for b in range(len(blocks)) if blocks[b] not in removed),
                        key=lambda b: (tail[b], -b))
    while True:
        in_order = tuple(name for name in blocks if name in set(removed))
        try:
            return join_values(project_width(ratios, in_order), blocks, in_order, low)
        except Unreachable:
            if not candidates:
                raise
            removed = (*removed, blocks[candidates.pop(0)])


@dataclass(frozen=True)
class SplitFields:
    """How a projected vector of a depth or precision search fills the learner's config: the keep ratios into
    ``field``, the names of the removed blocks into ``blocks_field``, and (a precision search,
    ``ops.precision_space``) the names of the FP32 layers into ``fp32_field``. A vector is the keep ratios, then one
    value per block of ``blocks``, then one per layer of ``layers``. Plain data, so the space stays picklable."""

    field: str  # e.g. "layer_keep_ratios"
    blocks_field: str  # e.g. "removed_blocks"
    blocks: tuple[str, ...]  # the removable blocks, in forward order
    low: float  # the box's bottom (a removed block's, or an FP32 layer's, projected value)
    fp32_field: str = ""  # e.g. "fp32_layers" (a precision search)
    layers: tuple[str, ...] = ()  # the layers that may stay FP32, in forward order

    def fields(self, values: Sequence[float]) -> dict[str, Any]:
        head, fp32 = split_tail(values, len(values) - len(self.layers), self.layers, self.low)
        ratios, removed = split_values(head, self.blocks, self.low)
        fields: dict[str, Any] = {self.field: ratios, self.blocks_field: removed}
        return fields | ({self.fp32_field: fp32} if self.layers else {})

    def values(self, ratios: Sequence[float], removed: Sequence[str], fp32: Sequence[str] = ()) -> tuple[float, ...]:
        head = join_values(ratios, self.blocks, removed, self.low)
        return join_tail(head, self.layers, fp32, self.low) if self.layers else head
