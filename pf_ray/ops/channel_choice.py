"""Which channels a group keeps: the L1 norm of their filters (Li et al., ICLR 2017), the layers LASSO regresses
(He et al., ICCV 2017) and its per-group problem, and keeping a grouped convolution's groups even. Shared by
``pf_ray.ops.pruning`` and ``pf_ray.ops.lasso_pruning``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pf_ray.errors import ModelError
from pf_ray.ops import lasso
from pf_ray.ops.channel_groups import MAC_LAYERS, GroupMember, PrunableGroup
from pf_ray.ops.feature_sampling import LayerSamples


def l1_channel_scores(model: nn.Module, group: PrunableGroup) -> torch.Tensor:
    """(num_channels,) L1 norm of each channel's filters, summed over the group's producing layers."""
    modules = dict(model.named_modules())
    scores = torch.zeros(group.num_channels, dtype=torch.float64)
    for member in group.members:
        module = modules[member.module]
        if member.dim != "out" or not isinstance(module, MAC_LAYERS):
            continue  # consumers' input slices and batch norms do not score
        # weight is (out, in/groups, *kernel) or (out, in): one row per output channel
        norms = module.weight.detach().abs().flatten(1).sum(1).to("cpu", torch.float64)
        indices = torch.tensor(member.indices)
        scores.index_add_(0, torch.tensor(member.group_indices), norms[indices])
    return scores


# Widest consumer (input features of the group x kernel positions) that LASSO regresses on: its Gram matrix grows
# with the square (5000^2 float64 = 200 MB). A wider one sends its group to L1 selection.
MAX_LASSO_FEATURES = 5000


def lasso_consumers(model: nn.Module, group: PrunableGroup) -> tuple[list[GroupMember], str]:
    """The members of ``group`` that LASSO regresses: the dense conv/linear layers whose inputs are the group's
    channels. A depthwise conv between producer and consumer is no consumer: its channels go with the group (one
    filter per channel) and the dense layer after it is regressed on the depthwise outputs, which is what
    removing a channel changes. Returns (consumers, "") or ([], why LASSO cannot select this group's channels).
    """
    modules = dict(model.named_modules())
    consumers = []
    for member in group.members:
        module = modules[member.module]
        if member.dim != "in":
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue  # grouped/depthwise: its channels follow the group; it is not regressed
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        kernel = math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1
        if len(member.indices) * kernel > MAX_LASSO_FEATURES:
            return [], (
                f"consumer {member.module!r} has {len(member.indices)} x {kernel} input features "
                f"(LASSO handles up to {MAX_LASSO_FEATURES})"
            )
        consumers.append(member)
    if not consumers:
        return [], "no dense conv/linear layer consumes its channels"
    return consumers, ""


def lasso_problem(
    model: nn.Module,
    group: PrunableGroup,
    consumers: Sequence[GroupMember],
    samples: Mapping[str, LayerSamples],
    targets: Mapping[str, torch.Tensor],
) -> lasso.ChannelProblem:
    """The group's regression: one problem per consumer, stacked (channel c has one coefficient for all)."""
    modules = dict(model.named_modules())
    problems = [
        lasso.channel_problem(
            samples[m.module].inputs,
            modules[m.module].weight,
            targets[m.module],
            m.indices,
            m.group_indices,
            group.num_channels,
        )
        for m in consumers
    ]
    total = problems[0]
    for problem in problems[1:]:
        total = total + problem
    return total


def unkept_channels(scores: torch.Tensor, kept: int, blocks: Sequence[Any] | None = None) -> list[int]:
    """The channels not among the ``kept`` best by ``scores``; with ``blocks`` (a key per channel), the same
    number kept in each block (``channel_blocks``)."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()  # stable: ties keep the lower index
    if blocks is None:
        keep = set(order[:kept])
    else:
        members: dict[Any, list[int]] = {}
        for channel in order:
            members.setdefault(blocks[channel], []).append(channel)
        if kept % len(members):
            raise ModelError(f"{kept} channels cannot be kept evenly in {len(members)} convolution groups; keep a "
                             "multiple of the groups (learner.options.round_to)")
        keep = {channel for block in members.values() for channel in block[: kept // len(members)]}
    return [i for i in range(len(scores)) if i not in keep]


def channel_blocks(model: nn.Module, group: PrunableGroup) -> list[tuple[int, ...]] | None:
    """For a group whose channels are the outputs of a grouped (not depthwise) convolution: the convolution group
    of each channel (a tuple, one entry per such convolution), which must all keep the same number of channels
    for the convolution to stay one with the same groups. None for a group without one."""
    modules = dict(model.named_modules())
    keys: list[list[int]] = [[] for _ in range(group.num_channels)]
    found = False
    for member in group.members:
        module = modules[member.module]
        if member.dim != "out" or not is_grouped_conv(module):
            continue
        found = True
        size = module.out_channels // module.groups
        for index, channel in zip(member.indices, member.group_indices, strict=True):
            keys[channel].append(index // size)
    return [tuple(key) for key in keys] if found else None


def is_grouped_conv(module: nn.Module) -> bool:
    """A convolution with groups that is not depthwise (one input and output channel per group)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and not (
        module.groups == module.in_channels == module.out_channels)
