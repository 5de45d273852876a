"""Discrimination-aware channel selection, the maths (Zhuang et al., "Discrimination-aware Channel Pruning for
Deep Neural Networks", NeurIPS 2018): input-channel masks, auxiliary heads, reconstruction losses, the greedy
selection by gradient norm, and the forwards and the final removal around them.

A group's channels (see ``pf_ray.ops.channel_groups.prunable_groups``) are read by its *consumers*: the conv/linear
layers listed with dim "in". Zeroing a channel's kernel slice in every consumer removes the channel's effect on
the model exactly (batch norms, depthwise convs and residual additions keep channels apart, so no other path
mixes it into another channel), so selection can run on masks and the physical removal can come once, at the end.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterable, Sequence

import torch
from torch import nn

from pf_ray.hooks import forward_hooks
from pf_ray.ops.channel_groups import GroupMember, PrunableGroup
from pf_ray.ops.pruning import CRITERIA, prune_channels_

# The layers whose input-channel slices DCP scores and masks.
CONSUMER_LAYERS = (nn.Conv2d, nn.Linear)

Consumer = tuple[nn.Module, GroupMember]  # a conv/linear layer and the part of its inputs in one group


def channel_mask(num_channels: int, memberships: Iterable[tuple[GroupMember, torch.Tensor]]) -> torch.Tensor:
    """(num_channels,) bool: False where a layer's channel belongs to a group channel that is not kept.

    Args:
        num_channels: the layer's input (or output) channels.
        memberships: (member, kept) pairs, ``kept`` a (group channels,) bool tensor of that member's group.
    """
    mask = torch.ones(num_channels, dtype=torch.bool)
    for member, kept in memberships:
        mask[list(member.indices)] = kept[list(member.group_indices)]
    return mask


def input_channel_weight_mask(module: nn.Module, input_mask: torch.Tensor) -> torch.Tensor:
    """``input_mask`` (in_channels,) spread over ``module.weight``'s shape: the kernel slice of each input.

    A conv weight is (out, in/groups, kh, kw): input channel c lives in group c // (in/groups), at column
    c % (in/groups), in that group's out/groups rows. A linear weight (out, in) is the same with one group and
    a 1x1 kernel.
    """
    weight = module.weight
    groups = getattr(module, "groups", 1)
    out_channels, in_per_group = weight.shape[:2]
    kernel = weight[0, 0].numel()
    mask = input_mask.to(device=weight.device, dtype=weight.dtype).reshape(groups, 1, in_per_group, 1)
    return mask.expand(groups, out_channels // groups, in_per_group, kernel).reshape(weight.shape)


def input_channel_squared_norms(module: nn.Module, weight_grad: torch.Tensor) -> torch.Tensor:
    """(in_channels,) squared Frobenius norm of ``weight_grad``'s kernel slice of each input channel."""
    groups = getattr(module, "groups", 1)
    out_channels, in_per_group = weight_grad.shape[:2]
    squares = weight_grad.pow(2).reshape(groups, out_channels // groups, in_per_group, -1)
    return squares.sum(dim=(1, 3)).reshape(-1)


def mask_consumer_inputs_(consumers: Sequence[Consumer], kept: torch.Tensor) -> None:
    """Zero, in every consumer, the kernel slices of the group channels that ``kept`` (bool) leaves out."""
    with torch.no_grad():
        for module, member in consumers:
            mask = channel_mask(module.weight.shape[1] * getattr(module, "groups", 1), [(member, kept)])
            module.weight.mul_(input_channel_weight_mask(module, mask))


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * mean over (examples, kept channels, positions) of (output - target)^2.

    The paper's L_M is (1 / 2Q) * ||F_original - F_pruned||^2; averaging over every element instead of summing
    over channels and positions keeps its scale, and so ``reconstruction_weight``, independent of layer size.

    Args:
        output, target: (N, C) or (N, C, H, W): a layer's output in the pruned and in the original model.
        mask: (C,) bool, the output channels to compare (channels already removed elsewhere are left out).
    """
    difference = output - target
    if mask is None:
        return 0.5 * difference.pow(2).mean()
    shape = (1, -1) + (1,) * (difference.dim() - 2)
    difference = difference * mask.to(device=difference.device, dtype=difference.dtype).view(shape)
    compared = mask.sum().clamp(min=1) * (difference.numel() // mask.numel())
    return 0.5 * difference.pow(2).sum() / compared


class AuxiliaryHead(nn.Module):
    """The paper's discrimination-aware loss head: BN, ReLU, global average pool, linear (softmax outside)."""

    def __init__(self, channels: int, num_classes: int, *, spatial: bool = True) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C, H, W) or (N, C) -> (N, num_classes) logits; ``mask`` (C,) zeroes removed channels."""
        if mask is not None:
            mask = mask.to(device=features.device, dtype=features.dtype)
            features = features * mask.view((1, -1) + (1,) * (features.dim() - 2))
        features = self.relu(self.norm(features))
        if features.dim() > 2:
            features = features.mean(dim=tuple(range(2, features.dim())))
        return self.fc(features)


def select_channels_greedily_(
    consumers: Sequence[Consumer],
    kept: torch.Tensor,
    num_keep: int,
    loss_fn: Callable[[], torch.Tensor],
    *,
    after_addition: Callable[[], None] | None = None,
) -> list[int]:
    """The paper's greedy selection (its Algorithm 2) for one group, on masks; returns the channels in the order
    they were added.

    Starts from an empty keep-set (every consumer's slices of this group zeroed), then ``num_keep`` times: compute
    ``loss_fn()`` (reconstruction + auxiliary loss) with the unkept channels masked, add the unkept channel with
    the largest squared gradient norm w.r.t. its kernel slices (summed over consumers), and restore that
    channel's original weights. Ties go to the lower channel index.

    Args:
        consumers: the layers reading the group's channels, each with its group member (dim "in").
        kept: (num_channels,) bool, updated in place (all False at the start, ``num_keep`` True at the end);
            ``loss_fn`` may read it (e.g. to mask a head's input).
        after_addition: called after each addition, e.g. to fine-tune the kept slices (the paper's step 6);
            it must leave the unkept slices at zero (``mask_consumer_inputs_``).

    On return the consumers hold their kept slices (original or fine-tuned) and zeros elsewhere.
    """
    modules = list({id(module): module for module, _ in consumers}.values())
    originals = {id(module): module.weight.detach().clone() for module in modules}
    kept.fill_(False)
    mask_consumer_inputs_(consumers, kept)
    order: list[int] = []
    for _ in range(num_keep):
        weights = [module.weight for module in modules]
        grads = dict(zip(map(id, modules), torch.autograd.grad(loss_fn(), weights), strict=True))
        scores = torch.zeros(kept.numel(), dtype=torch.float64)  # (num_channels,) squared gradient norms
        for module, member in consumers:
            norms = input_channel_squared_norms(module, grads[id(module)]).to("cpu", torch.float64)
            scores.index_add_(0, torch.tensor(member.group_indices), norms[list(member.indices)])
        scores[kept] = -torch.inf
        channel = int(torch.argmax(scores))  # argmax returns the first of equal maxima
        order.append(channel)
        kept[channel] = True
        added = torch.zeros_like(kept)
        added[channel] = True
        with torch.no_grad():
            for module, member in consumers:
                slices = input_channel_weight_mask(
                    module, channel_mask(module.weight.shape[1] * getattr(module, "groups", 1), [(member, ~added)])
                )
                module.weight.copy_(torch.where(slices.bool(), module.weight, originals[id(module)]))
        if after_addition is not None:
            after_addition()
    return order


class _StopForward(Exception):
    """Raised by a hook once every feature a loss needs exists: the rest of the forward pass would be waste."""


def record_outputs(
    model: nn.Module, inputs: torch.Tensor, record: Collection[nn.Module], stop_after: nn.Module | None = None
) -> tuple[dict[nn.Module, torch.Tensor], torch.Tensor | None]:
    """Run ``model`` and return (the outputs of the ``record`` layers, the model's output or None if stopped).

    Recorded outputs are clones, so a later in-place activation cannot change them; the forward stops right
    after ``stop_after`` runs (None: runs to the end). The modes are the caller's.
    """
    outputs: dict[nn.Module, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module in record:
            outputs[module] = output.clone()
        if module is stop_after:
            raise _StopForward

    hooked = [module for module in {*record, stop_after} if module is not None]
    with forward_hooks(model, dict.fromkeys(hooked, hook)):
        try:
            return outputs, model(inputs)
        except _StopForward:
            return outputs, None


def call_order(model: nn.Module, input_shape: tuple[int, int, int], device: torch.device) -> dict[nn.Module, int]:
    """Position of each conv/linear layer's last call in one forward pass (eval mode, no gradients; modes
    restored)."""
    order: dict[nn.Module, int] = {}
    calls = itertools.count()

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        order[module] = next(calls)

    layers = [m for m in model.modules() if isinstance(m, CONSUMER_LAYERS)]
    with forward_hooks(model, dict.fromkeys(layers, hook), training=False), torch.no_grad():
        model(torch.zeros(1, *input_shape, device=device))
    return order


def remove_unkept_channels_(
    model: nn.Module, input_shape: tuple[int, int, int], groups: list[PrunableGroup], kept: dict[str, torch.Tensor]
) -> dict[str, int]:
    """Physically remove the unkept channels through ``prune_channels_``; returns the kept count per group.

    ``prune_channels_`` keeps, in each group, the k best channels by a criterion named in ``CRITERIA``. Scoring
    kept channels 1 and the others 0, with k = the number kept (ratio k / n and round_to=1, so no rounding can
    move k), makes it keep exactly the selected channels. That criterion is registered under a private key for
    this one call and removed afterwards.
    """
    key = f"_discrimination_aware_selection_{id(kept)}"
    CRITERIA[key] = lambda _model, group: kept[group.name].to(torch.float64)
    ratios = {group.name: int(kept[group.name].sum()) / group.num_channels for group in groups}  # others: whole
    try:
        return prune_channels_(model, input_shape, ratios, round_to=1, criterion=key)
    finally:
        del CRITERIA[key]
