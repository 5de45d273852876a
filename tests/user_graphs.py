"""User-style models that channel pruning must not break (issue 15): a channel split (``torch.chunk``), concatenation,
a channel shuffle (view/transpose/reshape), grouped and depthwise convolutions, and an operation with a hard-coded
channel count; and models that make the dependency analysis hang or eat memory."""

from __future__ import annotations

import time

import torch
from torch import nn

SHAPE = (3, 16, 16)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNet-v2's basic unit: split the channels, transform one half (grouped 1x1, depthwise 3x3, dense 1x1),
    concatenate and shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, groups=2, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, transformed = torch.chunk(x, 2, dim=1)
        return channel_shuffle(torch.cat([kept, self.branch(transformed)], 1), 2)


class ShuffleUserNet(nn.Module):
    """A stem, two shuffle blocks, then plain 3x3 convolutions (the safe capacity) and a linear classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = ShuffleBlock(16)
        self.block2 = ShuffleBlock(16)
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(self.mid(self.expand(x)).mean((2, 3)))


def shuffle_user_net() -> nn.Module:
    torch.manual_seed(0)
    return ShuffleUserNet()


# ShuffleUserNet's groups: the stem's channels run through the shuffles (torch-pruning maps them to indices beyond
# the stem's 16 channels): never safe; each block's branch starts at a grouped 1x1 convolution (2 groups): pruned
# evenly across its groups when kept counts are multiples of 2 (round_to), else left whole; the plain convs: safe
SHUFFLED = ("stem.0",)
GROUPED = ("block1.branch.0", "block2.branch.0")
PLAIN = ("expand.0", "mid.0")


class ScaledNet(nn.Module):
    """A per-channel scale kept as a plain tensor attribute (not a parameter or buffer torch-pruning knows): pruning
    the conv before it leaves 16 scales for fewer channels, which only running the pruned model reveals."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 16, 3, padding=1)
        self.second = nn.Conv2d(16, 16, 3, padding=1)
        self.scale = torch.linspace(0.5, 1.5, 16).view(1, 16, 1, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.first(x)) * self.scale
        return self.head(torch.relu(self.second(x)).mean((2, 3)))


def only_shuffles() -> nn.Module:
    """Nothing to prune safely: the stem feeds the shuffles, and the blocks' groups start at grouped convs."""
    torch.manual_seed(0)
    model = ShuffleUserNet()
    model.expand = nn.Identity()
    model.mid = nn.Identity()
    model.head = nn.Linear(16, 10)
    return model


class Slow(nn.Module):
    """A forward pass that spins (in Python) for ``seconds``: an analysis that does not finish in time."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            pass
        return self.head(self.conv(x).mean((2, 3)))


class Hungry(nn.Module):
    """A forward pass that holds on to more and more memory (up to ``limit_bytes``): an analysis that grows
    without end, like torch-pruning's index propagation through channel-mixing reshapes."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held = []
        chunk = 8 << 20
        while len(held) * chunk < self.limit_bytes:
            held.append(b"\x01" * chunk)  # written, so resident
        del held
        return self.head(self.conv(x).mean((2, 3)))
