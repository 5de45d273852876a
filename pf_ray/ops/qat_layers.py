"""The quantization-aware-training layers: conv/linear layers that train through fake-quantized weights (and,
optionally, inputs and outputs), and the frozen forms they finalize to, which export as ONNX QDQ (Jacob et al.,
CVPR 2018). What their exported form needs to run on ONNX Runtime's integer kernels: docs/design.md, "Uniform
quantization"."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pf_ray.errors import ModelError
from pf_ray.ops.batchnorm_folding import conv_bn_pairs, layers_feeding_float
from pf_ray.ops.quantize import (
    INT8_BITS,
    along_axis0,
    dequantize,
    fake_quantize,
    levels,
    min_max_qparams,
    quantize,
    weight_qparams,
)
from pf_ray.packing import PackedTensor

# A folded batch norm's gamma / sigma is kept at least this large in magnitude: training divides by it.
_SMALLEST_FACTOR = 1e-12


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
        self._seen = False  # a host-side copy of ``observed`` once it is True: no GPU sync per forward after that

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._seen = False  # the loaded ``observed`` decides again
        super()._load_from_state_dict(*args, **kwargs)

    def _observed(self) -> bool:
        if not self._seen:
            self._seen = bool(self.observed)
        return self._seen

    def extra_repr(self) -> str:
        return f"bits={self.bits}, ema_decay={self.ema_decay}"

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        low, high = x.detach().amin().float(), x.detach().amax().float()
        if not self._observed():
            self.running_min.copy_(low)
            self.running_max.copy_(high)
            self.observed.fill_(True)
            self._seen = True
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
        if not self._observed():
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
        return self.weight * along_axis0(self.bn_factor(), self.weight)

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


class FrozenActivationQuantizer(nn.Module):
    """Quantize-dequantize over a fixed range, with operators the legacy ONNX exporter writes (docs/design.md)."""

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


def fake_quantize_layers_(model: nn.Module, layer_bits: Mapping[str, int], *, granularity: str,
                          activation_bits: int | None, ema_decay: float, fold_batchnorm: bool = True,
                          int8_outputs: bool = True, symmetric_int8: bool = True, activations: bool = True) -> None:
    """Swap each plain conv/linear layer named in ``layer_bits`` for its fake-quantized form at those weight bits,
    in place.

    Args:
        activation_bits: the inputs' bits (None: float inputs).
        fold_batchnorm: a BatchNorm2d that directly follows one of the convs (``conv_bn_pairs``) moves into it
            (``FakeQuantConv2d``'s ``bn``); the model's BN becomes ``nn.Identity``.
        int8_outputs: a W8A8 layer whose output meets no other quantized layer (``layers_feeding_float``) also
            fake-quantizes its output at 8 bits, so ONNX Runtime fuses it into an integer kernel.
        symmetric_int8: W8A8 layers' weights on the symmetric grid (int8 zero point 0).
        activations: False leaves out the input and output quantizers (a model rebuilt to load a state dict).
    """
    layers = [(name, model.get_submodule(name)) for name in layer_bits]
    batch_norms: dict[str, nn.BatchNorm2d] = {}  # conv name -> the BN it takes over
    if fold_batchnorm:
        for conv_name, bn_name in conv_bn_pairs(model):
            if conv_name in layer_bits:
                batch_norms[conv_name] = model.get_submodule(bn_name)
                model.set_submodule(bn_name, nn.Identity())
    feeding_float = (layers_feeding_float(model, list(layer_bits))
                     if int8_outputs and activation_bits == INT8_BITS else set())
    for name, layer in layers:
        bits = layer_bits[name]
        quantized_class = FakeQuantConv2d if isinstance(layer, nn.Conv2d) else FakeQuantLinear
        int8 = bits == INT8_BITS and activation_bits == INT8_BITS  # exported as INT8 QDQ
        model.set_submodule(name, quantized_class.from_float(
            layer, weight_bits=bits, granularity=granularity,
            activation_bits=activation_bits if activations else None, ema_decay=ema_decay,
            output_bits=INT8_BITS if activations and int8 and name in feeding_float else None,
            symmetric=int8 and symmetric_int8, bn=batch_norms.get(name)))
