"""Which channels to keep under a budget, as a knapsack: each channel's importance against what it costs (HALP's
idea, Shen et al., NeurIPS 2022, written here from the paper), solved greedily on the exact cost of the whole
allocation, so a cost whose terms interact (a conv's MACs or latency grow with its input *and* output channels)
is handled without a separable approximation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

CostOfCounts = Callable[[Sequence[int]], float]  # kept channels per group -> the cost (MACs, milliseconds)


def greedy_allocation(importance: Sequence[Sequence[float]], cost: CostOfCounts, budget: float, *, round_to: int,
                      min_counts: Sequence[int]) -> list[int]:
    """Kept channels per group, spending at most ``budget``, losing as little importance as the greedy finds.

    From every channel kept, repeatedly remove the rounding step (the ``round_to`` least important channels left
    in one group) that loses the least importance per unit of cost saved, the cost re-evaluated on the whole
    allocation, until it fits; a step that saves nothing is taken only when no step saves anything. Then give
    back, while any fits, the step that regains the most importance per unit of cost (the removal's last steps
    can overshoot the budget). A group keeps at least its ``min_counts``.

    Args:
        importance: per group, each channel's importance (any order; higher = keep); the group's size is its
            length.
        cost: of the kept counts, non-decreasing in each count.
        budget: the largest cost allowed.
        round_to: channels move in steps of this many (a group's full size is also a valid count).
        min_counts: per group, the fewest channels kept.

    Returns:
        Kept channels per group; the cost of the result is at most ``budget`` when even ``min_counts`` fit (if not,
        ``min_counts``).
    """
    # (channels,) importance sorted high to low: a group keeping k channels keeps its k most important
    ranked = [np.sort(np.asarray(values, dtype=np.float64))[::-1] for values in importance]
    prefix = [np.concatenate([[0.0], np.cumsum(values)]) for values in ranked]  # importance of the first k
    sizes = [len(values) for values in ranked]
    kept = list(sizes)

    def smaller(group: int) -> int:
        count = kept[group]
        step = count - round_to if count % round_to == 0 else count - count % round_to
        return max(step, min_counts[group])

    def larger(group: int) -> int:
        count = kept[group]
        return min(count + round_to - count % round_to, sizes[group])

    def value_of(group: int, fewer: int, more: int) -> float:
        return float(prefix[group][more] - prefix[group][fewer])

    spent = cost(kept)
    while spent > budget:
        best: tuple[bool, float, int, int] | None = None  # (saves something, -loss per cost saved, group, count)
        for group in range(len(sizes)):
            count = smaller(group)
            if count >= kept[group]:
                continue
            saved = spent - cost(kept[:group] + [count] + kept[group + 1:])
            loss = value_of(group, count, kept[group])
            key = (saved > 0, -loss / saved if saved > 0 else -loss, group, count)
            if best is None or key[:2] > best[:2]:
                best = key
        if best is None:
            return kept  # every group at its minimum: the budget is out of reach
        kept[best[2]] = best[3]
        spent = cost(kept)

    while True:  # give back what fits, the most importance per cost first
        best_back: tuple[float, int, int, float] | None = None
        for group in range(len(sizes)):
            count = larger(group)
            if count <= kept[group]:
                continue
            grown = cost(kept[:group] + [count] + kept[group + 1:])
            if grown > budget:
                continue
            gain = value_of(group, kept[group], count)
            extra = grown - spent
            ratio = gain / extra if extra > 0 else float("inf")
            if best_back is None or ratio > best_back[0]:
                best_back = (ratio, group, count, grown)
        if best_back is None:
            return kept
        _, group, count, spent = best_back
        kept[group] = count
