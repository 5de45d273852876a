"""Features sampled at random output positions of chosen conv/linear layers, for LASSO channel selection and its
least-squares refit (He et al., "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017).

Forward hooks sample each layer's input patches and output; a TorchFunctionMode sees the residual additions, so a
layer whose output meets another tensor in an add also gets that other operand (the correction of He et al.,
Sec. 3.3, in ``residual_target``).
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from pf_ray.hooks import forward_hooks


@dataclass
class LayerSamples:
    """One conv/linear layer observed at sampled points: ``points`` = images x positions per image."""

    inputs: torch.Tensor | None  # (points, in_features, kernel): the im2col patch of every input channel
    outputs: torch.Tensor | None  # (points, out_features): the layer's output before its bias
    # The other operand of the residual add that the layer's output (through at most one batch norm) flows into,
    # at the same points, and the factor that maps a change after that batch norm back to the layer's output
    # (sqrt(running_var + eps) / weight; ones without batch norm). None when the output reaches no add.
    partner: torch.Tensor | None = None  # (points, out_features)
    partner_scale: torch.Tensor | None = None  # (out_features,)


class _Sampled(Exception):
    """Raised inside a forward pass once everything wanted from it is sampled."""


_ADDS = {
    torch.add,
    torch.Tensor.add,
    torch.Tensor.add_,
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.Tensor.__iadd__,
}


class _ResidualAdds(TorchFunctionMode):
    """Sees every tensor addition of a forward pass; reports the first one that takes a tracked tensor."""

    def __init__(self, sampler: _Sampler) -> None:
        super().__init__()
        self.sampler = sampler

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _ADDS and len(args) >= 2 and not kwargs:
            left, right = args[0], args[1]
            if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor) and left.shape == right.shape:
                self.sampler.on_add(left, right)  # before the add: an in-place add overwrites ``left``
                self.sampler.on_add(right, left)
        return func(*args, **kwargs)


class _Sampler:
    """Forward hooks on the observed layers (and on every batch norm, to follow their outputs to an add)."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        points_per_image: int,
        seed: int,
        keep_inputs: bool,
        keep_outputs: bool,
        partners: Collection[str] | None,
        batch_offset: int = 0,
    ) -> None:
        modules = dict(model.named_modules())
        self.layers = {name: modules[name] for name in names}
        self.names = {module: name for name, module in self.layers.items()}
        self.num_batches = 0
        self.points_per_image = points_per_image
        self.seed = seed
        self.keep_inputs = keep_inputs
        self.keep_outputs = keep_outputs
        self.expected_partners = None if partners is None else set(partners)
        self.batch_offset = batch_offset
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.partners: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.scales: dict[str, torch.Tensor] = {}
        self.batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._start_batch(0)

    def _start_batch(self, index: int) -> None:
        self.batch_index = index
        self.positions: dict[str, torch.Tensor] = {}  # name -> (images, points) flat output positions
        # (tensor, layer, scale, version): a layer's output or its batch norm's output, as long as no in-place
        # operation (a ReLU(inplace=True)) has changed it since: version is the tensor's in-place counter
        self.tracked: list[tuple[torch.Tensor, str, torch.Tensor | None, int]] = []
        self.partnered: set[str] = set()

    def run(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, LayerSamples]:
        parameter = next(model.parameters())
        hooks = {layer: self._layer_hook for layer in self.layers.values()}
        hooks.update({bn: self._batch_norm_hook for bn in self.batch_norms})
        try:
            # eval mode: running statistics, which sampling must not move
            with forward_hooks(model, hooks, training=False), torch.no_grad():
                for index, batch in enumerate(batches):
                    self._start_batch(index)
                    try:
                        with _ResidualAdds(self):
                            model(batch.to(parameter.device, parameter.dtype))
                    except _Sampled:
                        pass  # the rest of the forward pass is not needed
                    self.num_batches += 1
        finally:
            self._start_batch(0)  # drop the references to the last batch's tensors
        if self.num_batches == 0:
            raise ValueError("sample_layers: no batches to sample from")
        samples = {}
        for name in self.layers:
            partners = self.partners[name]
            complete = self.num_batches > 0 and len(partners) == self.num_batches
            samples[name] = LayerSamples(
                inputs=torch.cat(self.inputs[name]) if self.keep_inputs else None,
                outputs=torch.cat(self.outputs[name]) if self.keep_outputs else None,
                partner=torch.cat(partners) if complete else None,
                partner_scale=self.scales.get(name) if complete else None,
            )
        return samples

    def _generator(self, name: str) -> torch.Generator:
        # the same points in every model that has a layer of this name: reference and pruned model agree
        key = zlib.crc32(f"{self.seed}/{name}/{self.batch_offset + self.batch_index}".encode())
        return torch.Generator().manual_seed(key)

    def _layer_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        name = self.names[module]
        x = inputs[0]
        images = x.shape[0]
        if isinstance(module, nn.Conv2d):
            flat = output.flatten(2)  # (images, out_channels, positions)
            num_positions = flat.shape[2]
        else:  # linear: (images, ..., features); tokens are positions
            flat = output.reshape(images, -1, output.shape[-1]).transpose(1, 2)
            num_positions = flat.shape[2]
        count = min(self.points_per_image, num_positions)
        noise = torch.rand(images, num_positions, generator=self._generator(name))
        positions = noise.topk(count, dim=1).indices.to(output.device)  # (images, count), no repeats per image
        self.positions[name] = positions
        if self.keep_outputs:
            values = _gather(flat, positions)  # (images * count, out_features)
            if module.bias is not None:
                values = values - module.bias.detach().to(values.dtype)
            self.outputs[name].append(values.float().cpu())
        if self.keep_inputs:
            if isinstance(module, nn.Conv2d):
                patches = _conv_patches(module, x, positions)
            else:
                tokens = x.reshape(images, -1, x.shape[-1]).transpose(1, 2)  # (images, features, positions)
                patches = _gather(tokens, positions).unsqueeze(2)
            self.inputs[name].append(patches.float().cpu())
        self.tracked.append((output, name, None, output._version))
        self._stop_if_done()

    def _batch_norm_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        for tensor, name, scale, version in self.tracked:
            if scale is None and inputs[0] is tensor and tensor._version == version and module.running_var is not None:
                std = (module.running_var.detach() + module.eps).sqrt()
                gamma = module.weight.detach() if module.weight is not None else torch.ones_like(std)
                # a change d after the batch norm is a change d * std / gamma before it; a channel with gamma ~ 0
                # cannot be corrected through this layer (its output does not matter there)
                factor = torch.where(gamma.abs() > 1e-8, std / gamma, torch.zeros_like(std))
                self.tracked.append((output, name, factor.float().cpu(), output._version))
                return

    def on_add(self, operand: torch.Tensor, other: torch.Tensor) -> None:
        for tensor, name, scale, version in self.tracked:
            if operand is tensor and tensor._version == version and name not in self.partnered:
                self.partnered.add(name)
                module = self.layers[name]
                if isinstance(module, nn.Conv2d):
                    flat = other.flatten(2)
                else:
                    flat = other.reshape(other.shape[0], -1, other.shape[-1]).transpose(1, 2)
                self.partners[name].append(_gather(flat, self.positions[name]).float().cpu())
                self.scales[name] = scale if scale is not None else torch.ones(flat.shape[1])
                self._stop_if_done()
                return

    def _stop_if_done(self) -> None:
        if (
            self.expected_partners is not None
            and len(self.positions) == len(self.layers)
            and self.expected_partners <= self.partnered
        ):
            raise _Sampled


def _gather(flat: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(images, channels, positions) at (images, count) positions -> (images * count, channels)."""
    index = positions.unsqueeze(1).expand(-1, flat.shape[1], -1)
    return flat.gather(2, index).transpose(1, 2).reshape(-1, flat.shape[1])


def _conv_patches(conv: nn.Conv2d, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(images * count, in_channels, kh * kw): the im2col patch behind each sampled output position.

    The same values as ``F.unfold(x, ...)[:, :, positions]``, gathered directly: unfolding all 784 positions of
    a 28x28 map to keep ten took a quarter of a LASSO pruning's time (tested against ``F.unfold`` in
    tests/ops/test_lasso.py).
    """
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)  # what Conv2d pads, int or "same"
    images, channels, _, width = x.shape
    output_width = (width - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
    top = (positions // output_width) * conv.stride[0]  # (images, count) window corners in the padded input
    left = (positions % output_width) * conv.stride[1]
    rows = top.unsqueeze(2) + torch.arange(conv.kernel_size[0], device=x.device) * conv.dilation[0]
    columns = left.unsqueeze(2) + torch.arange(conv.kernel_size[1], device=x.device) * conv.dilation[1]
    index = (rows.unsqueeze(3) * width + columns.unsqueeze(2)).flatten(1)  # (images, count * kh * kw)
    patches = x.flatten(2).gather(2, index.unsqueeze(1).expand(-1, channels, -1))  # (images, in, count * k)
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    return patches.reshape(images, channels, -1, kernel).transpose(1, 2).reshape(-1, channels, kernel)


def sample_layers(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[torch.Tensor],
    *,
    points_per_image: int = 10,
    seed: int = 0,
    keep_inputs: bool = True,
    keep_outputs: bool = True,
    partners: Collection[str] | None = None,
    batch_offset: int = 0,
) -> dict[str, LayerSamples]:
    """Run ``batches`` through ``model`` (eval mode, no gradients; modes restored) and sample the conv/linear
    layers ``names`` at ``points_per_image`` random output positions per image (all of them if fewer).

    The positions depend only on (seed, layer name, batch index), so a pruned copy of a model is sampled at the
    same points as the original. A layer whose output, directly or through one batch norm, is added to another
    tensor (a residual block's last conv and its projection shortcut) also gets that other operand sampled.

    Args:
        names: conv layers must be dense (groups=1) ``nn.Conv2d``; linear layers are ``nn.Linear``.
        keep_inputs / keep_outputs: which of ``LayerSamples.inputs`` / ``outputs`` to keep (memory).
        partners: the layers known (from an earlier pass over the same architecture) to feed a residual add.
            When given, each forward pass stops as soon as every layer and these partners are sampled.
        batch_offset: the index of the first batch (positions depend on it): a long sequence of batches sampled
            a few at a time gets the same points as in one call.
    """
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            raise ValueError(f"sample_layers: {name!r} is {type(module).__name__}; expected a dense Conv2d or Linear")
    sampler = _Sampler(
        model,
        names,
        points_per_image=points_per_image,
        seed=seed,
        keep_inputs=keep_inputs,
        keep_outputs=keep_outputs,
        partners=partners,
        batch_offset=batch_offset,
    )
    return sampler.run(model, batches)


def residual_target(reference: LayerSamples, current: LayerSamples, channels: torch.Tensor) -> torch.Tensor:
    """The output the pruned layer should produce: the reference model's output (its ``channels``), corrected,
    for a layer that feeds a residual add, by the drift of the add's other operand (He et al., Sec. 3.3):
    bn(y) + s_current = bn(y_ref) + s_ref  =>  y = y_ref + (s_ref - s_current) * std / gamma.

    Args:
        channels: (out_features of the current layer,) the reference output channel each one is.
    """
    if reference.outputs is None:
        raise ValueError("residual_target: the reference samples have no outputs")
    target = reference.outputs[:, channels]
    if reference.partner is None or current.partner is None or current.partner_scale is None:
        return target
    drift = reference.partner[:, channels] - current.partner
    return target + drift * current.partner_scale
