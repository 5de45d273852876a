"""Shared pieces of the latency tests: a small CNN, and a synthetic runtime with a known structured latency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pf_ray.latency.features import FeatureSet, Layout
from pf_ray.ops.macs_budget import MacsTable, macs_table
from tests.tiny import tiny_resnet20

SHAPE = (1, 8, 8)
BLOCKS_OF_8 = FeatureSet(block=8, aligns=(4,))  # the synthetic runtime's structure


def small_cnn(width: int = 8) -> nn.Module:
    """conv -> BN -> ReLU -> conv -> ReLU -> pool -> linear on 1x8x8: two prunable groups (width and 16)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


class SyntheticRuntime:
    """Latency = base + features . weights of a known feature set (a runtime computing 8-channel blocks, slow on
    counts that are not multiples of 4), times (1 + noise * N(0, 1)). Counts its calls.

    With ``blocks`` (removable residual blocks), each block also costs a fixed ``block_ms`` (its operators'
    overhead) plus work on its trunk while it is there, and the runtime is called with (kept, removed) pairs."""

    def __init__(self, table: MacsTable, truth: FeatureSet = BLOCKS_OF_8,
                 noise: float = 0.005, seed: int = 0, blocks: tuple[str, ...] = (), block_ms: float = 0.03) -> None:
        self.layout, self.truth, self.blocks = Layout.of(table.layers, table.sizes, blocks), truth, blocks
        columns = self.layout.design(np.array([table.sizes]), truth).shape[1]
        self.weights = np.random.default_rng(seed).uniform(0.0, 0.02, columns)
        self.weights[0] = 0.1  # the per-operator floor, ms
        if blocks:
            self.weights[[n.startswith("block[") for n in self.layout.names(truth)]] = block_ms
        self.noise, self.rng, self.calls = noise, np.random.default_rng(seed + 1), 0

    def mask(self, removed) -> np.ndarray:
        return np.array([[float(b in names) for b in self.blocks] for names in removed]).reshape(-1, len(self.blocks))

    def exact(self, kept, removed=None) -> np.ndarray:
        mask = None if removed is None else self.mask(removed)
        return self.layout.design(np.asarray(kept, float), self.truth, mask) @ self.weights

    def __call__(self, vectors) -> list[float]:
        self.calls += 1
        if self.blocks:
            exact = self.exact([kept for kept, _ in vectors], [removed for _, removed in vectors])
        else:
            exact = self.exact(vectors)
        return list(exact * (1 + self.noise * self.rng.standard_normal(len(exact))))


@pytest.fixture(scope="session")
def resnet_table() -> MacsTable:
    return macs_table(tiny_resnet20(), (1, 16, 16))
