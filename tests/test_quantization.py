"""Uniform quantization: exact levels, straight-through gradients, activation ranges, bit allocation, finalize,
ONNX (QDQ for W8A8) and packed storage, and the learner contract on the tiny ResNet-20."""

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
from pf_ray.metrics import quantized_layers
from pf_ray.ops.batchnorm_folding import conv_bn_pairs, fold_batchnorm_, fold_batchnorms_, layers_feeding_float
from pf_ray.ops.qat_layers import (
    ActivationQuantizer,
    FakeQuantConv2d,
    FakeQuantLinear,
    FrozenQuantConv2d,
    FrozenQuantLinear,
    is_int8_qdq,
)
from pf_ray.ops.quantize import dequantize, fake_quantize, min_max_qparams, quantize, symmetric_qparams, weight_qparams
from pf_ray.strict import from_dict
from tests.tiny import SHAPE, train_two_steps
from tests.tiny import tiny_data as _data
from tests.tiny import tiny_resnet20 as _resnet20

# ONNX Runtime's float convolutions sum in another order than torch's; where an activation lies exactly halfway
# between two levels (common: a quantized layer multiplies two grids) a last-bit difference moves it one level.
# Measured on the tiny ResNet-20: up to 3.4e-3 on logits of magnitude ~0.3. Without such ties (no activation
# quantizers, or the explicit-arithmetic export of fewer bits) ORT matches to float rounding (1e-7).
QDQ_TOLERANCE = 2e-2
FLOAT_TOLERANCE = 1e-5


def _tiny_cnn() -> nn.Module:
    """conv (first, float) -> conv -> conv -> linear -> linear (last, float) on 1x8x8 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.ReLU(),
        nn.Linear(16, 10),
    )





def _onnx_run(path, inputs: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": inputs.numpy()})[0]


# --------------------------------------------------------------------------------------------------------------
# The quantizer, by hand


def test_per_tensor_levels_by_hand():
    # 2 bits, range [-0.5, 1.25]: scale = 1.75 / 3 = 7/12; zero point round(0.5 / (7/12)) = round(0.857) = 1.
    # Levels (q - 1) * 7/12 = -7/12, 0, 7/12, 14/12 (PocketFlow's min + i*scale would be -0.5, 1/12, 2/3, 1.25:
    # 0 is not a level). x / scale = -0.857, -0.171, 0.343, 1.2, 2.143 -> round + 1 = codes 0, 1, 1, 2, 3;
    # 1.25 lands on 14/12: the nudged grid moved down by 1/12, less than half a step.
    x = torch.tensor([-0.5, -0.1, 0.2, 0.7, 1.25])
    scale, zero_point = min_max_qparams(x.amin(), x.amax(), bits=2)
    assert scale.item() == pytest.approx(7 / 12) and zero_point.item() == 1
    assert quantize(x, scale, zero_point, 2).tolist() == [0, 1, 1, 2, 3]
    expected = torch.tensor([-7 / 12, 0.0, 0.0, 7 / 12, 14 / 12])
    torch.testing.assert_close(fake_quantize(x, scale, zero_point, 2), expected)


def test_the_briefs_example_rounds_its_ties_to_even():
    # [-1, -0.5, 0, 0.25, 1] at 2 bits: scale = 2/3 and -min / scale = 1.5, a tie: the zero point rounds half to
    # even, to 2 (float32 gives exactly 1.5 here), so the levels are (q - 2) * 2/3 = -4/3, -2/3, 0, 2/3 rather
    # than PocketFlow's -1, -1/3, 1/3, 1, which hold no 0 and need a zero point of 1.5 that no integer format
    # stores. x / scale = -1.5, -0.75, 0, 0.375, 1.5 -> round half even -2, -1, 0, 0, 2 -> + 2 = 0, 1, 2, 2, 4,
    # and 4 clamps to 3.
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])
    scale, zero_point = min_max_qparams(x.amin(), x.amax(), bits=2)
    assert zero_point.item() == 2
    assert quantize(x, scale, zero_point, 2).tolist() == [0, 1, 2, 2, 3]
    torch.testing.assert_close(fake_quantize(x, scale, zero_point, 2), torch.tensor([-4 / 3, -2 / 3, 0, 0, 2 / 3]))


def test_per_channel_levels_by_hand():
    # Row 0, range [-1, 2]: scale 1, zero point 1, levels -1, 0, 1, 2: itself (codes 0, 1, 3).
    # Row 1, range [0, 0.4] (widened to hold 0): scale 0.4/3, zero point 0; x / scale = 0.75, 1.875, 3 -> codes
    # 1, 2, 3 -> 0.1333, 0.2667, 0.4. One range for the tensor ([-1, 2], scale 1) would round row 1 to zeros.
    weight = torch.tensor([[-1.0, 0.0, 2.0], [0.1, 0.25, 0.4]])
    scale, zero_point = weight_qparams(weight, 2, "channel")
    torch.testing.assert_close(scale, torch.tensor([1.0, 0.4 / 3]))
    assert zero_point.tolist() == [1, 0]
    assert quantize(weight, scale, zero_point, 2).tolist() == [[0, 1, 3], [1, 2, 3]]
    torch.testing.assert_close(fake_quantize(weight, scale, zero_point, 2),
                               torch.tensor([[-1.0, 0.0, 2.0], [0.4 / 3, 0.8 / 3, 0.4]]))
    per_tensor = fake_quantize(weight, *weight_qparams(weight, 2, "tensor"), 2)
    torch.testing.assert_close(per_tensor, torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_a_zero_channel_quantizes_to_zero_with_scale_one():
    weight = torch.tensor([[0.0, 0.0], [1.0, -3.0]])
    scale, zero_point = weight_qparams(weight, 4, "channel")
    assert scale[0].item() == 1.0 and zero_point[0].item() == 0
    assert torch.equal(fake_quantize(weight, scale, zero_point, 4)[0], torch.zeros(2))


def test_symmetric_levels_by_hand():
    # Per channel. Row 0, max |w| = 1: 8 bits -> scale 1/127, zero point 128; w * 127 = -63.5, 127, 31.75 ->
    # round half to even -64, 127, 32 -> codes 64, 255, 160 (int8: -64, 127, 32; code 0 = -128 never used).
    # 2 bits -> scale 1 / (2 - 1) = 1, zero point 2: round(-0.5) = -0, 1, round(0.25) = 0 -> codes 2, 3, 2:
    # levels -2, -1, 0, 1 with -2 unused, so only three are ever used. Row 1, all zeros: scale 1, codes 128.
    weight = torch.tensor([[-0.5, 1.0, 0.25], [0.0, 0.0, 0.0]])
    scale, zero_point = weight_qparams(weight, 8, "channel", symmetric=True)
    torch.testing.assert_close(scale, torch.tensor([1 / 127, 1.0]))
    assert zero_point.tolist() == [128, 128]
    assert quantize(weight, scale, zero_point, 8).tolist() == [[64, 255, 160], [128, 128, 128]]
    scale, zero_point = symmetric_qparams(torch.tensor(1.0), 2)
    assert (scale.item(), zero_point.item()) == (1.0, 2)
    assert quantize(weight[0], scale, zero_point, 2).tolist() == [2, 3, 2]
    torch.testing.assert_close(fake_quantize(weight[0], scale, zero_point, 2), torch.tensor([0.0, 1.0, 0.0]))


def test_dequantize_of_quantize_is_the_fake_quantized_value_bit_for_bit():
    x = torch.randn(64, 9, generator=torch.Generator().manual_seed(1))
    for bits in (2, 5, 8):
        scale, zero_point = weight_qparams(x, bits, "channel")
        codes = quantize(x, scale, zero_point, bits)
        assert codes.min() >= 0 and codes.max() <= 2**bits - 1
        assert torch.equal(dequantize(codes, scale, zero_point), fake_quantize(x, scale, zero_point, bits))


# --------------------------------------------------------------------------------------------------------------
# Batch norm folding


def test_fold_batchnorm_by_hand():
    # A 1x1 conv of weight 2, no bias; BN gamma 3, beta 1, running mean 0.5, running var 3, eps 1: sigma = 2,
    # gamma / sigma = 1.5, so w' = 2 * 1.5 = 3 and b' = 1 + 1.5 * (0 - 0.5) = 0.25. At x = 1: conv 2, BN
    # 3 * (2 - 0.5) / 2 + 1 = 3.25 = 3 * 1 + 0.25.
    conv, bn = nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.weight.fill_(3.0), bn.bias.fill_(1.0), bn.running_mean.fill_(0.5), bn.running_var.fill_(3.0)
    fold_batchnorm_(conv, bn)
    assert conv.weight.item() == 3.0 and conv.bias.item() == 0.25
    assert conv(torch.ones(1, 1, 1, 1)).item() == 3.25 == bn.eval()(torch.full((1, 1, 1, 1), 2.0)).item()


def test_folded_conv_matches_conv_then_bn_in_eval_mode():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.2, 3), bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = bn.eval()(conv(x))
        fold_batchnorm_(conv, bn)
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=0)


class _ConvUsedTwice(nn.Module):
    """conv -> bn, but the conv's output is also added back: folding the BN would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it, so only the Sequential's conv -> bn counts."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Conv2d(2, 2, 1))
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)  # registered in order, but never run so

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if x.sum() > 0 else self.bn(self.body(x))


def test_conv_bn_pairs_follow_the_graph_not_the_module_order():
    model = _resnet20()
    pairs = conv_bn_pairs(model)
    # every conv of ResNet-20 has its BN: stem, 2 per block x 9, 2 projection shortcuts
    assert len(pairs) == 21 and pairs[:2] == [("conv1", "bn1"), ("layer1.0.conv1", "layer1.0.bn1")]
    assert ("layer2.0.shortcut.0", "layer2.0.shortcut.1") in pairs
    assert conv_bn_pairs(_ConvUsedTwice()) == []
    assert conv_bn_pairs(_tiny_cnn()) == [("0", "1")]
    assert conv_bn_pairs(_Untraceable()) == [("body.0", "body.1")]  # the fallback without fx
    no_statistics = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    assert conv_bn_pairs(no_statistics) == []  # normalises by each batch: nothing to fold


def test_layers_feeding_float_on_resnet20():
    # conv1 of a block feeds (through bn1 folded away and a ReLU) conv2: a quantized layer. conv2 and the
    # projection shortcuts feed the residual add: float.
    model = _resnet20()
    names = quantized_layers(model, SHAPE, first_last=False)
    fold_batchnorms_(model, names)
    feeding = layers_feeding_float(model, names)
    expected = {f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)} | {"layer2.0.shortcut.0",
                                                                              "layer3.0.shortcut.0"}
    assert feeding == expected


def _conv_bn_by_hand() -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """test_fold_batchnorm_by_hand's pair: folded, w' = 3 and b' = 0.25."""
    conv, bn = nn.Conv2d(1, 1, 1, bias=False), nn.BatchNorm2d(1, eps=1.0, momentum=0.5)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.weight.fill_(3.0), bn.bias.fill_(1.0), bn.running_mean.fill_(0.5), bn.running_var.fill_(3.0)
    return conv, bn


def test_qat_conv_quantizes_the_folded_weight_and_trains_through_batch_norm():
    conv, bn = _conv_bn_by_hand()
    layer = FakeQuantConv2d.from_float(conv, weight_bits=8, granularity="channel", activation_bits=None,
                                       ema_decay=0.9, bn=bn)
    # The folded weight 3 on its own 8-bit grid [0, 3]: scale 3/255, code 255, exactly 3 again.
    torch.testing.assert_close(layer.quantized_weight(), torch.full((1, 1, 1, 1), 3.0))
    layer.eval()
    assert layer(torch.ones(1, 1, 1, 1)).item() == pytest.approx(3.25)  # 3 * 1 + 0.25, the folded layer
    # Training: conv(x, 3) / 1.5 = 2x, then BN on the batch's statistics. x = 0, 1, 2, 3: 2x = 0, 2, 4, 6, mean 3,
    # biased variance 5, so 3 * (2x - 3) / sqrt(5 + 1) + 1; running mean 0.5 -> 0.5 * 0.5 + 0.5 * 3 = 1.75.
    layer.train()
    x = torch.arange(4.0).reshape(4, 1, 1, 1)
    expected = 3 * (2 * x - 3) / 6**0.5 + 1
    torch.testing.assert_close(layer(x), expected)
    assert bn.running_mean.item() == pytest.approx(1.75)
    layer.weight.grad = None
    layer(x).pow(2).sum().backward()
    assert layer.weight.grad is not None and bn.weight.grad is not None  # both train
    # Frozen: w' = Q(w gamma / sigma) and b' from the new running statistics; same output as eval mode.
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
        frozen = layer.freeze()
        torch.testing.assert_close(frozen(x), expected, atol=1e-6, rtol=0)
    assert frozen.bias is not None and not hasattr(frozen, "bn")


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
# Straight-through gradients


def test_gradient_is_one_where_the_code_was_not_clamped():
    # 2 bits, scale 0.5, zero point 1: levels -0.5, 0, 0.5, 1. Codes before clamping round(x / 0.5) + 1:
    # -2 -> -3 (clamped), -0.5 -> 0, 0.3 -> 2, 1.0 -> 3, 1.2 -> round(2.4) + 1 = 3 (not clamped: within half a
    # step of the top level), 3 -> 7 (clamped). Gradient 0, 1, 1, 1, 1, 0.
    x = torch.tensor([-2.0, -0.5, 0.3, 1.0, 1.2, 3.0], requires_grad=True)
    out = fake_quantize(x, torch.tensor(0.5), torch.tensor(1, dtype=torch.int32), 2)
    out.backward(torch.arange(1.0, 7.0))  # distinct upstream gradients: each passes unchanged or is zeroed
    torch.testing.assert_close(out.detach(), torch.tensor([-0.5, -0.5, 0.5, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 5.0, 0.0]))


def test_every_weight_gets_the_straight_through_gradient():
    # The weights of test_per_tensor_levels_by_hand: 1.25 lies above the top level (14/12) but its code
    # round(2.143) + 1 = 3 is not clamped, so it trains like the others: d(sum of outputs)/dw = input = 1.
    layer = FakeQuantLinear.from_float(nn.Linear(5, 1, bias=False), weight_bits=2, granularity="tensor",
                                       activation_bits=None, ema_decay=0.9)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-0.5, -0.1, 0.2, 0.7, 1.25]]))
    out = layer(torch.ones(1, 5))
    assert out.item() == pytest.approx(-7 / 12 + 0 + 0 + 7 / 12 + 14 / 12)
    out.backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(1, 5))


# --------------------------------------------------------------------------------------------------------------
# Activation ranges


def test_activation_range_is_an_ema_in_training_and_frozen_in_eval():
    quantizer = ActivationQuantizer(bits=8, ema_decay=0.9)
    quantizer.eval()
    unseen = torch.tensor([-3.0, 0.123])
    assert torch.equal(quantizer(unseen), unseen)  # no range yet: float
    quantizer.train()
    quantizer(torch.tensor([-1.0, 2.0]))  # the first batch sets the range: [-1, 2]
    quantizer(torch.tensor([0.0, 4.0]))  # min 0.9 * -1 + 0.1 * 0 = -0.9, max 0.9 * 2 + 0.1 * 4 = 2.2
    assert quantizer.running_min.item() == pytest.approx(-0.9)
    assert quantizer.running_max.item() == pytest.approx(2.2)
    quantizer.eval()
    x = torch.tensor([-10.0, 10.0], requires_grad=True)
    out = quantizer(x)  # frozen: the range stays [-0.9, 2.2]
    assert quantizer.running_min.item() == pytest.approx(-0.9)
    # scale = 3.1 / 255, zero point round(0.9 / scale) = round(74.03) = 74: -10 clamps to code 0 = -74 * scale,
    # 10 to code 255 = 181 * scale; both clamped, so no gradient.
    scale, zero_point = quantizer.qparams()
    assert zero_point.item() == 74 and scale.item() == pytest.approx(3.1 / 255)
    torch.testing.assert_close(out.detach(), torch.tensor([-74 * 3.1 / 255, 181 * 3.1 / 255]))
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0]


def test_calibration_takes_the_widest_range():
    quantizer = ActivationQuantizer(bits=4, ema_decay=0.9).eval()
    quantizer.calibrating = True
    quantizer(torch.tensor([-1.0, 2.0]))
    quantizer(torch.tensor([0.5, 3.0]))
    assert (quantizer.running_min.item(), quantizer.running_max.item()) == (-1.0, 3.0)


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


def test_first_and_last_layers_stay_float_by_default():
    model = _resnet20()
    names = quantized_layers(model, SHAPE, first_last=False)
    assert len(names) == 20 and names[0] == "layer1.0.conv1" and names[-1] == "layer3.2.conv2"
    assert "layer2.0.shortcut.0" in names
    every = quantized_layers(model, SHAPE, first_last=True)
    assert every == ["conv1", *names, "fc"]


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
