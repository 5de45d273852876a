"""Latency tables that measure precision: layers left in FP32 inside an INT8 model as features, the fit recovering a
synthetic runtime's FP32 terms, held-out candidates with FP32 layers, JSON, bad input; a table without precision
designs and keys as before."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pf_ray.config import TargetConfig
from pf_ray.errors import ConfigError
from pf_ray.latency import LatencyTable, TablePlan, fit_table
from pf_ray.latency.build import _random, table_key
from pf_ray.latency.features import Layout
from tests.latency.conftest import BLOCKS_OF_8
from tests.tiny import SHAPE, tiny_resnet20

PLAN = TablePlan(num_random=160, num_holdout=60, precision=True)


class PrecisionRuntime:
    """Latency = base + features . weights of a known feature set, with per-layer FP32 terms: a layer in FP32 costs a
    fixed ``fp32_ms`` plus 2x its INT8 per-MAC cost. Called with (kept, removed, fp32) triples; 0.5% noise."""

    def __init__(self, table, fp32_ms: float = 0.02, seed: int = 0) -> None:
        self.layers = [layer.name for layer in table.layers]
        self.layout = Layout.of(table.layers, table.sizes, precision=True)
        names = self.layout.names(BLOCKS_OF_8)
        self.weights = np.random.default_rng(seed).uniform(0.0, 0.02, len(names))
        self.weights[0] = 0.1
        for index, name in enumerate(names):
            if name.startswith("fp32["):
                self.weights[index] = fp32_ms
            elif name.startswith("fp32_work["):
                layer = int(name[len("fp32_work["):-1])
                self.weights[index] = 2 * self.weights[names.index(f"work[{layer}]")]
        self.rng = np.random.default_rng(seed + 1)

    def mask(self, fp32) -> np.ndarray:
        return np.array([[float(name in names) for name in self.layers] for names in fp32]).reshape(len(fp32), -1)

    def exact(self, kept, fp32) -> np.ndarray:
        return self.layout.design(np.asarray(kept, float), BLOCKS_OF_8, None, self.mask(fp32)) @ self.weights

    def __call__(self, triples) -> list[float]:
        assert all(removed == () for _, removed, _ in triples)
        exact = self.exact([kept for kept, _, _ in triples], [fp32 for _, _, fp32 in triples])
        return list(exact * (1 + 0.005 * self.rng.standard_normal(len(exact))))


@pytest.fixture(scope="module")
def fitted(resnet_table):
    runtime = PrecisionRuntime(resnet_table)
    return runtime, fit_table(resnet_table, runtime, PLAN, precision_layers=resnet_table.layer_names())


def test_the_fit_recovers_a_runtime_with_fp32_terms(fitted, resnet_table) -> None:
    runtime, table = fitted
    assert table.precision_layers == tuple(resnet_table.layer_names())
    by_precision = table.notes["holdout_by_precision"]
    assert by_precision["with_fp32_layers"]["count"] > 20 and by_precision["all_int8"]["count"] > 20
    assert table.median_error < 0.01 and table.max_error < 0.04  # held out, FP32 layers included
    rng = random.Random(7)
    kept = np.array([_random(tuple(resnet_table.sizes), rng, PLAN) for _ in range(200)])
    fp32 = [tuple(n for n in table.precision_layers if rng.random() < 0.2) for _ in range(200)]
    exact = runtime.exact(kept, fp32)
    errors = np.abs(table.predict_many(kept, fp32=fp32) - exact) / exact
    assert np.median(errors) < 0.01 and errors.max() < 0.04
    full = tuple(resnet_table.sizes)
    for name in ("conv1", "layer2.0.conv1", "layer3.2.conv2"):  # what one FP32 layer costs, within 15%
        cost = table.predict(full, fp32=[name]) - table.predict(full)
        truth = float(runtime.exact([full], [(name,)])[0] - runtime.exact([full], [()])[0])
        assert cost == pytest.approx(truth, rel=0.15), name
    kinds = {m.kind for m in table.training}
    assert "precision" in kinds and any(m.fp32 for m in table.training if m.kind == "random")


def test_a_precision_table_round_trips_through_json_and_checks_layer_names(fitted, resnet_table) -> None:
    _, table = fitted
    copy = LatencyTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert copy.precision_layers == table.precision_layers and copy.holdout == table.holdout
    full = tuple(resnet_table.sizes)
    assert copy.predict(full, fp32=["conv1", "fc"]) == table.predict(full, fp32=["conv1", "fc"])
    with pytest.raises(ConfigError, match=r"fp32 layer 'layer9': not a layer this latency table measured in FP32; "
                                          r"its layers: conv1, layer1\.0\.conv1"):
        table.predict(full, fp32=["layer9"])
    with pytest.raises(ConfigError, match="expected a collection of layer names"):
        table.predict(full, fp32="conv1")
    assert "22 layers measured in FP32" in table.summary()


def test_a_layout_without_precision_designs_as_before(resnet_table) -> None:
    plain = Layout.of(resnet_table.layers, resnet_table.sizes)
    precise = Layout.of(resnet_table.layers, resnet_table.sizes, precision=True)
    kept = np.array([resnet_table.sizes, [k // 2 for k in resnet_table.sizes]], float)
    layers = len(resnet_table.layers)
    design = precise.design(kept, BLOCKS_OF_8, None, np.zeros((2, layers)))
    assert np.array_equal(design[:, : -2 * layers], plain.design(kept, BLOCKS_OF_8))  # all INT8: as before
    assert not design[:, -2 * layers:].any()
    one = np.zeros((2, layers))
    one[:, 0] = 1  # conv1 in FP32: its INT8 work column goes to its FP32 columns
    moved = precise.design(kept, BLOCKS_OF_8, None, one)
    assert moved[0, 1] == 0 and moved[0, -2 * layers] == 1 and moved[0, -layers] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="built without precision"):
        plain.design(kept, BLOCKS_OF_8, None, one)
    assert len(precise.names(BLOCKS_OF_8)) == design.shape[1]


def test_precision_changes_the_cache_key_and_its_absence_does_not() -> None:
    model = tiny_resnet20()
    plain = table_key(model, SHAPE, TargetConfig(), TablePlan())
    assert table_key(model, SHAPE, TargetConfig(), TablePlan(precision=True)) != plain
    # a plan without precision is keyed without the precision fields, whatever their values
    assert table_key(model, SHAPE, TargetConfig(), TablePlan(fp32_probability=0.5)) == plain
