"""Whole bits per layer under an average-bits budget: one allocation for every quantizing learner.

A searcher proposes a real number of bits per layer; the learner must store its weights in at most
``average_bits`` bits per weight on average (sum n_i b_i <= average_bits * sum n_i, n_i the weights of layer i).
``allocate_bits`` turns any proposal into such an allocation in two steps:

1. Scale: the proposal, clipped to [min_bits, max_bits], is multiplied by the s for which
   sum n_i clip(s p_i, min_bits, max_bits) meets the budget (bisection; the cost grows with s). Only the
   proposal's shape matters: the all-``max_bits`` proposal every search starts from becomes ``average_bits``
   everywhere, the uniform baseline. (The scaling is ours: PocketFlow's allocation alone spends the budget on the
   first layers; an all-8 proposal over 100, 200, 700 weights at 4 bits would give [8, 8, 2].)
2. ``allocate_in_order``, PocketFlow's rule: layer by layer in model order, each layer rounds its value and is
   capped so that every later layer can still get ``min_bits``; the last layer takes what the budget has left.
   Ours carries the rounding error to the next layer (layer i rounds the bits wanted so far minus the bits spent
   so far), so roundings do not pile up on the last layers.

Integer arithmetic on bit-weights decides the caps, so the budget is never exceeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pf_ray.errors import ConfigError

FP32_BITS = 32
MAX_BITS = 8  # ONNX's QuantizeLinear (opset 17) and the codebook's uint8 codes hold at most 8 bits


@dataclass(frozen=True)
class WeightBitsBudget:
    """Stored weight bits as a fraction of the same weights in fp32: sum n_i b_i / (32 sum n_i). (A codebook's
    4 * 2^k bytes of centroids are left out: under 0.1% of a ResNet-20 layer at 4 bits.)"""

    target: float  # average_bits / 32
    weight_counts: tuple[int, ...]  # n_i, the weights of each quantized layer (plain data: travels to Ray)
    min_bits: int = 1  # the search box of every layer's bits
    max_bits: int = MAX_BITS

    def cost(self, values: Sequence[float]) -> float:
        if len(values) != len(self.weight_counts):
            raise ConfigError(f"layer_bits: got {len(values)} values; expected {len(self.weight_counts)}")
        bits = sum(n * b for n, b in zip(self.weight_counts, values, strict=True))
        return bits / (FP32_BITS * sum(self.weight_counts))

    def project(self, values: Sequence[float]) -> tuple[float, ...]:
        """Whole bits per layer spending at most ``target * 32`` bits per weight on average (``allocate_bits``);
        an all-``max_bits`` proposal gives the average everywhere it can."""
        bits = allocate_bits(values, self.weight_counts, average_bits=self.target * FP32_BITS,
                             min_bits=self.min_bits, max_bits=self.max_bits)
        return tuple(float(b) for b in bits)


def allocate_in_order(bits: Sequence[float], weight_counts: Sequence[int], budget_bits: int, *,
                      min_bits: int, max_bits: int = MAX_BITS) -> tuple[int, ...]:
    """PocketFlow's allocation with the rounding error carried (see the module's docstring), never spending more
    than ``budget_bits`` bit-weights. Rounding is half up; a value under ``min_bits`` is lifted to it.

    Raises:
        ConfigError: ``budget_bits`` cannot give every layer ``min_bits``, or bad lengths/values.
    """
    _check(bits, weight_counts, min_bits, max_bits)
    counts = [int(n) for n in weight_counts]
    if budget_bits < min_bits * sum(counts):
        raise ConfigError(f"the bit budget ({budget_bits} bits for {sum(counts)} weights) cannot give every layer "
                          f"min_bits={min_bits}")
    remaining, wanted, spent = budget_bits, 0.0, 0
    later = sum(counts)  # weights of this layer and the layers after it
    chosen: list[int] = []
    for index, (value, count) in enumerate(zip(bits, counts, strict=True)):
        later -= count
        if index == len(counts) - 1:
            bit = min(remaining // count, max_bits)
        else:
            wanted += count * float(value)
            rounded = math.floor((wanted - spent) / count + 0.5 + 1e-9)
            cap = min((remaining - min_bits * later) // count, max_bits)  # >= min_bits: the budget is feasible
            bit = max(min_bits, min(rounded, cap))
        chosen.append(int(bit))
        remaining -= bit * count
        spent += bit * count
    return tuple(chosen)


def allocate_bits(proposal: Sequence[float], weight_counts: Sequence[int], *, average_bits: float,
                  min_bits: int, max_bits: int = MAX_BITS) -> tuple[int, ...]:
    """Whole bits per layer for a searcher's proposal, spending at most ``average_bits`` per weight on average
    (scale, then ``allocate_in_order``; see the module's docstring). An average at or above ``max_bits`` gives
    ``max_bits`` everywhere.

    Raises:
        ConfigError: ``average_bits`` below ``min_bits`` (no allocation fits), or bad lengths/values.
    """
    _check(proposal, weight_counts, min_bits, max_bits)
    if average_bits < min_bits:
        raise ConfigError(f"bits: got {average_bits:g} average bits; the smallest reachable with "
                          f"min_bits={min_bits} is {min_bits}")
    if average_bits >= max_bits:
        return (max_bits,) * len(weight_counts)
    budget = math.floor(average_bits * sum(weight_counts) + 1e-9)  # in bit-weights
    values = [min(max(float(v), min_bits), max_bits) for v in proposal]

    def scaled(scale: float) -> list[float]:
        return [min(max(scale * v, min_bits), max_bits) for v in values]

    def spent(scale: float) -> float:
        return sum(n * p for n, p in zip(weight_counts, scaled(scale), strict=True))

    low, high = 0.0, max_bits / min(values)  # spent(low): all min_bits <= budget <= all max_bits: spent(high)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if spent(middle) <= budget else (low, middle)
    return allocate_in_order(scaled(low), weight_counts, budget, min_bits=min_bits, max_bits=max_bits)


def _check(values: Sequence[float], weight_counts: Sequence[int], min_bits: int, max_bits: int) -> None:
    if not 1 <= min_bits <= max_bits <= MAX_BITS:
        raise ConfigError(f"min_bits, max_bits: got {min_bits}, {max_bits}; allowed: "
                          f"1 <= min_bits <= max_bits <= {MAX_BITS}")
    if len(values) != len(weight_counts) or not values:
        raise ConfigError(f"layer_bits: got {len(values)} values; expected {len(weight_counts)} (one per layer)")
    if any(int(n) <= 0 for n in weight_counts):
        raise ConfigError(f"weight_counts: got {list(weight_counts)}; every layer needs at least one weight")
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ConfigError(f"layer_bits[{index}]: got {value!r}; expected a finite number")
