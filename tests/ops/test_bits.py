"""Bits per layer under an average-bits budget (pf_ray.ops.bits), shared by uniform and non-uniform quantization:
hand-computed allocations and the budget never exceeded."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_ray.errors import ConfigError
from pf_ray.ops.bits import WeightBitsBudget, allocate_bits, allocate_in_order


def test_pocketflows_allocation_alone_spends_the_budget_on_the_first_layers():
    # 100, 200, 700 weights at 4 bits on average: budget 4000 bits. Proposal 8, 8, 8:
    # layer 0: cap = (4000 - 2 * 900) // 100 = 22 -> 8; takes 800, 3200 left.
    # layer 1: wants 8 (1600 + 800 wanted - 800 spent = 1600 -> 8); cap = (3200 - 2 * 700) // 200 = 9 -> 8.
    # layer 2 (last): 1600 // 700 = 2.
    assert allocate_in_order([8, 8, 8], [100, 200, 700], 4000, min_bits=2) == (8, 8, 2)
    # At 3 bits (3000): layer 0 cap (3000 - 1800) // 100 = 12 -> 8, 2200 left; layer 1 cap (2200 - 1400) // 200
    # = 4 binds; 1400 left; last 1400 // 700 = 2.
    assert allocate_in_order([8, 8, 8], [100, 200, 700], 3000, min_bits=2) == (8, 4, 2)
    # Rounding is half up; the error is carried: layer 0 wants 250 bit-weights, takes 3 * 100 = 300; layer 1
    # wants 250 + 200 - 300 = 150 -> 0.75 bits -> 1, lifted to min_bits 2; last (4000 - 300 - 400) // 700 = 4.
    assert allocate_in_order([2.5, 1.0, 8], [100, 200, 700], 4000, min_bits=2) == (3, 2, 4)
    # The carry at work: 2.4, 2.4, 2.4 over 100 weights each, budget 900. Without it every layer rounds to 2;
    # with it layer 1 wants (480 - 200) / 100 = 2.8 -> 3, layer 2 (last) takes (900 - 500) // 100 = 4 -> capped
    # by the budget only. Wanted 720 in all; spent 2 + 3 + 4 = 900 <= 900.
    assert allocate_in_order([2.4, 2.4, 2.4], [100, 100, 100], 900, min_bits=2) == (2, 3, 4)
    with pytest.raises(ConfigError, match="cannot give every layer min_bits=2"):
        allocate_in_order([4, 4], [100, 100], 399, min_bits=2)


def test_allocate_bits_by_hand():
    counts = [100, 200, 700]
    # All at max: scaled by 4/8 to 4, 4, 4: the uniform baseline.
    assert allocate_bits([8, 8, 8], counts, average_bits=4, min_bits=2) == (4, 4, 4)
    # Already on budget (800 + 400 + 2800 = 4000): s = 1, kept.
    assert allocate_bits([8, 2, 4], counts, average_bits=4, min_bits=2) == (8, 2, 4)
    # 3, 5, 4 costs 4100: s = 4000/4100 -> 2.93, 4.88, 3.90; layer 0 rounds to 3 (293 wanted, 300 spent),
    # layer 1 to round((1268 - 300) / 200) = round(4.84) = 5; the last takes (4000 - 300 - 1000) // 700 = 3
    # (3.86 rounded down: the budget is never exceeded).
    assert allocate_bits([3, 5, 4], counts, average_bits=4, min_bits=2) == (3, 5, 3)
    # 8, 8, 2 at 3 bits: the last layer is already at min_bits for any s <= 1, so 2400 s + 1400 = 3000,
    # s = 2/3 -> 5.33, 5.33, 2; layer 1 wants round((1600 - 500) / 200) = 6 but its cap is
    # (3000 - 500 - 1400) // 200 = 5.
    assert allocate_bits([8, 8, 2], counts, average_bits=3, min_bits=2) == (5, 5, 2)
    # Out-of-box proposals are clipped to [min_bits, max_bits] first.
    assert allocate_bits([100, 100, 100], counts, average_bits=6, min_bits=2) == (6, 6, 6)
    # [8, 2, 4] over 100, 100, 200 weights, budget 1600: s = 1600 / 1800 -> 7.11, 1.78, 3.56; layer 0 rounds to
    # 7 (711 wanted, 700 spent), layer 1 to round((888.9 - 700) / 100) = 2, the last takes floor(700 / 200) = 3.
    assert allocate_bits([8, 2, 4], [100, 100, 200], average_bits=4, min_bits=1) == (7, 2, 3)
    # Under budget, it grows: s = 1.5 clips layer 0 at 8 -> (8, 6).
    assert allocate_bits([8, 4], [100, 100], average_bits=7, min_bits=1) == (8, 6)
    # The cap, budget 2 * 180 = 360: s = 1/3 -> 2.4, 2.33 and 1 (1/3 clipped up to min_bits). Layer 0 rounds
    # to 2, carrying 40 bit-weights; layer 1 wants round((240 + 70 - 200) / 30) = round(3.67) = 4 but is capped
    # at (360 - 200 - 1 * 50) // 30 = 3 so that the last layer can still get 1 bit; it takes 70 // 50 = 1.
    assert allocate_bits([7.2, 7.0, 1.0], [100, 30, 50], average_bits=2, min_bits=1) == (2, 3, 1)
    # An average at or above max: everything at max; below min: impossible; wrong length.
    assert allocate_bits([1, 1], [10, 20], average_bits=8, min_bits=1) == (8, 8)
    with pytest.raises(ConfigError, match="smallest reachable with min_bits=2 is 2"):
        allocate_bits([4, 4], [10, 20], average_bits=1, min_bits=2)
    with pytest.raises(ConfigError, match="layer_bits: got 1 values; expected 2"):
        allocate_bits([4], [10, 20], average_bits=4, min_bits=1)
    with pytest.raises(ConfigError, match=r"layer_bits\[1\]: got nan"):
        allocate_bits([4, float("nan")], [10, 20], average_bits=4, min_bits=1)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    layers=st.lists(st.tuples(st.integers(1, 40000), st.floats(1.0, 8.0, allow_nan=False)), min_size=1, max_size=12),
    average_bits=st.integers(1, 8),
    min_bits=st.integers(1, 4),
)
def test_allocation_never_exceeds_the_budget(layers, average_bits, min_bits):
    counts = [count for count, _ in layers]
    proposal = [value for _, value in layers]
    average_bits = max(average_bits, min_bits)
    bits = allocate_bits(proposal, counts, average_bits=average_bits, min_bits=min_bits, max_bits=8)
    assert all(isinstance(b, int) and min_bits <= b <= 8 for b in bits)
    assert sum(n * b for n, b in zip(counts, bits, strict=True)) <= average_bits * sum(counts)  # exact integers
    budget = WeightBitsBudget(average_bits / 32, tuple(counts))
    assert budget.cost(bits) <= budget.target + 1e-12
    # and the all-max proposal is the uniform baseline, whatever the layer sizes
    assert allocate_bits([8.0] * len(counts), counts, average_bits=average_bits, min_bits=min_bits) == (
        (average_bits,) * len(counts))


def test_budget_cost_is_the_fraction_of_fp32_weight_bits():
    budget = WeightBitsBudget(4 / 32, (100, 200, 700))
    assert budget.cost([8, 8, 2]) == pytest.approx((800 + 1600 + 1400) / 32000)
    with pytest.raises(ConfigError, match="layer_bits: got 2 values; expected 3"):
        budget.cost([4, 4])
