"""The uniform (affine) quantizer as pure functions: grids, codes, and fake quantization with the straight-through
gradient (Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018; straight-through estimator after Bengio et al., 2013). Why the grid and its rounding are
as they are: docs/design.md, "Uniform quantization"."""

from __future__ import annotations

import torch
from torch import Tensor

from pf_ray.errors import ConfigError

MIN_BITS = 2  # PocketFlow's range for per-layer bits
GRANULARITIES = ("tensor", "channel")  # one range per weight tensor, or one per output channel (axis 0)
INT8_BITS = 8  # the one width exported as ONNX QuantizeLinear/DequantizeLinear

# Ranges narrower than this (a channel of zeros) get scale 1: every value then rounds to the zero point.
_SMALLEST_RANGE = torch.finfo(torch.float32).tiny

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


def along_axis0(param: Tensor, x: Tensor) -> Tensor:
    """A per-channel (C,) parameter shaped (C, 1, ..., 1) to broadcast over ``x``; a 0-d one unchanged."""
    return param.reshape(-1, *([1] * (x.dim() - 1))) if param.dim() == 1 else param


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    """Integer codes (int64) in [0, 2^bits - 1]; ``scale``/``zero_point`` 0-d or (C,) along axis 0."""
    return _codes(x, along_axis0(scale, x), along_axis0(zero_point, x), bits).to(torch.int64)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """The float32 values ``(codes - zero_point) * scale`` of ``quantize``'s codes."""
    scale, zero_point = along_axis0(scale, codes), along_axis0(zero_point, codes)
    return (codes.float() - zero_point.float()) * scale


def _codes(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int) -> Tensor:
    # float tensor of whole numbers; torch.round rounds half to even, like ONNX QuantizeLinear
    return torch.clamp(torch.round(x / scale) + zero_point.float(), 0, levels(bits))


class _FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize in the forward; the straight-through gradient in the backward (docs/design.md)."""

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
    0 where it was. Computed in fp32 whatever ``x`` is (a bf16 activation under autocast: bf16's 8 significant
    bits cannot hold an 8-bit grid's rounding); the result is fp32."""
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    return _FakeQuantize.apply(x, along_axis0(scale, x), along_axis0(zero_point, x), bits)
