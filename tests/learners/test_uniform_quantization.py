"""The uniform_quantization learner: batch norms taken into its QAT convs, config and check errors, search space
and projection, list mode, finalize, ONNX (QDQ for W8A8) and packed storage on the tiny ResNet-20."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from pf_ray.config import SearchConfig
from pf_ray.errors import ConfigError, ModelError
from pf_ray.export.onnx import export_onnx
from pf_ray.export.packed import pack_state_dict, read_packed, write_packed
from pf_ray.learners.uniform_quantization import UniformQuantization, UniformQuantizationConfig
from pf_ray.ops.qat_layers import (
    ActivationQuantizer,
    FakeQuantConv2d,
    FakeQuantLinear,
    FrozenQuantConv2d,
    FrozenQuantLinear,
    is_int8_qdq,
)
from pf_ray.ops.quantize import dequantize
from pf_ray.strict import from_dict
from tests.tiny import SHAPE, train_two_steps
from tests.tiny import tiny_cnn as _tiny_cnn
from tests.tiny import tiny_data as _data
from tests.tiny import tiny_resnet20 as _resnet20

# ONNX Runtime's float convolutions sum in another order than torch's; where an activation lies exactly halfway
# between two levels (common: a quantized layer multiplies two grids) a last-bit difference moves it one level.
# Measured on the tiny ResNet-20: up to 3.4e-3 on logits of magnitude ~0.3. Without such ties (no activation
# quantizers, or the explicit-arithmetic export of fewer bits) ORT matches to float rounding (1e-7).
QDQ_TOLERANCE = 2e-2
FLOAT_TOLERANCE = 1e-5


def _onnx_run(path, inputs: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs.numpy()})[0]


def test_prepare_takes_the_batch_norms_of_quantized_convs_only():
    base = _resnet20()
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, nn.BatchNorm2d):  # statistics far from identity, so folding shows
                module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2)
    learner = UniformQuantization(UniformQuantizationConfig(weight_bits=8))
    model = learner.prepare(copy.deepcopy(base), _data())
    assert isinstance(model.bn1, nn.BatchNorm2d)  # the stem conv stays float: its BN stays
    assert isinstance(model.layer1[0].bn1, nn.Identity) and isinstance(model.layer2[0].shortcut[1], nn.Identity)
    conv = model.layer1[0].conv1
    assert isinstance(conv, FakeQuantConv2d) and isinstance(conv.bn, nn.BatchNorm2d) and conv.bias is None
    # eval mode is the folded model: at 8 bits per channel, the float model to quantization error
    inputs = _data().test.tensors[0]
    with torch.no_grad():
        expected = base.eval()(inputs)
        torch.testing.assert_close(model.eval()(inputs), expected, atol=0.05, rtol=0)
        final = learner.finalize(model)
        assert not any(isinstance(m, nn.BatchNorm2d) for name, m in final.named_modules() if name != "bn1")
        assert final.layer1[0].conv1.bias is not None
        torch.testing.assert_close(final(inputs), expected, atol=0.05, rtol=0)
    unfolded = UniformQuantization(UniformQuantizationConfig(weight_bits=8, fold_batchnorm=False))
    model = unfolded.prepare(copy.deepcopy(base), _data())
    assert isinstance(model.layer1[0].bn1, nn.BatchNorm2d) and model.layer1[0].conv1.bn is None


# --------------------------------------------------------------------------------------------------------------
# Config and learner checks


@pytest.mark.parametrize(
    "options, message",
    [
        ({"weight_bits": 1}, r"learner\.options\.weight_bits: got 1; allowed range is \[2, 8\]"),
        ({"weight_bits": 9}, r"learner\.options\.weight_bits: got 9"),
        ({"activation_bits": 16}, r"learner\.options\.activation_bits: got 16; allowed range is \[2, 8\]"),
        ({"mode": "list", "layer_bits": [4, 4.5]}, r"learner\.options\.layer_bits\[1\]: got 4\.5; allowed: whole"),
        ({"mode": "list", "layer_bits": [4, 9]}, r"learner\.options\.layer_bits\[1\]: got 9\.0"),
        ({"mode": "list"}, r"learner\.options\.mode: got 'list' without layer_bits"),
        ({"layer_bits": [4]}, r"learner\.options\.layer_bits: got 1 values with mode 'uniform'"),
        ({"granularity": "bucket"}, r"learner\.options\.granularity: got 'bucket'; allowed: tensor, channel"),
        ({"mode": "rl"}, r"learner\.options\.mode: got 'rl'; allowed: uniform, list, auto"),
        ({"min_bits": 5}, r"learner\.options\.weight_bits: got 4; allowed range is \[min_bits, max_bits\]"),
        ({"max_bits": 1}, r"learner\.options\.max_bits: got 1; allowed range is \[2, 8\]"),
        ({"activation_ema_decay": 1.0}, r"learner\.options\.activation_ema_decay: got 1\.0"),
        ({"wbits": 4}, r"unknown field learner\.options\.wbits"),
    ],
)
def test_config_is_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(UniformQuantizationConfig, options, path="learner.options")


def test_layer_bits_from_yaml_become_a_tuple_of_floats():
    config = from_dict(UniformQuantizationConfig, {"mode": "list", "layer_bits": [4, 8]}, path="learner.options")
    assert config.layer_bits == (4.0, 8.0)


def test_check_rejects_layer_bits_of_the_wrong_length_before_any_data():
    learner = UniformQuantization(UniformQuantizationConfig(mode="list", layer_bits=(4.0, 4.0)))
    with pytest.raises(ConfigError, match=r"learner\.options\.layer_bits: got 2 values; expected 20"):
        learner.check(_resnet20(), SHAPE)


def test_a_model_with_only_a_first_and_last_layer_has_nothing_to_quantize():
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ModelError, match="besides its first and last"):
        UniformQuantization(UniformQuantizationConfig()).check(model, SHAPE)
    UniformQuantization(UniformQuantizationConfig(quantize_first_last=True)).check(model, SHAPE)  # both quantized


def test_search_space_and_projection_on_resnet20():
    model = _resnet20()
    learner = UniformQuantization(UniformQuantizationConfig(mode="auto", weight_bits=4))
    space = learner.search_space(model, SHAPE, SearchConfig())
    assert space.field == "layer_bits" and (space.low, space.high) == (2.0, 8.0)
    assert len(space.names) == 20 and len(space.features) == 20
    assert space.budget.target == 4 / 32
    # every weight of layer1 (16*16*9 = 2304 each) ... layer3 (64*64*9 = 36864 each)
    assert space.budget.weight_counts[0] == 2304 and space.budget.weight_counts[-1] == 36864
    uniform = space.project([8.0] * 20)
    assert uniform == (4.0,) * 20 and space.budget.cost(uniform) == pytest.approx(space.budget.target)
    rng = np.random.default_rng(0)
    for _ in range(20):
        projected = space.project(rng.uniform(2, 8, 20).tolist())
        assert space.budget.cost(projected) <= space.budget.target
        UniformQuantizationConfig(mode="auto", layer_bits=projected)  # the config accepts what project returns
    fixed = UniformQuantization(UniformQuantizationConfig(mode="uniform"))
    assert fixed.search_space(model, SHAPE, SearchConfig()) is None


def test_list_mode_gives_each_layer_its_bits():
    bits = tuple(float(2 + i % 7) for i in range(20))
    learner = UniformQuantization(UniformQuantizationConfig(mode="list", layer_bits=bits))
    model = learner.prepare(_resnet20(), _data())
    layers = [m for m in model.modules() if isinstance(m, (FakeQuantConv2d, FakeQuantLinear))]
    assert [layer.weight_bits for layer in layers] == [int(b) for b in bits]
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(model.conv1, FakeQuantConv2d)
    assert list(learner.layer_bits.values()) == [int(b) for b in bits]


# --------------------------------------------------------------------------------------------------------------
# finalize, ONNX, packed storage


def test_low_bit_model_finalizes_exports_and_packs(tmp_path):
    data = _data((1, 8, 8))
    learner = UniformQuantization(UniformQuantizationConfig(weight_bits=4, activation_bits=4,
                                                            granularity="tensor"))
    model = train_two_steps(learner, learner.prepare(_tiny_cnn(), data), data)
    assert isinstance(model[3], FakeQuantConv2d) and isinstance(model[9], FakeQuantLinear)
    assert type(model[0]) is nn.Conv2d and type(model[11]) is nn.Linear  # first and last stay float
    inputs = data.test.tensors[0]
    model.eval()
    with torch.no_grad():
        qat = model(inputs)
    with pytest.raises(ModelError, match=r"call finalize\(model\) first"):
        learner.packed(model)  # still the QAT model: its weights are float
    model = learner.finalize(model)
    assert isinstance(model[3], FrozenQuantConv2d) and isinstance(model[9], FrozenQuantLinear)
    with torch.no_grad():
        final = model(inputs)
    assert torch.equal(final, qat)  # the same arithmetic, so the same numbers
    for layer in (model[3], model[5], model[9]):  # every weight on a 16-level grid
        codes = layer.codes()
        assert len(torch.unique(codes)) <= 16 and codes.min() >= 0 and codes.max() <= 15
        assert torch.equal(dequantize(codes, layer.weight_scale, layer.weight_zero_point), layer.weight)
    assert not is_int8_qdq(model)

    path = export_onnx(model, (1, 8, 8), tmp_path / "w4a4.onnx")
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert ops["Round"] == 3 and ops["QuantizeLinear"] == 0  # 4-bit inputs as explicit arithmetic
    np.testing.assert_allclose(_onnx_run(path, inputs), final.numpy(), atol=FLOAT_TOLERANCE)

    packed = learner.packed(model)
    assert set(packed) == {"3.weight", "5.weight", "9.weight"} and set(packed) <= set(model.state_dict())
    assert packed["5.weight"].arrays["codes"].nbytes == 8 * 8 * 9 // 2  # 4 bits per weight
    assert packed["5.weight"].arrays["scale"].size == 1  # per tensor
    sizes = write_packed(tmp_path / "w4a4.pfpack", pack_state_dict(model.state_dict(), packed))
    assert sizes["payload_bytes"] < sizes["dense_bytes"]
    state, _ = read_packed(tmp_path / "w4a4.pfpack")
    reloaded = copy.deepcopy(model)
    with torch.no_grad():
        for tensor in reloaded.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()  # so every float below comes from the file
    missing, unexpected = reloaded.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith(("zero_point", "num_batches_tracked")) for key in missing)
    with torch.no_grad():
        assert torch.equal(reloaded(inputs), final)


def test_default_config_contract_on_resnet20(tmp_path):
    # What the shared contract test does with options {}: 4-bit per-channel weights, float activations.
    data = _data()
    learner = UniformQuantization(from_dict(UniformQuantizationConfig, {}, path="learner.options"))
    learner.check(_resnet20(), SHAPE)
    model = learner.finalize(train_two_steps(learner, learner.prepare(_resnet20(), data), data)).eval()
    assert set(learner.layer_bits.values()) == {4} and not is_int8_qdq(model)
    inputs = data.test.tensors[0]
    with torch.no_grad():
        final = model(inputs)
    path = export_onnx(model, SHAPE, tmp_path / "w4.onnx")
    np.testing.assert_allclose(_onnx_run(path, inputs), final.numpy(), atol=FLOAT_TOLERANCE)
    assert len(learner.packed(model)) == 20


@pytest.fixture(scope="module")
def w8a8_resnet20():
    """The learner contract on the tiny ResNet-20 at 8/8 bits, per-channel weights: prepare (calibrating the
    activation ranges), two SGD steps with on_step, finalize. Returns (learner, QAT eval logits, finalized)."""
    data = _data()
    learner = UniformQuantization(UniformQuantizationConfig(weight_bits=8, activation_bits=8))
    model = learner.prepare(_resnet20(), data)
    assert all(q.observed for q in model.modules() if isinstance(q, ActivationQuantizer))  # calibrated
    model = train_two_steps(learner, model, data)
    model.eval()
    with torch.no_grad():
        qat = model(data.test.tensors[0])
    return learner, qat, learner.finalize(model)


def test_w8a8_finalized_resnet20_matches_qat_and_exports_as_qdq(w8a8_resnet20, tmp_path):
    learner, qat, model = w8a8_resnet20
    inputs = _data().test.tensors[0]
    with torch.no_grad():
        final = model(inputs)
    assert final.shape == (16, 10) and torch.equal(final, qat)
    assert is_int8_qdq(model)
    path = export_onnx(model, SHAPE, tmp_path / "w8a8.onnx")
    graph = onnx.load(str(path)).graph
    ops = Counter(node.op_type for node in graph.node)
    # 20 layers: input + weight each, and an output for the 9 second convs and 2 shortcuts (before the adds)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 51
    assert ops["BatchNormalization"] == 0  # the stem's BN folded by the exporter, the others by prepare
    axes = [next((a.i for a in node.attribute if a.name == "axis"), None)
            for node in graph.node if node.op_type == "QuantizeLinear"]
    assert axes.count(0) == 20  # the per-channel weight quantizers
    # symmetric weights: int8 zero point 0 (the weight zero point buffers hold 128 on the unsigned grid)
    layers = [m for m in model.modules() if isinstance(m, FrozenQuantConv2d)]
    assert len(layers) == 20 and all(bool((layer.weight_zero_point == 128).all()) for layer in layers)
    # The QDQ arithmetic itself (ORT without graph optimisations) is what torch computes.
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": inputs.numpy()})[0], final.numpy(),
                               atol=QDQ_TOLERANCE)
    # Optimised, ONNX Runtime runs every quantized conv on its integer kernel.
    optimized = ort.SessionOptions()
    optimized.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    optimized.optimized_model_filepath = str(tmp_path / "w8a8.optimized.onnx")
    ort.InferenceSession(str(path), optimized, providers=["CPUExecutionProvider"])
    fused = Counter(node.op_type for node in onnx.load(optimized.optimized_model_filepath).graph.node)
    assert fused["QLinearConv"] == 20 and fused["Conv"] + fused["FusedConv"] == 1  # the float stem (+ ReLU)


def test_w8a8_packed_round_trip(w8a8_resnet20, tmp_path):
    learner, _, model = w8a8_resnet20
    packed = learner.packed(model)
    assert len(packed) == 20 and set(packed) <= set(model.state_dict())
    conv = packed["layer3.0.conv2.weight"]
    assert conv.bits == 8 and conv.arrays["codes"].nbytes == 64 * 64 * 9 and conv.arrays["scale"].size == 64
    write_packed(tmp_path / "w8a8.pfpack", pack_state_dict(model.state_dict(), packed))
    state, _ = read_packed(tmp_path / "w8a8.pfpack")
    assert torch.equal(state["layer3.0.conv2.weight"], model.layer3[0].conv2.weight)
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inputs = _data().test.tensors[0]
    with torch.no_grad():
        before = model(inputs)
        missing, unexpected = model.load_state_dict(state, strict=False)
        after = model(inputs)
    assert not unexpected and all(key.endswith(("zero_point", "num_batches_tracked")) for key in missing)
    model.load_state_dict(original)
    assert torch.equal(after, before)


def test_finalized_float_activation_model_is_plain_float(tmp_path):
    data = _data((1, 8, 8))
    learner = UniformQuantization(UniformQuantizationConfig(weight_bits=3, granularity="channel"))
    model = learner.finalize(learner.prepare(_tiny_cnn(), data)).eval()
    assert model[3].input_quantizer is None and len(torch.unique(model[5].weight[0])) <= 8  # 3 bits
    path = export_onnx(model, (1, 8, 8), tmp_path / "w3.onnx")
    ops = Counter(node.op_type for node in onnx.load(str(path)).graph.node)
    assert not {"QuantizeLinear", "Round"} & set(ops)  # dequantized weights only
    with torch.no_grad():
        np.testing.assert_allclose(_onnx_run(path, data.test.tensors[0]), model(data.test.tensors[0]).numpy(),
                                   atol=FLOAT_TOLERANCE)
