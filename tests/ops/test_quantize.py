"""Uniform quantization's maths (pf_ray.ops.quantize, batchnorm_folding, qat_layers): exact levels, batch norm
folding, straight-through gradients, activation ranges, which layers are quantized."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pf_ray.metrics import quantized_layers
from pf_ray.ops.batchnorm_folding import conv_bn_pairs, fold_batchnorm_, fold_batchnorms_, layers_feeding_float
from pf_ray.ops.qat_layers import ActivationQuantizer, FakeQuantConv2d, FakeQuantLinear
from pf_ray.ops.quantize import dequantize, fake_quantize, min_max_qparams, quantize, symmetric_qparams, weight_qparams
from tests.tiny import SHAPE
from tests.tiny import tiny_cnn as _tiny_cnn
from tests.tiny import tiny_resnet20 as _resnet20

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
# Which layers are quantized


def test_first_and_last_layers_stay_float_by_default():
    model = _resnet20()
    names = quantized_layers(model, SHAPE, first_last=False)
    assert len(names) == 20 and names[0] == "layer1.0.conv1" and names[-1] == "layer3.2.conv2"
    assert "layer2.0.shortcut.0" in names
    every = quantized_layers(model, SHAPE, first_last=True)
    assert every == ["conv1", *names, "fc"]
