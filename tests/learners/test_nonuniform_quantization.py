"""The nonuniform_quantization learner (trained codebooks): the contract on ResNet-20 with ONNX and packed
storage, search space and projection, a sparse model's zeros kept, config and check errors."""

from __future__ import annotations

import copy
import math

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

from pf_ray.config import SearchConfig
from pf_ray.errors import ConfigError, ModelError
from pf_ray.export.onnx import export_onnx
from pf_ray.export.packed import pack_state_dict, read_packed, write_packed
from pf_ray.learners.nonuniform_quantization import NonUniformQuantization, NonUniformQuantizationConfig
from pf_ray.metrics import quantized_layers
from pf_ray.registry import LEARNERS
from pf_ray.strict import from_dict
from tests.tiny import SHAPE, train_two_steps
from tests.tiny import tiny_data as _data
from tests.tiny import tiny_resnet20 as _resnet20


def test_learner_contract_on_resnet20_exports_and_packs(tmp_path):
    data = _data()
    config = from_dict(NonUniformQuantizationConfig, {}, path="learner.options")  # auto, unsearched: 4 bits
    learner = LEARNERS.get("nonuniform_quantization")(config)
    baseline = _resnet20()
    model = learner.prepare(copy.deepcopy(baseline), data)
    # every conv but the stem: 18 block convs and 2 shortcut convs; conv1 and fc stay float
    assert len(learner.layer_bits) == 20 and list(learner.layer_bits) == quantized_layers(baseline, SHAPE)
    assert "conv1" not in learner.layer_bits and "fc" not in learner.layer_bits
    model = learner.finalize(train_two_steps(learner, model, data, learning_rate=0.05)).eval()
    inputs = data.train.tensors[0]
    assert type(model.layer1[0].conv1) is nn.Conv2d  # a plain model again
    assert model.state_dict().keys() == baseline.state_dict().keys()
    for name in learner.layer_bits:
        assert model.get_submodule(name).weight.unique().numel() <= 16
    assert model.conv1.weight.unique().numel() > 16  # the first layer stays float
    with torch.no_grad():
        expected = model(inputs).numpy()
    # ONNX: a dequantized graph that ONNX Runtime runs as any float model
    path = export_onnx(model, SHAPE, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": inputs.numpy()})[0], expected, rtol=1e-4, atol=1e-4)
    # packed: k-bit codes for the quantized weights; the file reproduces the outputs
    packed = learner.packed(model)
    assert set(packed) == {f"{name}.weight" for name in learner.layer_bits}
    weight = model.layer3[0].conv2.weight
    assert packed["layer3.0.conv2.weight"].nbytes == math.ceil(weight.numel() * 4 / 8) + 4 * 16
    sizes = write_packed(tmp_path / "model.pfpack", pack_state_dict(model.state_dict(), packed))
    assert sizes["payload_bytes"] < sizes["dense_bytes"] / 6  # 4-bit weights: nearly 8x smaller
    state, _ = read_packed(tmp_path / "model.pfpack")
    restored = copy.deepcopy(baseline).eval()
    restored.load_state_dict(state, strict=False)
    with torch.no_grad():
        np.testing.assert_allclose(restored(inputs).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_search_space_budget_and_projection_on_resnet20():
    model = _resnet20()
    learner = NonUniformQuantization(NonUniformQuantizationConfig(mode="auto", bits=3))
    space = learner.search_space(model, SHAPE, SearchConfig())
    names = quantized_layers(model, SHAPE)
    assert space.field == "layer_bits" and space.names == tuple(names) and (space.low, space.high) == (1.0, 8.0)
    assert len(space.features) == len(names)
    counts = [model.get_submodule(name).weight.numel() for name in names]
    assert space.budget.weight_counts == tuple(counts) and space.budget.target == 3 / 32
    uniform = space.project([8.0] * len(names))
    assert uniform == (3.0,) * len(names) and space.budget.cost(uniform) == 3 / 32
    projected = space.project([1.0 + (i % 8) for i in range(len(names))])
    assert space.budget.cost(projected) <= 3 / 32
    # the config takes the projection, and the learner uses it
    tuned = NonUniformQuantization(NonUniformQuantizationConfig(mode="auto", bits=3, layer_bits=projected))
    tuned.prepare(model, _data())
    assert list(tuned.layer_bits.values()) == [int(b) for b in projected]
    # a mode that does not search has no space
    fixed = NonUniformQuantization(NonUniformQuantizationConfig(mode="uniform"))
    assert fixed.search_space(model, SHAPE, SearchConfig()) is None


def test_a_sparse_model_keeps_its_zeros_through_the_learner():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight[:, ::2] = 0.0  # half the weights pruned
    learner = NonUniformQuantization(NonUniformQuantizationConfig(mode="uniform", bits=2, quantize_first_last=True))
    model = learner.prepare(model, _data())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, labels = _data().train.tensors
    nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()
    model = learner.finalize(model)
    assert (model[1].weight[:, ::2] == 0).all() and (model[1].weight[:, 1::2] != 0).all()
    packed = learner.packed(model)
    # mask 16384 / 8 = 2048 bytes + 8192 non-zeros at 2 bits = 2048 bytes + 4 centroids
    assert packed["1.weight"].nbytes == 2048 + 2048 + 16
    assert np.array_equal(packed["1.weight"].decode(), model[1].weight.detach().numpy())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bits": 0}, r"learner\.options\.bits: got 0; allowed range is \[1, 8\]"),
        ({"mode": "list", "layer_bits": [4, 2.5]}, r"learner\.options\.layer_bits\[1\]: got 2\.5; allowed: whole"),
        ({"mode": "list"}, r"learner\.options\.mode: got 'list' without layer_bits"),
        ({"mode": "uniform", "layer_bits": [4]}, r"learner\.options\.layer_bits: got 1 values with mode 'uniform'"),
        ({"mode": "auto", "bits": 1, "min_bits": 2}, r"learner\.options\.bits: got 1 with mode 'auto'"),
        ({"init": "random"}, r"learner\.options\.init: got 'random'; allowed: kmeans, quantile, linear"),
        ({"optimize": "all"}, r"learner\.options\.optimize: got 'all'; allowed: weights, centroids, both"),
        ({"centroid_gradient": "max"}, r"learner\.options\.centroid_gradient: got 'max'; allowed: sum, mean"),
        ({"bucket_size": -1}, r"learner\.options\.bucket_size: got -1"),
        ({"max_bits": 9}, r"learner\.options\.max_bits: got 9; allowed range is \[1, 8\]"),
    ],
)
def test_config_is_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(NonUniformQuantizationConfig, options, path="learner.options")


def test_check_rejects_a_layer_bits_list_of_the_wrong_length_and_a_model_with_nothing_to_quantize():
    learner = NonUniformQuantization(NonUniformQuantizationConfig(mode="list", layer_bits=(4.0, 2.0)))
    with pytest.raises(ConfigError, match=r"learner\.options\.layer_bits: got 2 values; expected 20"):
        learner.check(_resnet20(), SHAPE)
    only_two = nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.Linear(8, 10))
    with pytest.raises(ModelError, match="no conv/linear layer to quantize besides the first and the last"):
        NonUniformQuantization(NonUniformQuantizationConfig()).check(only_two, SHAPE)
