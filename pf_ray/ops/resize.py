"""Loading a pruned checkpoint into an unpruned architecture: layers resized to the stored shapes."""

from __future__ import annotations

import torch
from torch import nn


def resize_to_state_dict_(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Give ``model``'s Conv/BatchNorm/Linear layers the shapes found in a pruned model's ``state_dict`` so that
    ``model.load_state_dict(state_dict)`` works. Parameters are replaced by uninitialised tensors of the new
    shape (the load fills them). Returns ``model``.
    """
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        weight = state_dict.get(f"{prefix}weight")
        if weight is None:
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            out_channels = weight.shape[0]
            if module.groups > 1 and module.groups == module.in_channels:
                # depthwise: one group per input channel, out = in * multiplier
                multiplier = module.out_channels // module.in_channels
                module.in_channels = module.groups = out_channels // multiplier
            else:
                module.in_channels = weight.shape[1] * module.groups
            module.out_channels = out_channels
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = weight.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        else:
            continue
        for key, tensor in list(module.named_parameters(recurse=False)):
            _resize(module, key, tensor, state_dict.get(f"{prefix}{key}"), parameter=True)
        for key, tensor in list(module.named_buffers(recurse=False)):
            _resize(module, key, tensor, state_dict.get(f"{prefix}{key}"), parameter=False)
    return model


def _resize(
    module: nn.Module, key: str, tensor: torch.Tensor | None, saved: torch.Tensor | None, *, parameter: bool
) -> None:
    if tensor is None or saved is None or saved.shape == tensor.shape:
        return
    fresh = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
    if parameter:
        setattr(module, key, nn.Parameter(fresh, requires_grad=tensor.requires_grad))
    else:
        setattr(module, key, fresh)
