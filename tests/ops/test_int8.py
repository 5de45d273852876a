"""The symmetric INT8 grid (pf_ray.ops.int8): codes and scales by hand, per channel and per tensor, and snapping
a layer's weights onto it."""

from __future__ import annotations

import torch
from torch import nn

from pf_ray.ops.int8 import snap_to_int8_, symmetric_int8


def test_symmetric_int8_codes_by_hand():
    weight = torch.tensor([
        [127 / 64, -50 / 64, 0.0],  # max|w| = 127/64 -> scale 1/64; q = 127, -50, 0
        [0.0, 0.0, 0.0],  # all zeros -> scale 1, q = 0
        [-127 / 32, 3 / 128, 1 / 64],  # scale 1/32; q = -127, round(0.75) = 1, round(0.5) = 0 (half to even)
    ])
    codes, scale = symmetric_int8(weight, per_channel=True)
    assert codes.tolist() == [[127, -50, 0], [0, 0, 0], [-127, 1, 0]]
    assert scale.tolist() == [1 / 64, 1.0, 1 / 32]
    # One scale for the tensor: max|w| = 127/32 -> 1/32; row 0 becomes 63.5 -> 64 (a tie, to even), -25, 0.
    codes, scale = symmetric_int8(weight, per_channel=False)
    assert codes.tolist() == [[64, -25, 0], [0, 0, 0], [-127, 1, 0]] and scale.tolist() == [1 / 32]
    # Snapping puts each weight on its level: row 2 becomes -127/32, 1/32, 0.
    layer = nn.Linear(3, 3, bias=False)
    layer.weight.data.copy_(weight)
    snap_to_int8_(layer)
    assert layer.weight[2].tolist() == [-127 / 32, 1 / 32, 0.0] and layer.weight[0].tolist() == weight[0].tolist()
