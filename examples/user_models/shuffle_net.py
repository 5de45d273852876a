"""A user's own model file: a small ShuffleNet-v2-style network (Ma et al., ECCV 2018) for 28x28 or 32x32 images.

What makes it hard to prune: each block splits its channels in two (``torch.chunk``), transforms one half with a
grouped 1x1, a depthwise 3x3 and a dense 1x1 convolution, concatenates the halves and shuffles the channels
(view/transpose/reshape). The channels that run through the shuffles cannot be removed without reordering every
block after them, so pf-ray leaves those groups unpruned and lists them; the grouped 1x1 convolutions are pruned
evenly across their groups, and the plain convolutions between the stages carry most of the MACs.

    pf-ray compress examples/user_shuffle_net.yaml
"""

from __future__ import annotations

import torch
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups (ShuffleNet's channel shuffle)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShuffleBlock(nn.Module):
    """Split, transform one half (grouped 1x1, depthwise 3x3, 1x1), concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn_relu(half, half, kernel=1, groups=2),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            conv_bn_relu(half, half, kernel=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = torch.chunk(x, 2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], dim=1), 2)


class ShuffleUserNet(nn.Module):
    """stride-2 stem -> 2 shuffle blocks (24 ch) -> stride-2 conv (64) -> 2 shuffle blocks (64) -> stride-2 conv (128)
    -> 3x3 conv (128) -> global average pool -> linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = conv_bn_relu(in_channels, 24, stride=2)
        self.stage1 = nn.Sequential(ShuffleBlock(24), ShuffleBlock(24))
        self.down1 = conv_bn_relu(24, 64, stride=2)
        self.stage2 = nn.Sequential(ShuffleBlock(64), ShuffleBlock(64))
        self.down2 = conv_bn_relu(64, 128, stride=2)
        self.mid = conv_bn_relu(128, 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down1(self.stage1(self.stem(x))))
        return self.head(self.mid(self.down2(x)).mean(dim=(2, 3)))


def shuffle_net(in_channels: int, num_classes: int) -> nn.Module:
    """The builder pf-ray calls (``model.name: examples/user_models/shuffle_net.py:shuffle_net``)."""
    return ShuffleUserNet(in_channels, num_classes)
