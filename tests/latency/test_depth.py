"""Latency tables that measure depth: removed residual blocks as features, the fit recovering a synthetic runtime's
block terms, held-out candidates with removals, JSON, bad input; a table without blocks unchanged; and a small
real table of a model with removable blocks."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from pf_ray.config import Precision, Runtime, TargetConfig
from pf_ray.errors import ConfigError
from pf_ray.latency import LatencyTable, TablePlan, fit_table, latency_table, pruned_copy
from pf_ray.latency.build import _random
from pf_ray.latency.features import FeatureSet, Layout
from pf_ray.latency.measure import Timing
from pf_ray.metrics import model_stats
from pf_ray.models.resnet_cifar import BasicBlock
from pf_ray.ops.depth import joint_macs, vanished_groups
from pf_ray.ops.macs_budget import macs_table
from tests.latency.conftest import SyntheticRuntime
from tests.tiny import tiny_resnet20

BLOCKS = ("layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2")  # ResNet-20's
PLAN = TablePlan(num_random=160, num_holdout=60, depth=True)


@pytest.fixture(scope="module")
def fitted(resnet_table):
    runtime = SyntheticRuntime(resnet_table, blocks=BLOCKS)
    return runtime, fit_table(resnet_table, runtime, PLAN, blocks=BLOCKS)


def _fresh(sizes, count: int, seed: int) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    rng = random.Random(seed)
    kept = np.array([_random(tuple(sizes), rng, PLAN) for _ in range(count)])
    return kept, [tuple(b for b in BLOCKS if rng.random() < 0.3) for _ in range(count)]


def test_the_fit_recovers_a_runtime_with_block_terms(fitted, resnet_table) -> None:
    runtime, table = fitted
    assert table.blocks == BLOCKS
    by_depth = table.notes["holdout_by_depth"]
    assert by_depth["with_removed_blocks"]["count"] > 30 and by_depth["width_only"]["count"] > 0
    assert table.median_error < 0.01 and table.max_error < 0.03  # held out, removals included
    kept, removed = _fresh(resnet_table.sizes, 300, seed=7)
    exact = runtime.exact(kept, removed)
    errors = np.abs(table.predict_many(kept, removed) - exact) / exact
    assert np.median(errors) < 0.01 and errors.max() < 0.03
    full = tuple(resnet_table.sizes)
    for block in BLOCKS:  # what removing each block alone saves, recovered within 10% of the true saving
        saved = table.predict(full) - table.predict(full, [block])
        truth = float(runtime.exact([full])[0] - runtime.exact([full], [(block,)])[0])
        assert saved == pytest.approx(truth, rel=0.1), block
    kinds = {m.kind for m in table.training}
    assert "block" in kinds and any(m.removed for m in table.training if m.kind == "random")


def test_removed_blocks_own_groups_do_not_matter(fitted, resnet_table) -> None:
    _, table = fitted
    full = list(resnet_table.sizes)
    index = table.names.index("layer1.1.conv1")
    assert vanished_groups(resnet_table, ["layer1.1"]) == ("layer1.1.conv1",)
    narrow = full[:index] + [3] + full[index + 1:]
    assert table.predict(narrow, ["layer1.1"]) == table.predict(full, ["layer1.1"])
    assert table.predict(narrow) != table.predict(full)
    assert table.predict(full, ["layer1.1"]) < table.predict(full)
    assert table.speedup(full, ["layer1.1"]) == pytest.approx(table.reference_ms / table.predict(full, ["layer1.1"]))
    assert table.predict_ratios([1.0] * len(full), 8, ["layer1.1"]) == table.predict(full, ["layer1.1"])


def test_a_depth_table_round_trips_through_json(fitted, resnet_table) -> None:
    _, table = fitted
    copy = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    kept, removed = _fresh(resnet_table.sizes, 20, seed=3)
    assert copy.blocks == table.blocks and copy.holdout == table.holdout
    assert np.array_equal(copy.predict_many(kept, removed), table.predict_many(kept, removed))
    assert any(m.removed for m in copy.holdout)


def test_removed_blocks_are_checked(fitted, resnet_table) -> None:
    _, table = fitted
    with pytest.raises(ConfigError, match="removed block 'layer2.0': not a block this latency table measured "
                                          "removed; its blocks: layer1.0, layer1.1"):
        table.predict(resnet_table.sizes, ["layer2.0"])
    with pytest.raises(ConfigError, match="got the string 'layer1.1'"):
        table.predict(resnet_table.sizes, "layer1.1")


def test_a_table_without_blocks_refuses_removals_and_designs_as_before(resnet_table) -> None:
    table = fit_table(resnet_table, SyntheticRuntime(resnet_table), TablePlan(num_random=40, num_holdout=10))
    assert table.blocks == () and "holdout_by_depth" not in table.notes
    assert table.predict(resnet_table.sizes, ()) == table.predict(resnet_table.sizes)
    with pytest.raises(ConfigError, match="its blocks: none"):
        table.predict(resnet_table.sizes, ["layer1.1"])
    # with blocks, and none removed, the width columns are exactly those of a layout without blocks
    features = FeatureSet(block=8, aligns=(4, 16))
    kept, _ = _fresh(resnet_table.sizes, 30, seed=5)
    plain = Layout.of(resnet_table.layers, resnet_table.sizes).design(kept, features)
    deep = Layout.of(resnet_table.layers, resnet_table.sizes, BLOCKS).design(kept, features)
    assert np.array_equal(deep[:, : plain.shape[1]], plain)
    assert np.array_equal(deep[:, plain.shape[1]: plain.shape[1] + len(BLOCKS)], np.ones((30, len(BLOCKS))))


def test_pruned_copy_removes_blocks_then_prunes_by_group_name(resnet_table) -> None:
    model = tiny_resnet20()
    kept = [max(1, n // 2) for n in resnet_table.sizes]
    pruned = pruned_copy(model, (1, 16, 16), kept, resnet_table.sizes, removed=("layer1.1", "layer3.2"))
    assert model_stats(pruned, (1, 16, 16)).macs == joint_macs(resnet_table, ["layer1.1", "layer3.2"], kept)
    assert not hasattr(pruned.layer1[1], "conv1")


def _two_block_net() -> nn.Module:
    """conv -> BN -> ReLU -> 2 basic blocks (both removable) -> pool -> linear, on 1x8x8: 3 groups."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         BasicBlock(16, 16, 1), BasicBlock(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10)).eval()


def test_a_real_depth_table(tmp_path) -> None:
    target = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.FP32)
    plan = TablePlan(sweep_fractions=(0.5,), dense_groups=1, dense_window=4, num_random=8, num_holdout=4,
                     timing=Timing(warmup=2, repeats=10, rounds=2), depth=True, remove_probability=0.5)
    table = latency_table(_two_block_net(), (1, 8, 8), target, plan=plan, folder=tmp_path)
    assert table.blocks == ("3", "4") and table.full_ms > 0
    block_runs = {m.removed: m.ms for m in table.training if m.kind == "block"}
    assert set(block_runs) == {("3",), ("4",), ("3", "4")}
    assert block_runs["3", "4"] < table.full_ms  # two blocks fewer: measurably faster even at this size
    assert 0 < table.predict(table.sizes, ["3", "4"]) < table.predict(table.sizes)
    assert len(list(tmp_path.glob("table-*.json"))) == 1
    assert latency_table(_two_block_net(), (1, 8, 8), target, plan=plan, folder=tmp_path).blocks == ("3", "4")
    without = macs_table(_two_block_net(), (1, 8, 8))
    assert len(without.names) == 3
