"""Magnitude pruning maths: the gradual sparsity schedule, magnitude masks and per-layer sparsity allocation
(Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression", 2017).

Pure functions of numbers and tensors; the learner in ``pf_ray.learners.weight_sparsification`` applies them
to a model. Sparsity is the fraction of a layer's weights that are zero; density (kept fraction) is 1 - sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pf_ray.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------
# The schedule


@dataclass(frozen=True)
class PruningSchedule:
    """Zhu & Gupta's cubic ramp: at step t a layer whose final sparsity is s_f has sparsity

        s_t = s_f * (1 - (1 - clip((t - t_b) / (t_e - t_b), 0, 1)) ** exponent)

    so pruning is fast at first, while the network has many redundant weights, and slows down as it nears the
    target. Masks change only every ``update_every`` steps inside [t_b, t_e] (each change is followed by some
    training to recover) and once more at the first step at or after t_e, where the layer reaches s_f.
    """

    begin_step: int  # t_b: masks start to change here (sparsity 0 until then)
    end_step: int  # t_e: the final sparsity is reached here
    exponent: float = 3.0
    update_every: int = 100  # steps between mask updates inside [t_b, t_e]

    @staticmethod
    def from_fractions(total_steps: int, begin: float, end: float, *, exponent: float = 3.0,
                       update_every: int = 100) -> PruningSchedule:
        """The schedule for a run of ``total_steps`` optimiser steps, t_b and t_e given as fractions of it
        (rounded to whole steps)."""
        if total_steps < 1:
            raise ConfigError(f"total_steps: got {total_steps}; allowed range is [1, inf]")
        begin_step = round(begin * total_steps)
        return PruningSchedule(begin_step, max(round(end * total_steps), begin_step), exponent, update_every)

    def progress(self, step: float) -> float:
        """1 - (1 - clip((t - t_b)/(t_e - t_b), 0, 1))**exponent: the fraction of its final sparsity a layer
        has at ``step`` (0 before t_b, 1 from t_e on; a step function if t_e == t_b)."""
        if self.end_step <= self.begin_step:
            return 1.0 if step >= self.end_step else 0.0
        elapsed = min(max((step - self.begin_step) / (self.end_step - self.begin_step), 0.0), 1.0)
        return 1.0 - (1.0 - elapsed) ** self.exponent

    def sparsity(self, step: float, final_sparsity: float) -> float:
        return final_sparsity * self.progress(step)

    def update_due(self, step: int) -> bool:
        """Whether masks are recomputed at ``step``: every ``update_every`` steps from t_b, and at t_e itself.
        (A run that skips t_e, e.g. resumed past it, catches up through the learner's check that every mask
        holds its final count of zeros.)"""
        if not self.begin_step <= step <= self.end_step:
            return False
        return (step - self.begin_step) % self.update_every == 0 or step == self.end_step


# --------------------------------------------------------------------------------------------------------------
# Masks


def num_pruned(size: int, sparsity: float) -> int:
    """How many of ``size`` weights a mask of ``sparsity`` zeros: round(sparsity * size), Python's rounding."""
    return min(max(round(sparsity * size), 0), size)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A bool mask shaped like ``weight``, False at exactly ``num_pruned(numel, sparsity)`` weights: the smallest
    in absolute value. Ties are broken by position (the earlier element in row-major order is pruned first), so
    the mask is deterministic whatever the values."""
    flat = weight.detach().abs().flatten()
    count = num_pruned(flat.numel(), sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if count:
        order = torch.sort(flat, stable=True).indices  # ascending; equal magnitudes stay in index order
        keep[order[:count]] = False
    return keep.view_as(weight)


# --------------------------------------------------------------------------------------------------------------
# Per-layer sparsity under a global budget


@dataclass(frozen=True)
class KeptWeightsBudget:
    """The budget of a per-layer sparsity vector: the fraction of the covered weights it keeps,
    cost(s) = sum_i n_i (1 - s_i) / sum_i n_i, to meet target = 1 - (global sparsity). Plain data (the layer
    sizes), so searchers can carry it to the Ray driver."""

    target: float
    sizes: tuple[int, ...]  # weights per layer, in layer order
    max_sparsity: float = 1.0  # no layer's sparsity above this (the search box's top)

    def cost(self, values: Sequence[float]) -> float:
        return density(self.sizes, values)

    def project(self, values: Sequence[float]) -> tuple[float, ...]:
        """``project_sparsities``: the size-weighted nearest sparsities keeping exactly ``target`` of the weights."""
        return project_sparsities(self.sizes, values, 1.0 - self.target, self.max_sparsity)


def density(sizes: Sequence[int], sparsities: Sequence[float]) -> float:
    """The fraction of all weights kept: sum_i n_i (1 - s_i) / sum_i n_i."""
    if len(sizes) != len(sparsities):
        raise ValueError(f"sparsities: got {len(sparsities)} values for {len(sizes)} layers")
    return sum(n * (1.0 - s) for n, s in zip(sizes, sparsities, strict=True)) / sum(sizes)


def heuristic_sparsities(sizes: Sequence[int], sparsity: float, max_sparsity: float) -> tuple[float, ...]:
    """PocketFlow's heuristic: larger layers are more redundant, so each layer's sparsity grows with the log of
    its weight count,

        s_i = min(c * ln(n_i), max_sparsity),

    with the one c >= 0 that makes the weight-count-weighted sparsity sum_i n_i s_i / sum_i n_i equal
    ``sparsity``. Layers clipped at ``max_sparsity`` leave the rest of the budget to the others (a larger c),
    which is what solving for c with the clip inside does.

    Raises:
        ConfigError: the target cannot be met (``sparsity`` above ``max_sparsity``, or layers of one weight,
            whose log is 0, holding too large a share of the weights).
    """
    slopes = [math.log(n) for n in sizes]
    return _allocate(sizes, slopes, [0.0] * len(sizes), sparsity, max_sparsity, what="heuristic")


def project_sparsities(sizes: Sequence[int], values: Sequence[float], sparsity: float,
                       max_sparsity: float) -> tuple[float, ...]:
    """The per-layer sparsities nearest to ``values`` whose weighted sparsity is exactly ``sparsity``:

        s_i = clip(v_i + delta, 0, max_sparsity),  delta solving sum_i n_i s_i = sparsity * sum_i n_i.

    This common shift is the least-squares projection weighted by layer size: minimising
    sum_i n_i (s_i - v_i)^2 over the box subject to the budget gives, by the KKT conditions, exactly
    s_i = clip(v_i + delta). So the searcher's preferences between layers survive while the budget holds, and
    a proposal with all layers equal (e.g. all at the box's top) becomes the uniform setting, every s_i =
    ``sparsity``, returned exactly.
    """
    if len(values) != len(sizes):
        raise ValueError(f"values: got {len(values)} values for {len(sizes)} layers")
    values = [float(v) for v in values]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"values: got {values}; expected finite numbers")
    if sparsity > max_sparsity:
        raise ConfigError(f"sparsity: got {sparsity:g}; above max_layer_sparsity {max_sparsity:g}, so no "
                          "per-layer setting in [0, max_layer_sparsity] can meet it")
    if len(set(values)) <= 1:
        return (float(sparsity),) * len(sizes)
    return _allocate(sizes, [1.0] * len(sizes), values, sparsity, max_sparsity, what="projection")


def _allocate(sizes: Sequence[int], slopes: Sequence[float], offsets: Sequence[float], sparsity: float,
              high: float, *, what: str) -> tuple[float, ...]:
    """s_i = clip(a_i x + b_i, 0, high) with x such that sum_i n_i s_i = sparsity * sum_i n_i (a_i >= 0).

    g(x) = sum_i n_i s_i(x) is continuous, nondecreasing and linear between the points where some layer hits a
    bound, so the solution is found exactly: locate the segment holding the target, then interpolate on it."""
    total = sparsity * sum(sizes)

    def clipped(x: float) -> list[float]:
        return [min(max(a * x + b, 0.0), high) for a, b in zip(slopes, offsets, strict=True)]

    def g(x: float) -> float:
        return sum(n * s for n, s in zip(sizes, clipped(x), strict=True))

    points = sorted({p for a, b in zip(slopes, offsets, strict=True) if a > 0 for p in (-b / a, (high - b) / a)})
    lowest, highest = (g(points[0]), g(points[-1])) if points else (0.0, 0.0)
    if total > highest + 1e-9 * sum(sizes):
        raise ConfigError(
            f"sparsity: got {sparsity:g}; the {what} can reach a weighted sparsity of "
            f"{highest / sum(sizes):g} at most (max_layer_sparsity {high:g})"
        )
    if total <= lowest:
        return tuple(clipped(points[0] if points else 0.0))
    x = points[-1]  # reached only when total is within rounding of the highest reachable
    for left, right in zip(points, points[1:], strict=False):
        g_left, g_right = g(left), g(right)
        if g_right >= total:
            x = left if g_right == g_left else left + (total - g_left) * (right - left) / (g_right - g_left)
            break
    return tuple(clipped(x))


class WeightMask(nn.Module):
    """The parametrization weight = backup * mask (``torch.nn.utils.parametrize``). Its gradient with respect to
    the backup is mask * (gradient with respect to weight): masked weights get none from the loss."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight.detach()))  # 1 = kept, 0 = pruned; weight's dtype

    def forward(self, backup: torch.Tensor) -> torch.Tensor:
        return backup * self.mask
