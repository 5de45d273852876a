"""How much each channel of each prunable group matters to the loss, comparable across groups: first-order Taylor
importance (Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019).

A channel's importance on a batch is the square of the first-order change of the loss when its parameters are
zeroed, (sum over every parameter of the channel, in every member of its group, of gradient x weight)^2, summed
over batches. The members are the producing layers' rows (and biases), the batch norms' entries and the
consumers' input slices, so a channel of a residual trunk counts everywhere it is used.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pf_ray.ops.channel_groups import PrunableGroup


def taylor_importance(model: nn.Module, groups: list[PrunableGroup],
                      batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Per group, (num_channels,) float64 importance on ``batches`` of (inputs, labels) under cross-entropy.

    ``model`` is evaluated in eval mode (batch norm on its running statistics) and left as it was: its modes,
    its weights, and no gradient in its parameters."""
    modules = dict(model.named_modules())
    scores = [torch.zeros(group.num_channels, dtype=torch.float64) for group in groups]
    modes = {module: module.training for module in model.modules()}
    saved_grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    model.eval()
    try:
        for inputs, labels in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), labels).backward()
            with torch.no_grad():
                for group, score in zip(groups, scores, strict=True):
                    score += _channel_terms(modules, group) ** 2
    finally:
        for module, training in modes.items():
            module.training = training
        for name, parameter in model.named_parameters():
            parameter.grad = saved_grads[name]
    return scores


def _channel_terms(modules: dict[str, nn.Module], group: PrunableGroup) -> torch.Tensor:
    """(num_channels,) sum of gradient x weight over each channel's parameters in every member of the group."""
    terms = torch.zeros(group.num_channels, dtype=torch.float64)
    for member in group.members:
        module = modules[member.module]
        group_indices = torch.tensor(member.group_indices)
        indices = torch.tensor(member.indices)
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.grad is None:
                continue
            products = (parameter.grad * parameter).to(torch.float64)
            if member.dim == "out" or parameter.dim() == 1:  # rows of a producer; a batch norm's or bias' entries
                if member.dim == "in" and name == "bias":
                    continue  # a consumer's bias belongs to its own outputs, not to the channels it reads
                per_channel = products.reshape(products.shape[0], -1).sum(1)
            else:  # a consumer's input slice: dimension 1 of its weight
                per_channel = products.transpose(0, 1).reshape(products.shape[1], -1).sum(1)
            terms.index_add_(0, group_indices, per_channel[indices])
    return terms
