"""Uniform (affine) fake quantization for quantization-aware training, and the per-layer bit allocation
(Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018; straight-through estimator after Bengio et al., 2013; bit budget after PocketFlow's RL bit optimizer).

The quantizer. A tensor (or each output channel of a weight) with range [min, max] (widened to hold 0) gets
``2^k`` levels ``(code - zero_point) * scale``, ``code`` in [0, 2^k - 1], with

    scale = (max - min) / (2^k - 1),    zero_point = round(-min / scale)    (an integer in [0, 2^k - 1])
    code = clamp(round(x / scale) + zero_point, 0, 2^k - 1)                  (round half to even)

PocketFlow normalised to [0, 1] and de-normalised, so its levels were ``min + i * scale``; those need not hold 0,
and a zero point of 1.5 can neither be stored as ``PackedTensor.integer`` codes nor written as an ONNX
QuantizeLinear. We keep PocketFlow's scale and round the zero point to an integer (TensorFlow's "nudged" range,
which its QAT rewriter used): the grid shifts by less than half a step, so no value in [min, max] is further than
half a step from a level, exactly as before, and 0 (ReLU outputs, zero padding) is exact. The arithmetic is
ONNX's QuantizeLinear/DequantizeLinear (divide, round half to even, saturate), so an exported model computes what
the torch model does. (``torch.fake_quantize_per_tensor_affine`` multiplies by 1/scale instead, and rounds some
ties the other way: an activation at 53.5 steps came out 53.499996, code 53 against ONNX Runtime's 54. Ties are
common in a quantized network, whose layers multiply grids. So the finalized modules below call it only while
being exported, where it becomes QuantizeLinear; their torch forward divides.)

Gradients (straight-through, ``_FakeQuantize``, an autograd.Function with an explicit backward): rounding
passes the gradient unchanged; clamping stops it. The gradient is 1 where the input's code ``round(x / scale) +
zero_point`` lies in [0, 2^k - 1] before clamping (the input is within half a step of the grid's ends) and 0 where
it was clamped: there the output does not move with the input, and passing the gradient through would push
activations further out of a range that is frozen at export (TensorFlow's and PyTorch's fake quantization do the
same). Weights are never clamped in practice: their grid comes from their own min/max, so ``x / scale +
zero_point`` stays within [-0.5, 2^k - 0.5] (only an exact tie at an end rounds out), and every weight gets the
plain straight-through gradient, as in PocketFlow. No gradient reaches the range itself (min/max are statistics,
and PocketFlow's straight-through path cancels theirs).

Modules. Training uses ``FakeQuantConv2d``/``FakeQuantLinear`` (weights re-quantized from their current values
every forward; optionally the layer's input through an ``ActivationQuantizer`` with a running min/max). Finalizing
turns them into ``FrozenQuantConv2d``/``FrozenQuantLinear``: the weight replaced by its dequantized values (on
the grid), scale and zero point kept as buffers, activation ranges frozen. Exported, 8-bit activations become
QuantizeLinear/DequantizeLinear (uint8 zero point, via ``torch.fake_quantize_per_tensor_affine``), fewer bits
explicit Div/Round/Add/Clip/Sub/Mul; when a layer's weights and input are both 8-bit, its weight also passes
through QuantizeLinear/DequantizeLinear (int8, per channel on axis 0 or per tensor), so ONNX Runtime sees
DQ(input), DQ(weight) -> Conv, the QDQ form its integer kernels (QLinearConv) are fused from.

What ONNX Runtime needs to run a W8A8 file on integer kernels (it fuses DQ(input), DQ(weight) -> Conv -> Q into
QLinearConv only where the conv's output goes straight to a QuantizeLinear). Measured on ResNet-20, 1x28x28, one
thread, ORT 1.32 on this project's AVX2 EPYC, idle, median of 3 interleaved rounds of 100 runs; FP32: 0.75 ms at
batch 1, 22.8 ms at batch 32:

- no BatchNorm between the conv and the next Q: the exporter folds a BN into its conv only when the conv's
  weight is a constant, not a DequantizeLinear's output. So the QAT conv quantizes its BN-folded weight
  (``FakeQuantConv2d``'s ``bn``, pairs found on the fx graph by ``conv_bn_pairs``) and the finalized conv carries
  the folded weight and bias (``fold_batchnorm_`` is the same fold for a float conv). Unfolded (and without the
  two points below), no conv fused: 1.59 / 45.7 ms, 2x slower than FP32. Folded, 9 of the 20 fused: 1.12 / 32.2.
- a Q on every quantized conv's output: a conv feeding the next quantized layer (through a ReLU, which ORT drops
  before a Q of zero point 0) has its input quantizer; a conv before a residual add quantizes its own output
  (``output_quantizer``, on the layers ``layers_feeding_float`` finds). All 20 fused: 0.71 / 20.6 ms.
- weights with int8 zero point 0 (``symmetric_qparams``): ORT's QLinearConv is much slower with per-channel
  weight zero points. 0.57 / 16.7 ms, 1.3x faster than FP32.

The residual adds stay float between Q/DQ pairs (ORT's own static quantizer fuses them into QLinearAdd: 0.50 /
14.3 ms): the identity shortcut carries the block's input unquantized, which module-level fake quantization cannot
reach without rewriting the model's ``forward``. ORT's integer kernels round differently from the float QDQ
arithmetic (int32 bias, fixed-point requantization): logits differ by up to ~0.15 on ResNet-20 and test accuracy
by about 0.1-0.2 pt either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pf_ray.errors import ConfigError, ModelError
from pf_ray.packing import PackedTensor

MIN_BITS = 2  # PocketFlow's range for per-layer bits
MAX_BITS = 8  # ONNX's QuantizeLinear (opset 17) holds at most 8 bits
GRANULARITIES = ("tensor", "channel")  # one range per weight tensor, or one per output channel (axis 0)
INT8_BITS = 8  # the one width exported as ONNX QuantizeLinear/DequantizeLinear

# Ranges narrower than this (a channel of zeros) get scale 1: every value then rounds to the zero point.
_SMALLEST_RANGE = torch.finfo(torch.float32).tiny
# A folded batch norm's gamma / sigma is kept at least this large in magnitude: training divides by it.
_SMALLEST_FACTOR = 1e-12


# --------------------------------------------------------------------------------------------------------------
# The quantizer as pure functions


def levels(bits: int) -> int:
    """The largest code of a ``bits``-bit quantizer (2^bits - 1)."""
    return 2**bits - 1


def min_max_qparams(low: Tensor, high: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale (float32) and integer zero point (int32) of the ``bits``-bit grid over [low, high] (widened to
    hold 0), shaped like ``low``: a 0-d tensor per tensor, (C,) per channel."""
    low = torch.clamp(low.detach().float(), max=0.0)
    high = torch.clamp(high.detach().float(), min=0.0)
    scale = (high - low) / levels(bits)
    scale = torch.where(scale > _SMALLEST_RANGE, scale, torch.ones_like(scale))
    zero_point = torch.clamp(torch.round(-low / scale), 0, levels(bits)).to(torch.int32)
    return scale, zero_point


def symmetric_qparams(magnitude: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Scale and zero point of the symmetric ``bits``-bit grid over [-magnitude, magnitude]: scale = magnitude /
    (2^(bits-1) - 1), zero point 2^(bits-1), so 0 is code 2^(bits-1) (int8: 0) and the codes used run from 1 to
    2^bits - 1 (int8: -127..127, code 0 = -128 left unused: the grid TFLite, XNNPACK and ONNX Runtime's static
    quantizer give weights)."""
    half = 2 ** (bits - 1)
    scale = magnitude.detach().float() / (half - 1)
    scale = torch.where(scale > _SMALLEST_RANGE, scale, torch.ones_like(scale))
    return scale, torch.full_like(scale, half, dtype=torch.int32)


def weight_qparams(weight: Tensor, bits: int, granularity: str, *,
                   symmetric: bool = False) -> tuple[Tensor, Tensor]:
    """The grid of a weight from its own min/max (or max |w| if ``symmetric``): over the whole tensor, or per
    output channel (axis 0)."""
    if granularity == "tensor":
        if symmetric:
            return symmetric_qparams(weight.detach().abs().amax(), bits)
        return min_max_qparams(weight.amin(), weight.amax(), bits)
    if granularity == "channel":
        flat = weight.detach().reshape(weight.shape[0], -1)  # (C, everything else)
        if symmetric:
            return symmetric_qparams(flat.abs().amax(dim=1), bits)
        return min_max_qparams(flat.amin(dim=1), flat.amax(dim=1), bits)
    raise ConfigError(f"granularity: got {granularity!r}; allowed: {', '.join(GRANULARITIES)}")


def _along_axis0(param: Tensor, x: Tensor) -> Tensor:
    """A per-channel (C,) parameter shaped (C, 1, ..., 1) to broadcast over ``x``; a 0-d one unchanged."""
    return param.reshape(-1, *([1] * (x.dim() - 1))) if param.dim() == 1 else param


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Integer codes (int64) in [0, 2^bits - 1]; ``scale``/``zero_point`` 0-d or (C,) along axis 0."""
    return _codes(x, _along_axis0(scale, x), _along_axis0(zero_point, x), bits).to(torch.int64)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """The float32 values ``(codes - zero_point) * scale`` of ``quantize``'s codes."""
    scale, zero_point = _along_axis0(scale, codes), _along_axis0(zero_point, codes)
    return (codes.float() - zero_point.float()) * scale


def _codes(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    # float tensor of whole numbers; torch.round rounds half to even, like ONNX QuantizeLinear
    return torch.clamp(torch.round(x / scale) + zero_point.float(), 0, levels(bits))


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize in the forward; the straight-through gradient in the backward (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
        unclamped = torch.round(x / scale) + zero_point.float()
        codes = torch.clamp(unclamped, 0, levels(bits))
        ctx.save_for_backward(unclamped == codes)  # True where the code was not clamped
        return (codes - zero_point.float()) * scale

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad_output * inside, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """``dequantize(quantize(x))`` with the straight-through gradient: 1 where ``x``'s code was not clamped,
    0 where it was."""
    return _FakeQuantize.apply(x, _along_axis0(scale, x), _along_axis0(zero_point, x), bits)


# --------------------------------------------------------------------------------------------------------------
# Batch norm folding


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batch norm name) for every BatchNorm2d whose input is exactly one Conv2d's output, in the order
    they run.

    Found on the ``torch.fx`` graph: the BN's input must be the conv's call, that output must go nowhere else, and
    each module must be called once (a module called twice would need two foldings). Module order alone would not
    do: ResNet-20 registers a block's ``conv2, bn2`` next to each other but its shortcut conv after them. A model
    that fx cannot trace (data-dependent control flow) falls back to what needs no tracing: a Conv2d immediately
    followed by a BatchNorm2d inside one ``nn.Sequential``, which runs its children in that order.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # fx raises TraceError, TypeError, NotImplementedError, ... on code it cannot follow
        return _sequential_conv_bn_pairs(model)
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable(modules[node.target]) or len(node.args) != 1:
            continue
        source = node.args[0]
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and type(modules[source.target]) is nn.Conv2d and len(source.users) == 1
                and calls[source.target] == 1 and calls[node.target] == 1):
            pairs.append((source.target, node.target))
    return pairs


def _foldable(module: nn.Module) -> bool:
    """A plain BatchNorm2d with running statistics (one without normalises by each batch's, which no fixed
    convolution can reproduce)."""
    return type(module) is nn.BatchNorm2d and module.running_mean is not None and module.running_var is not None


def _sequential_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for (conv_name, conv), (bn_name, bn) in pairwise(module.named_children()):
                if type(conv) is nn.Conv2d and _foldable(bn):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


@torch.no_grad()
def fold_batchnorm_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s inference transform into ``conv``, in place: with s = gamma / sqrt(running_var + eps) per
    output channel, w' = s * w and b' = beta + s * (b - running_mean) (b = 0 for a conv without bias), so
    ``conv'(x) = bn(conv(x))`` in eval mode. The conv gets new Parameters (a bias if it had none); ``bn`` is left
    as it was, for the caller to replace by ``nn.Identity``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError(f"cannot fold a BatchNorm2d without running statistics ({bn}) into its convolution")
    if bn.num_features != conv.out_channels:
        raise ModelError(f"cannot fold a BatchNorm2d of {bn.num_features} channels into a convolution of "
                         f"{conv.out_channels} output channels")
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    gamma = torch.ones_like(std) if bn.weight is None else bn.weight.float()
    beta = torch.zeros_like(std) if bn.bias is None else bn.bias.float()
    factor = gamma / std  # (out_channels,)
    bias = torch.zeros_like(std) if conv.bias is None else conv.bias.float()
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((conv.weight.float() * factor.reshape(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter((beta + factor * (bias - bn.running_mean.float())).to(dtype))


def fold_batchnorms_(model: nn.Module, convs: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Fold every BN that directly follows a conv (``conv_bn_pairs``; only convs named in ``convs`` if given)
    into that conv and replace the BN by ``nn.Identity``, in place. Returns the (conv, bn) pairs folded."""
    wanted = None if convs is None else set(convs)
    pairs = [(c, b) for c, b in conv_bn_pairs(model) if wanted is None or c in wanted]
    for conv_name, bn_name in pairs:
        fold_batchnorm_(model.get_submodule(conv_name), model.get_submodule(bn_name))
        model.set_submodule(bn_name, nn.Identity())
    return pairs


# Modules and functions a tensor passes through unchanged in the sense that matters to ONNX Runtime's QDQ fusion:
# a folded BN (now Identity) and activations it fuses away (Relu before a QuantizeLinear of zero point 0).
_PASS_THROUGH_MODULES = (nn.Identity, nn.ReLU, nn.ReLU6)
_PASS_THROUGH_FUNCTIONS = (F.relu, F.relu6, torch.relu, torch.relu_)
_PASS_THROUGH_METHODS = ("relu", "relu_")


def layers_feeding_float(model: nn.Module, layers: Sequence[str]) -> set[str]:
    """The names in ``layers`` whose output reaches something other than another of ``layers``, after passing
    through identities and ReLUs (fx graph of ``model``; every conv/linear still a plain module).

    In ResNet-20 these are each block's second conv and the shortcut convs (their output meets the residual add),
    not the first conv (its output, through a ReLU, is the second conv's input). An INT8 layer of this kind
    needs its own output quantizer before ONNX Runtime can fuse it into an integer kernel. A model fx cannot
    trace gives the empty set (no output quantizers: a slower INT8 file, the same model).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # see conv_bn_pairs
        return set()
    modules = dict(model.named_modules())
    wanted = set(layers)

    def passes_through(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return type(modules[node.target]) in _PASS_THROUGH_MODULES
        if node.op == "call_function":
            return node.target in _PASS_THROUGH_FUNCTIONS
        return node.op == "call_method" and node.target in _PASS_THROUGH_METHODS

    def reaches_float(node: torch.fx.Node) -> bool:
        for user in node.users:
            if user.op == "call_module" and user.target in wanted:
                continue
            if not passes_through(user) or reaches_float(user):
                return True
        return False

    return {node.target for node in graph.nodes
            if node.op == "call_module" and node.target in wanted and reaches_float(node)}


# --------------------------------------------------------------------------------------------------------------
# Training modules


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantization of a layer's input, over a running min/max.

    Training: each batch's min/max updates the range as an exponential moving average (the first batch sets
    it), and the batch is quantized over the updated range. Eval: the range is frozen. ``calibrating`` (set by
    the learner's ``prepare``, in eval mode) widens the range to every batch's min/max instead: an ORT-style
    MinMax calibration before fine-tuning. A quantizer that has seen no batch passes its input through.
    """

    def __init__(self, bits: int, ema_decay: float, *, device: torch.device | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.ema_decay = ema_decay  # running = decay * running + (1 - decay) * batch
        self.calibrating = False
        self.register_buffer("running_min", torch.zeros((), device=device))
        self.register_buffer("running_max", torch.zeros((), device=device))
        self.register_buffer("observed", torch.zeros((), dtype=torch.bool, device=device))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ema_decay={self.ema_decay}"

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        low, high = x.detach().amin().float(), x.detach().amax().float()
        if not self.observed:
            self.running_min.copy_(low)
            self.running_max.copy_(high)
            self.observed.fill_(True)
        elif self.calibrating:
            self.running_min.copy_(torch.minimum(self.running_min, low))
            self.running_max.copy_(torch.maximum(self.running_max, high))
        else:
            self.running_min.lerp_(low, 1.0 - self.ema_decay)
            self.running_max.lerp_(high, 1.0 - self.ema_decay)

    def qparams(self) -> tuple[Tensor, Tensor]:
        return min_max_qparams(self.running_min, self.running_max, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.calibrating:
            self.observe(x)
        if not self.observed:
            return x
        scale, zero_point = self.qparams()
        return fake_quantize(x, scale, zero_point, self.bits)


class _FakeQuantLayer:
    """What the QAT conv and linear layers share: weights re-quantized from their current values every forward
    (range per tensor or per output channel), an optional quantizer on the input and one on the output, and
    (convolutions) an optional batch norm whose scale is folded into the quantized weight (``FakeQuantConv2d``)."""

    weight: nn.Parameter
    weight_bits: int
    granularity: str
    symmetric: bool
    bn: nn.BatchNorm2d | None
    input_quantizer: ActivationQuantizer | None
    output_quantizer: ActivationQuantizer | None

    def _set_quantization(self, weight_bits: int, granularity: str, activation_bits: int | None,
                          ema_decay: float, output_bits: int | None = None, symmetric: bool = False) -> None:
        self.weight_bits = weight_bits
        self.granularity = granularity
        self.symmetric = symmetric
        self.input_quantizer = None if activation_bits is None else ActivationQuantizer(
            activation_bits, ema_decay, device=self.weight.device)
        self.output_quantizer = None if output_bits is None else ActivationQuantizer(
            output_bits, ema_decay, device=self.weight.device)

    def bn_factor(self) -> Tensor:
        """gamma / sqrt(running_var + eps) per output channel of the attached batch norm (a channel whose gamma is
        0 gets a tiny factor of gamma's sign instead, so that dividing by it stays finite)."""
        bn = self.bn
        gamma = torch.ones_like(bn.running_var) if bn.weight is None else bn.weight
        factor = gamma / torch.sqrt(bn.running_var + bn.eps)
        tiny = torch.full_like(factor, _SMALLEST_FACTOR).copysign(factor.detach())
        return torch.where(factor.detach().abs() > _SMALLEST_FACTOR, factor, tiny)

    def bn_bias(self, factor: Tensor) -> Tensor:
        """The folded bias: beta + (b - running_mean) * factor (b = 0 without a conv bias)."""
        bn = self.bn
        bias = torch.zeros_like(bn.running_mean) if self.bias is None else self.bias
        beta = torch.zeros_like(bn.running_mean) if bn.bias is None else bn.bias
        return beta + (bias - bn.running_mean) * factor

    def folded_weight(self) -> Tensor:
        """The weight the deployed layer computes with: the weight itself, or weight * bn_factor per channel."""
        if getattr(self, "bn", None) is None:
            return self.weight
        return self.weight * _along_axis0(self.bn_factor(), self.weight)

    def weight_grid(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point of the current (folded) weights."""
        return weight_qparams(self.folded_weight().detach(), self.weight_bits, self.granularity,
                              symmetric=self.symmetric)

    def quantized_weight(self) -> Tensor:
        scale, zero_point = self.weight_grid()
        return fake_quantize(self.folded_weight(), scale, zero_point, self.weight_bits)

    def _quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _quantized_output(self, y: Tensor) -> Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_bits={self.weight_bits}, granularity={self.granularity}"
                + (", symmetric" if self.symmetric else ""))

    @classmethod
    def from_float(cls, layer: nn.Conv2d | nn.Linear, *, weight_bits: int, granularity: str,
                   activation_bits: int | None, ema_decay: float, output_bits: int | None = None,
                   symmetric: bool = False, bn: nn.BatchNorm2d | None = None) -> _FakeQuantLayer:
        """A QAT layer holding ``layer``'s own Parameters (an optimiser built on either trains both); with ``bn``
        (a conv only: the BatchNorm2d that followed it, which the caller removes from the model), the layer
        computes conv + bn itself and quantizes the folded weight."""
        new = _empty_like(cls, layer)
        new.weight, new.bias = layer.weight, layer.bias
        if bn is not None and not isinstance(new, nn.Conv2d):
            raise ModelError(f"only a convolution takes a batch norm to fold; got a {type(layer).__name__}")
        if bn is not None and (bn.running_mean is None or bn.num_features != layer.weight.shape[0]):
            raise ModelError(f"cannot fold {bn} into a layer of {layer.weight.shape[0]} output channels")
        new.bn = bn
        new._set_quantization(weight_bits, granularity, activation_bits, ema_decay, output_bits, symmetric)
        return new

    def freeze(self) -> FrozenQuantConv2d | FrozenQuantLinear:
        """The finalized layer: weight on its grid now, activation range as observed so far."""
        frozen_class = FrozenQuantConv2d if isinstance(self, nn.Conv2d) else FrozenQuantLinear
        frozen = _empty_like(frozen_class, self)
        scale, zero_point = self.weight_grid()
        with torch.no_grad():
            codes = quantize(self.folded_weight(), scale, zero_point, self.weight_bits)
            frozen.weight = nn.Parameter(dequantize(codes, scale, zero_point).to(self.weight.dtype))
            bias = self.bias if self.bn is None else self.bn_bias(self.bn_factor())
        if self.bn is not None:
            frozen.bias = nn.Parameter(bias.detach().clone())  # a new entry: _empty_like saw no bias
        else:
            frozen.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        frozen.weight_bits = self.weight_bits
        frozen.register_buffer("weight_scale", scale)
        frozen.register_buffer("weight_zero_point", zero_point)  # unsigned: value = (code - zero_point) * scale
        frozen.input_quantizer = _frozen_observer(self.input_quantizer)
        frozen.output_quantizer = _frozen_observer(self.output_quantizer)
        return frozen


def _frozen_observer(observer: ActivationQuantizer | None) -> FrozenActivationQuantizer | None:
    """The observer's range, frozen; None where there is no observer or it never saw a batch."""
    if observer is None or not bool(observer.observed):
        return None
    return FrozenActivationQuantizer(observer.bits, *observer.qparams())


class FakeQuantConv2d(_FakeQuantLayer, nn.Conv2d):
    """With a batch norm attached (``bn``): the weight quantized is the folded one, w * gamma / sigma with sigma the
    running standard deviation. In eval mode the layer computes exactly what the folded, finalized layer does,
    conv(x, Q(w gamma / sigma)) + beta + (b - running_mean) gamma / sigma. In training mode the conv output is
    divided by gamma / sigma again and goes through the batch norm itself, on the batch's statistics (which
    update the running ones), so fine-tuning trains the unfolded weight with batch norm as the float model did
    (torch.ao's ConvBn QAT modules do the same; Jacob et al. 2018, section 3.2)."""

    def forward(self, x: Tensor) -> Tensor:
        x = self._quantized_input(x)
        if self.bn is None:
            return self._quantized_output(self._conv_forward(x, self.quantized_weight(), self.bias))
        factor = self.bn_factor()
        if not self.training:
            return self._quantized_output(self._conv_forward(x, self.quantized_weight(), self.bn_bias(factor)))
        y = self._conv_forward(x, self.quantized_weight(), None) / factor.reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return self._quantized_output(self.bn(y))


class FakeQuantLinear(_FakeQuantLayer, nn.Linear):
    bn = None  # nothing to fold

    def forward(self, x: Tensor) -> Tensor:
        return self._quantized_output(F.linear(self._quantized_input(x), self.quantized_weight(), self.bias))


def _empty_like(cls: type, layer: nn.Conv2d | nn.Linear) -> nn.Module:
    """A ``cls`` (a Conv2d or Linear subclass) with ``layer``'s hyper-parameters and placeholder weights on the
    meta device (no memory): the caller assigns the real ones."""
    if isinstance(layer, nn.Conv2d):
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                  padding_mode=layer.padding_mode, device="meta", dtype=layer.weight.dtype)
    else:
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta",
                  dtype=layer.weight.dtype)
    new.train(layer.training)
    return new


# --------------------------------------------------------------------------------------------------------------
# Finalized (exportable) modules


class FrozenActivationQuantizer(nn.Module):
    """Quantize-dequantize over a fixed range, with operators the legacy ONNX exporter writes (module docstring)."""

    def __init__(self, bits: int, scale: Tensor, zero_point: Tensor) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", scale.detach().float().reshape(()).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(()).clone())

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == INT8_BITS and torch.onnx.is_in_onnx_export():  # QuantizeLinear/DequantizeLinear, uint8
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, levels(INT8_BITS))
        zero_point = self.zero_point.float()
        return (torch.clamp(torch.round(x / self.scale) + zero_point, 0, levels(self.bits)) - zero_point) * self.scale


class _FrozenQuantLayer:
    weight: nn.Parameter
    weight_bits: int
    weight_scale: Tensor  # float32, 0-d (per tensor) or (C,) (per output channel)
    weight_zero_point: Tensor  # int32, shaped like weight_scale, in [0, 2^weight_bits - 1]
    input_quantizer: FrozenActivationQuantizer | None
    output_quantizer: FrozenActivationQuantizer | None

    @property
    def exports_int8(self) -> bool:
        """8-bit weights and an 8-bit input: exported as QuantizeLinear/DequantizeLinear on both."""
        return (self.weight_bits == INT8_BITS and self.input_quantizer is not None
                and self.input_quantizer.bits == INT8_BITS)

    def codes(self) -> Tensor:
        """The weight's integer codes (int64, shaped like the weight); exact, the weight lies on its grid."""
        return quantize(self.weight.detach(), self.weight_scale, self.weight_zero_point, self.weight_bits)

    def _exported_weight(self) -> Tensor:
        if not (self.exports_int8 and torch.onnx.is_in_onnx_export()):
            return self.weight
        # The same values (the weight is on this grid), written as int8 QDQ: codes shifted by 128 (ONNX Runtime's
        # fast x86 kernels take uint8 activations with int8 weights).
        zero_point = self.weight_zero_point - 128
        if self.weight_scale.dim() == 0:
            return torch.fake_quantize_per_tensor_affine(self.weight, self.weight_scale, zero_point, -128, 127)
        return torch.fake_quantize_per_channel_affine(self.weight, self.weight_scale, zero_point, 0, -128, 127)

    def _quantized_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _quantized_output(self, y: Tensor) -> Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}"


class FrozenQuantConv2d(_FrozenQuantLayer, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._quantized_output(self._conv_forward(self._quantized_input(x), self._exported_weight(), self.bias))


class FrozenQuantLinear(_FrozenQuantLayer, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return self._quantized_output(F.linear(self._quantized_input(x), self._exported_weight(), self.bias))


FAKE_QUANT_LAYERS = (FakeQuantConv2d, FakeQuantLinear)
FROZEN_QUANT_LAYERS = (FrozenQuantConv2d, FrozenQuantLinear)


def freeze_(model: nn.Module) -> nn.Module:
    """Replace every QAT layer of ``model`` by its finalized form, in place; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FAKE_QUANT_LAYERS):
            model.set_submodule(name, module.freeze())
    return model


def is_int8_qdq(model: nn.Module) -> bool:
    """Whether a finalized model exports as an INT8 QDQ model: it has quantized layers and every one of them has
    8-bit weights and an 8-bit input (layers left in float, e.g. the first and last, are allowed)."""
    layers = [m for m in model.modules() if isinstance(m, FROZEN_QUANT_LAYERS)]
    return bool(layers) and all(layer.exports_int8 for layer in layers)


def packed_weights(model: nn.Module) -> dict[str, PackedTensor]:
    """``PackedTensor.integer`` codes (weight_bits each) plus scales and zero points for the weight of every
    finalized quantized layer, keyed ``"<layer>.weight"`` like the model's state dict."""
    packed = {}
    for name, module in model.named_modules():
        if isinstance(module, FROZEN_QUANT_LAYERS):
            packed[f"{name}.weight"] = PackedTensor.integer(
                module.codes(), module.weight_bits, module.weight_scale.reshape(-1),
                module.weight_zero_point.reshape(-1))
    return packed
