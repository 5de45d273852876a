"""The weight_sparsification learner: masks, gradients and finalize on one linear layer, exact per-layer
sparsity on ResNet-20, search space, config and check errors, packed storage and ONNX, on answers worked out by
hand in the comments."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pf_ray.config import SearchConfig
from pf_ray.errors import ConfigError, ModelError
from pf_ray.export.onnx import export_onnx
from pf_ray.export.packed import pack_state_dict, read_packed, write_packed
from pf_ray.learners.weight_sparsification import (
    WeightSparsification,
    WeightSparsificationConfig,
    covered_layers,
)
from pf_ray.strict import from_dict
from tests.tiny import SHAPE, train_two_steps
from tests.tiny import tiny_data as _data
from tests.tiny import tiny_resnet20 as _resnet20

TINY_SHAPE = (1, 2, 2)  # flattened to the 4 inputs of _linear's layer


def _linear() -> nn.Sequential:
    """One bias-free linear layer 4 -> 2 with weights 0.1 ... 0.8 in row-major order."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.arange(1, 9, dtype=torch.float32).reshape(2, 4) / 10)
    return model


def _ramp_learner(**options) -> WeightSparsification:
    """Sparsity 0.5 on a linear ramp (exponent 1) from t_b = step 1 to t_e = step 5 of 10, masks every step:
    s_t = 0.5 * (t - 1) / 4, i.e. 0, 0.125, 0.25, 0.375, 0.5 at steps 1..5."""
    config = dict(mode="uniform", sparsity=0.5, begin_fraction=0.1, end_fraction=0.5, exponent=1.0,
                  mask_update_steps=1)
    learner = WeightSparsification(WeightSparsificationConfig(**{**config, **options}))
    learner.set_total_steps(10)
    return learner


def _backup(model: nn.Sequential) -> torch.Tensor:
    return model[1].parametrizations.weight.original


def _mask(model: nn.Sequential) -> torch.Tensor:
    return model[1].parametrizations.weight[0].mask


# ---- the learner's masks, gradients and finalize on one linear layer


def test_pruned_weight_returns_when_its_backup_grows():
    learner = _ramp_learner()
    model = learner.prepare(_linear(), _data(TINY_SHAPE))
    ones = torch.ones(1, *TINY_SHAPE)
    for step in (1, 2, 3):
        learner.on_step(model, step)
    # step 3: sparsity 0.25 of 8 weights = 2 zeros: 0.1 and 0.2
    assert _mask(model).tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert model(ones)[0].tolist() == pytest.approx([0.7, 2.6])  # 0.3 + 0.4, 0.5 + ... + 0.8
    with torch.no_grad():
        _backup(model)[0, 0] = 1.0  # the pruned weight's backup grows ...
    assert model(ones)[0, 0].item() == pytest.approx(0.7)  # ... which the model ignores while it is masked
    learner.on_step(model, 4)
    # step 4: sparsity 0.375 = 3 zeros among backups |1.0, 0.2, 0.3, 0.4, ...|: 0.2, 0.3, 0.4; 1.0 is back
    assert _mask(model).tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    assert model(ones)[0, 0].item() == pytest.approx(1.0)
    learner.on_step(model, 5)
    # step 5 = t_e: sparsity 0.5 = 4 zeros: 0.2, 0.3, 0.4, 0.5
    assert _mask(model).tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]


def test_gradients_of_pruned_weights_are_masked():
    learner = _ramp_learner()
    model = learner.prepare(_linear(), _data(TINY_SHAPE))
    learner.on_step(model, 3)  # mask [[0, 0, 1, 1], [1, 1, 1, 1]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, *TINY_SHAPE)).sum().backward()
    # d sum(W x) / d W_ij = x_j = 1 for a kept weight, times the mask: 0 for a pruned one
    assert _backup(model).grad.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    optimizer.step()
    # pruned backups stay (0.1, 0.2); kept ones move by -lr * 1
    expected = [[0.1, 0.2, 0.2, 0.3], [0.4, 0.5, 0.6, 0.7]]
    assert _backup(model).tolist() == [pytest.approx(row) for row in expected]


def test_a_resumed_run_past_the_end_catches_up_to_the_final_mask():
    learner = _ramp_learner()
    model = learner.prepare(_linear(), _data(TINY_SHAPE))
    learner.on_step(model, 3)  # 2 zeros
    learner.on_step(model, 8)  # t_e = 5 was skipped: 4 zeros now (0.1 ... 0.4)
    assert _mask(model).tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]


def test_finalize_keeps_the_final_mask_trained_since_the_end():
    learner = _ramp_learner()
    model = learner.prepare(_linear(), _data(TINY_SHAPE))
    for step in range(1, 7):
        learner.on_step(model, step)  # final mask at step 5: 0.1 ... 0.4 pruned
    with torch.no_grad():
        _backup(model)[0, 0] = 5.0  # larger than every kept weight, but pruned since t_e
    model = learner.finalize(model)
    assert not parametrize.is_parametrized(model[1])
    assert list(model.state_dict()) == ["1.weight"]
    assert model[1].weight.tolist() == [[0, 0, 0, 0], pytest.approx([0.5, 0.6, 0.7, 0.8])]


def test_finalize_prunes_at_once_a_run_that_ended_before_the_end():
    learner = _ramp_learner()
    model = learner.prepare(_linear(), _data(TINY_SHAPE))
    for step in (1, 2, 3):
        learner.on_step(model, step)  # 2 zeros: 0.1, 0.2
    with torch.no_grad():
        _backup(model)[0, 0] = 5.0
    model = learner.finalize(model)
    # final 4 zeros from the backups |5, 0.2, 0.3, 0.4, 0.5, ...|: 0.2, 0.3, 0.4, 0.5
    assert model[1].weight.tolist() == [[5.0, 0, 0, 0], [0, pytest.approx(0.6), pytest.approx(0.7),
                                                         pytest.approx(0.8)]]


def test_finalize_gives_exact_per_layer_sparsity_on_resnet20():
    model = _resnet20()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    learner = WeightSparsification(WeightSparsificationConfig(mode="heuristic", sparsity=0.8))
    model = learner.finalize(learner.prepare(model, _data()))  # no step: one-shot pruning in finalize
    assert sorted(model.state_dict()) == sorted(before)  # (a layer's bias now comes before its weight)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    zeros = total = 0
    for name, target in learner.targets.items():
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(target * weight.numel()), name
        zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
    assert zeros / total == pytest.approx(0.8, abs=1e-4)  # per-layer rounding: at most 11 of 270,000 weights
    for key, value in model.state_dict().items():  # batch norm and biases are untouched
        if not any(key == f"{name}.weight" for name in learner.targets):
            assert torch.equal(value, before[key]), key


# ---- the search space, checks and config errors


def test_search_space_and_projection_on_resnet20():
    model = _resnet20()
    learner = WeightSparsification(WeightSparsificationConfig(sparsity=0.7))
    space = learner.search_space(model, SHAPE, SearchConfig())
    names = [name for name, _ in covered_layers(model, SHAPE)]
    assert space.field == "layer_sparsities" and list(space.names) == names and len(names) == 22
    assert (space.low, space.high, space.budget.target) == (0.0, 0.98, pytest.approx(0.3))
    assert len(space.features) == 22
    assert space.project([0.98] * 22) == (0.7,) * 22  # every layer at `high` -> uniform
    proposal = torch.linspace(0.0, 0.98, 22).tolist()
    projected = space.project(proposal)
    assert abs(space.budget.cost(projected) - 0.3) < 1e-6
    assert all(0.0 <= value <= 0.98 for value in projected)
    # the config accepts it, and prepare then uses it
    chosen = WeightSparsification(dataclasses.replace(learner.config, layer_sparsities=projected))
    chosen.prepare(model, _data())
    assert tuple(chosen.targets.values()) == projected
    fixed = WeightSparsification(WeightSparsificationConfig(mode="uniform"))
    assert fixed.search_space(model, SHAPE, SearchConfig()) is None


def test_check_rejects_a_list_of_the_wrong_length():
    learner = WeightSparsification(WeightSparsificationConfig(mode="list", layer_sparsities=(0.5, 0.5)))
    with pytest.raises(ConfigError, match=r"learner\.options\.layer_sparsities: got 2 values; expected 22"):
        learner.check(_resnet20(), SHAPE)
    with pytest.raises(ModelError, match="no conv or linear layer"):
        WeightSparsification(WeightSparsificationConfig()).check(nn.Sequential(nn.Flatten()), SHAPE)
    with pytest.raises(ModelError, match="finalize called before prepare"):
        WeightSparsification(WeightSparsificationConfig()).finalize(_linear())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"sparsity": 1.0}, r"learner\.options\.sparsity: got 1\.0; allowed range is \[0, 1\)"),
        ({"mode": "random"}, r"learner\.options\.mode: got 'random'; allowed: uniform, heuristic, list, auto"),
        ({"mode": "list", "layer_sparsities": [0.5, 1.2]}, r"learner\.options\.layer_sparsities\[1\]: got 1\.2"),
        ({"mode": "list"}, r"learner\.options\.mode: got 'list' without layer_sparsities"),
        ({"mode": "heuristic", "layer_sparsities": [0.5]}, r"layer_sparsities: got 1 values with mode 'heuristic'"),
        ({"sparsity": 0.99}, r"learner\.options\.sparsity: got 0\.99 with mode 'auto'"),
        ({"max_layer_sparsity": 1.0}, r"learner\.options\.max_layer_sparsity: got 1\.0; allowed range is \(0, 1\)"),
        ({"begin_fraction": 0.6}, r"learner\.options\.end_fraction: got 0\.5; must be above begin_fraction"),
        ({"exponent": 0.0}, r"learner\.options\.exponent: got 0\.0"),
        ({"mask_update_steps": 0}, r"learner\.options\.mask_update_steps: got 0; allowed range is \[1, inf\]"),
        ({"total_steps": 0}, r"learner\.options\.total_steps: got 0"),
    ],
)
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(WeightSparsificationConfig, options, path="learner.options")


# ---- storage and export


def test_packed_round_trip_and_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 50))
    learner = WeightSparsification(WeightSparsificationConfig(mode="uniform", sparsity=0.9))
    model = learner.finalize(learner.prepare(model, _data((1, 4, 4))))
    packed = learner.packed(model)
    assert list(packed) == ["1.weight"]  # the bias stays dense (pack_state_dict)
    # 800 weights, 720 zeros: bitmask 800 / 8 = 100 bytes + 80 non-zeros * 4 = 420 bytes (dense: 3200)
    assert packed["1.weight"].nbytes == 420
    sizes = write_packed(tmp_path / "sparse.pfpack", pack_state_dict(model.state_dict(), packed))
    dense = write_packed(tmp_path / "dense.pfpack", pack_state_dict(model.state_dict(), {}))
    assert (sizes["payload_bytes"], dense["payload_bytes"]) == (420 + 200, 3200 + 200)
    assert sizes["file_bytes"] < dense["file_bytes"] - 2700
    restored = nn.Sequential(nn.Flatten(), nn.Linear(16, 50))
    restored.load_state_dict(read_packed(tmp_path / "sparse.pfpack")[0])
    inputs = torch.randn(8, 1, 4, 4)
    assert torch.equal(restored(inputs), model(inputs))


def test_learner_contract_on_resnet20_through_onnx(tmp_path):
    data = _data()
    learner = WeightSparsification(from_dict(WeightSparsificationConfig, {}, path="learner.options"))
    learner.set_total_steps(2)  # t_b = round(0.2) = 0, t_e = round(1.0) = 1: the final masks come at step 1
    model = learner.finalize(train_two_steps(learner, learner.prepare(_resnet20(), data), data)).eval()
    inputs = data.train.tensors[0]
    for name, _ in covered_layers(model, SHAPE):  # auto before a search: uniform 0.5 in every layer
        weight = model.get_submodule(name).weight
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
    with torch.no_grad():
        expected = model(inputs).numpy()
    path = export_onnx(model, SHAPE, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": inputs.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the packed file reproduces the finalized model
    write_packed(tmp_path / "model.pfpack", pack_state_dict(model.state_dict(), learner.packed(model)))
    restored = _resnet20().eval()
    restored.load_state_dict(read_packed(tmp_path / "model.pfpack")[0], strict=False)
    with torch.no_grad():
        np.testing.assert_allclose(restored(inputs).numpy(), expected, rtol=1e-5, atol=1e-5)
