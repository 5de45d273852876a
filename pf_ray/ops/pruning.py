"""Physical channel pruning: channels chosen by the L1 norm of their filters (Li et al., ICLR 2017) or by LASSO
regression on sampled features, then removed from the weights (He et al., "Channel Pruning for Accelerating Very
Deep Neural Networks", ICCV 2017).

A channel is removed from every member of its group (``pf_ray.ops.channel_groups``), so the pruned model is really
smaller and faster. LASSO's consumers are then refit by least squares (the maths in ``pf_ray.ops.lasso``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

from pf_ray.errors import ConfigError, ModelError
from pf_ray.ops import lasso
from pf_ray.ops.channel_groups import MAC_LAYERS, GroupMember, PrunableGroup, trace_groups
from pf_ray.ops.feature_sampling import LayerSamples, sample_layers

# Where LASSO's regression inputs come from: "pruned": the model pruned so far, group by group (exact He et al.,
# every candidate samples its own); "baseline": the baseline's, for every group (PocketFlow's one feature cache:
# nothing depends on the candidate, so a search computes it once, ``feature_cache``)
FEATURE_SOURCES = ("pruned", "baseline")

# The field a user sets to choose per-group ratios; named in errors about the ratio vector.
KEEP_RATIOS_FIELD = "learner.options.layer_keep_ratios"

# Channel importance: a criterion is a callable (model, group) -> Tensor(num_channels), higher = keep.
Criterion = Callable[..., torch.Tensor]  # (model, group, **data) -> (num_channels,) scores


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


def lasso_channel_scores(
    model: nn.Module,
    group: PrunableGroup,
    *,
    batches: Sequence[torch.Tensor] | None = None,
    num_kept: int | None = None,
    points_per_image: int = 10,
    seed: int = 0,
) -> torch.Tensor:
    """(num_channels,) scores whose top ``num_kept`` are the LASSO selection (He et al.) for ``group``: the
    group's consumers are sampled on ``batches`` through ``model`` as it is now, and their own outputs are the
    regression target. Selection only; ``prune_channels_(criterion="lasso")`` also reconstructs.

    Groups that LASSO cannot regress (see ``lasso_consumers``) get ``l1_channel_scores``, with a warning.
    """
    if batches is None or num_kept is None:
        raise ConfigError(
            "criterion 'lasso' needs training data: pass batches= and num_kept= (prune_channels_(..., "
            "criterion='lasso', batches=...) does)"
        )
    consumers, reason = lasso_consumers(model, group)
    if reason:
        warnings.warn(f"group {group.name!r}: {reason}; its channels are chosen by L1 norm", stacklevel=2)
        return l1_channel_scores(model, group)
    names = [member.module for member in consumers]
    samples = sample_layers(model, names, batches, points_per_image=points_per_image, seed=seed)
    targets = {name: samples[name].outputs for name in names}
    return lasso.selection_scores(lasso.select_channels(_problem(model, group, consumers, samples, targets), num_kept))


CRITERIA: dict[str, Criterion] = {"l1": l1_channel_scores, "lasso": lasso_channel_scores}


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


def _problem(
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


def kept_channel_count(num_channels: int, keep_ratio: float, round_to: int) -> int:
    """Channels kept of ``num_channels``: round(num_channels * keep_ratio) to the nearest multiple of
    ``round_to`` (halves round up), at least ``round_to`` and 1, at most ``num_channels``."""
    if num_channels < 1:
        raise ConfigError(f"num_channels: got {num_channels}; expected at least 1")
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep_ratio: got {keep_ratio!r}; allowed range is (0, 1]")
    if round_to < 1:
        raise ConfigError(f"round_to: got {round_to}; expected at least 1")
    wanted = math.floor(num_channels * keep_ratio + 0.5)
    rounded = math.floor(wanted / round_to + 0.5) * round_to
    return min(max(rounded, round_to, 1), num_channels)


def with_whole_groups(kept: Sequence[int], whole: Sequence[tuple[int, int]]) -> list[int]:
    """``kept`` (one count per pruned group) with the groups left whole put back: ``whole`` holds (position among
    all the model's groups, channels) for each."""
    counts = list(kept)
    for position, size in sorted(whole):
        counts.insert(position, size)
    return counts


def check_keep_ratios(keep_ratios: Sequence[float], names: Sequence[str]) -> None:
    """One ratio in (0, 1] per group of ``names``, or a ConfigError about ``KEEP_RATIOS_FIELD``."""
    if len(keep_ratios) != len(names):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ConfigError(
            f"{KEEP_RATIOS_FIELD}: got {len(keep_ratios)} values; expected {len(names)} "
            f"(one per prunable group of this model, in order: {shown})"
        )
    for index, ratio in enumerate(keep_ratios):
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"{KEEP_RATIOS_FIELD}[{index}]: got {ratio!r}; allowed range is (0, 1]")


def _ratios_per_group(keep_ratios: Sequence[float] | Mapping[str, float], names: Sequence[str]) -> list[float]:
    if not isinstance(keep_ratios, Mapping):
        check_keep_ratios(keep_ratios, names)
        return list(keep_ratios)
    unknown = sorted(set(keep_ratios) - set(names))
    if unknown:
        raise ConfigError(f"keep ratio for group {unknown[0]!r}: no such prunable group; known: {', '.join(names)}")
    for name, ratio in keep_ratios.items():
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"keep ratio for group {name!r}: got {ratio!r}; allowed range is (0, 1]")
    return [keep_ratios.get(name, 1.0) for name in names]



def prune_channels_(
    model: nn.Module,
    input_shape: Sequence[int],
    keep_ratios: Sequence[float] | Mapping[str, float],
    *,
    round_to: int = 8,
    criterion: str = "l1",
    batches: Iterable[torch.Tensor] | None = None,
    points_per_image: int = 10,
    seed: int = 0,
    reconstruct: bool = True,
    features: str = "pruned",
    costs: MutableMapping[str, Any] | None = None,
) -> dict[str, int]:
    """Remove channels from ``model`` in place: group i keeps its best kept_channel_count(n_i, ratio_i)
    channels by ``criterion``. Returns the kept count of every group, by name.

    - ``"l1"``: every group is scored on the model as passed in, then all are pruned.
    - ``"lasso"``: groups are pruned one at a time in forward order, each selected on features sampled from
      the model as it is then (earlier groups already pruned and reconstructed); the regression target is the
      output of the model as passed in (He et al.), for a layer that feeds a residual add corrected by the drift
      of the add's other operand (``feature_sampling.residual_target``). With ``reconstruct`` the consumers of
      each group are then refit by least squares on the kept channels. Groups that LASSO cannot regress fall back
      to L1, with a warning.

    Args:
        keep_ratios: one per group of ``prunable_groups(model, input_shape)``, in that order; or a mapping
            group name -> ratio, the groups not named keeping all their channels.
        round_to: kept counts are multiples of this (8 suits ONNX Runtime's x86 convolution kernels).
        criterion: a key of ``CRITERIA``.
        batches: ``"lasso"`` only (required): input mini-batches run through the model to sample features.
        points_per_image: ``"lasso"`` only: output positions sampled per image and layer.
        seed: ``"lasso"`` only: the sampled positions depend on it alone (with the layer and batch).
        reconstruct: ``"lasso"`` only: refit the consumers' weights after selection.
        features: ``"lasso"`` only, one of ``FEATURE_SOURCES``. ``"pruned"`` as above; ``"baseline"``: every
            group is selected and refit on the features of the model as passed in (no residual drift to correct),
            from per-layer sufficient statistics (``lasso.refit_statistics``) computed once per model, batches and
            settings and cached (``feature_cache``): a later candidate of the same search runs no forward pass.
        costs: ``"lasso"`` only: filled with the seconds spent on what the candidate shares with its search
            (``baseline``, and where it came from: ``baseline_source`` "computed", "memory" or "disk") and on its
            own ``sampling``, ``selection`` and ``refit``.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion: got {criterion!r}; allowed: {', '.join(CRITERIA)}")
    if criterion == "lasso" and batches is None:
        raise ConfigError("criterion 'lasso' needs training data: pass batches= (input mini-batches)")
    if features not in FEATURE_SOURCES:
        raise ConfigError(f"features: got {features!r}; allowed: {', '.join(FEATURE_SOURCES)}")
    trace = trace_groups(model, input_shape)
    ratios = _ratios_per_group(keep_ratios, [g.name for g in trace.groups])
    counts = [kept_channel_count(g.num_channels, r, round_to) for g, r in zip(trace.groups, ratios, strict=True)]
    if criterion == "lasso":
        from pf_ray.ops.lasso_pruning import prune_lasso_  # here: lasso_pruning imports this module

        prune_lasso_(
            model,
            trace,
            counts,
            list(batches or ()),
            points_per_image=points_per_image,
            seed=seed,
            reconstruct=reconstruct,
            features=features,
            costs=costs if costs is not None else {},
        )
        return {group.name: kept for group, kept in zip(trace.groups, counts, strict=True)}

    score = CRITERIA[criterion]
    # score every group before touching any weights, so no score sees a half-pruned model
    plans = []
    for group, kept in zip(trace.groups, counts, strict=True):
        if kept >= group.num_channels:  # left whole: not scored (a group left unpruned as unsafe may not score)
            plans.append((group, kept, []))
            continue
        scores = score(model, group)
        if scores.shape != (group.num_channels,):
            raise ModelError(
                f"criterion {criterion!r} returned shape {tuple(scores.shape)} for group "
                f"{group.name!r}; expected ({group.num_channels},)"
            )
        plans.append((group, kept, _unkept(scores, kept, channel_blocks(model, group))))
    for group, _, remove in plans:
        trace.remove_(group.name, remove)
    return {group.name: kept for group, kept, _ in plans}


def _unkept(scores: torch.Tensor, kept: int, blocks: Sequence[Any] | None = None) -> list[int]:
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
