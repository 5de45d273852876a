"""Channel pruning's knapsack start, with depth, and the depth dimensions' features.

``knapsack_start``: channels kept greedily by importance per unit of budget (``ops.knapsack``); with removable
residual blocks, a block's importance is that of the channel groups that go with it (a ResNet block's first
convolution's channels). The blocks are ranked by importance per unit of budget that removing one alone saves; the
knapsack is filled with none removed, with the first removed, the first two, ... all, and the allocation that keeps
the most importance within the budget wins.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pf_ray.ops.blocks import ResidualBlock
from pf_ray.ops.depth import vanished_groups
from pf_ray.ops.depth_space import join_values
from pf_ray.ops.knapsack import greedy_allocation
from pf_ray.ops.macs_budget import MacsTable, block_layers
from pf_ray.ops.pruning import kept_channel_count
from pf_ray.search_space import Budget


def knapsack_start(importance: Sequence[np.ndarray], table: MacsTable, budget: Budget, *, round_to: int,
                   low: float, blocks: Sequence[str] = ()) -> tuple[float, ...]:
    """A vector of the space (keep ratios per group of ``table``, then one value per block of ``blocks``) within
    ``budget``; ``importance``: per group, each channel's importance (higher = keep)."""
    sizes = list(table.sizes)

    def vector(counts: Sequence[float], removed: Sequence[str]) -> tuple[float, ...]:
        return join_values([k / n for k, n in zip(counts, sizes, strict=True)], blocks, removed, low)

    def allocate(removed: Sequence[str]) -> list[int]:
        return greedy_allocation(importance, lambda counts: budget.cost(vector(counts, removed)), budget.target,
                                 round_to=round_to, min_counts=[kept_channel_count(n, low, round_to) for n in sizes])

    if not blocks:
        return vector(allocate(()), ())
    position = {name: g for g, name in enumerate(table.names)}
    full = budget.cost(vector(sizes, ()))

    def importance_per_saving(block: str) -> float:
        saved = full - budget.cost(vector(sizes, (block,)))
        lost = sum(float(importance[position[g]].sum()) for g in vanished_groups(table, [block]))
        return lost / saved if saved > 0 else math.inf

    order = sorted(blocks, key=importance_per_saving)
    best: tuple[float, tuple[float, ...]] | None = None
    for count in range(len(order) + 1):
        removed = order[:count]
        kept = allocate(removed)
        if budget.cost(vector(kept, removed)) > budget.target:
            continue  # out of reach with only these blocks removed
        gone = {position[g] for g in vanished_groups(table, removed)}
        value = sum(float(np.sort(scores)[::-1][: kept[g]].sum()) for g, scores in enumerate(importance)
                    if g not in gone)
        if best is None or value > best[0]:
            best = (value, vector(kept, removed))
    return best[1] if best is not None else vector(allocate(order), order)  # unreachable: projection says so


def block_features(table: MacsTable, blocks: Sequence[ResidualBlock]) -> tuple[tuple[float, ...], ...]:
    """A row of ``search_space.LAYER_FEATURES`` per block dimension (DDPG's state), after the groups' rows: its
    index, the trunk's channels (as channels and input channels), kernel 0 (not a layer), stride 1, its output
    positions and its layers' MACs unpruned."""
    rows = []
    for index, block in enumerate(blocks, start=len(table.names)):
        macs = sum(table.layers[i].macs(table.sizes, table.sizes) for i in block_layers(table, block.name))
        channels, positions = float(block.shape[0]), float(math.prod(block.shape[1:]))  # positions: height x width
        rows.append((float(index), channels, channels, 0.0, 1.0, positions, float(macs)))
    return tuple(rows)
