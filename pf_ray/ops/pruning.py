"""Physical channel pruning through dependency groups (Fang et al., "DepGraph", CVPR 2023).

Channels are removed from the weights, not masked: every layer that shares a channel (a residual trunk, the
batch norm after a conv, the next conv's inputs, a depthwise conv in between) loses it together, so the pruned
model is really smaller and faster. Channels are chosen by the L1 norm of the filters (PocketFlow's non-LASSO
option, Li et al., ICLR 2017) or by LASSO regression on sampled features followed by a least-squares refit of
the layers that consume them (He et al., ICCV 2017; the maths in ``pf_ray.ops.lasso``).

This is the only module of pf_ray that imports torch-pruning.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from pf_ray.errors import ConfigError, ModelError
from pf_ray.ops import lasso

# The field a user sets to choose per-group ratios; named in errors about the ratio vector.
KEEP_RATIOS_FIELD = "learner.options.layer_keep_ratios"

# Layers whose multiply-accumulates we count (pf_ray.metrics' definition): 2-d convolutions and linear layers.
# They are also the layers a prunable group must start from.
_MAC_LAYERS = (nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------------------------------------------
# Prunable groups


@dataclass(frozen=True)
class GroupMember:
    """One module touched by a group: which of its dimensions loses channels, and which ones."""

    module: str  # name in model.named_modules()
    dim: str  # "out": its output channels/features are removed; "in": its input channels/features
    indices: tuple[int, ...] = field(repr=False)  # the module's channels in the group
    group_indices: tuple[int, ...] = field(repr=False)  # the group channel each of those belongs to


@dataclass(frozen=True)
class PrunableGroup:
    """Channels that must be removed together, indexed 0..num_channels-1 like the outputs of module ``name``."""

    name: str  # the first layer (in forward order) whose outputs are these channels
    num_channels: int
    members: tuple[GroupMember, ...]

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(member.module for member in self.members))


def prunable_groups(model: nn.Module, input_shape: Sequence[int]) -> list[PrunableGroup]:
    """Every dependency group of ``model`` whose channels can be removed, in forward order.

    Excluded: the outputs of the layers that produce the model's output (the classifier's classes), groups that
    reach the output through other operations, and groups of fewer than 2 channels. The input image's channels
    belong to no group (no layer produces them).

    Args:
        model: the model; not modified (its train/eval mode is restored after tracing).
        input_shape: one example's shape, (channels, height, width) for images.
    """
    return _trace(model, input_shape).groups


@dataclass
class _Trace:
    """What one traced forward pass tells us: the dependency graph, the groups and the MACs table."""

    graph: tp.DependencyGraph
    groups: list[PrunableGroup]
    modules: dict[str, nn.Module]
    layers: list[LayerMacs]
    names: dict[nn.Module, str]
    order: dict[str, int]  # layer name -> position of its first call in the forward pass

    def current_group(self, name: str) -> PrunableGroup | None:
        """Group ``name`` as it is now, after other groups were pruned through this trace's graph (indices
        shift when a layer's channels are removed); None once it has fewer than 2 channels."""
        root = self.modules[name]
        pruner = self.graph.get_pruner_of_module(root)
        channels = list(range(self.graph.get_out_channels(root)))
        return _describe_group(
            self.graph, self.graph.get_pruning_group(root, pruner.prune_out_channels, channels), self.names, self.order
        )

    def remove_(self, name: str, channels: Sequence[int]) -> None:
        """Physically remove ``channels`` (indices of group ``name``) from every member of the group."""
        if channels:
            root = self.modules[name]
            pruner = self.graph.get_pruner_of_module(root)
            self.graph.get_pruning_group(root, pruner.prune_out_channels, list(channels)).prune()


@dataclass
class LayerMacs:
    """One call of a conv/linear layer: MACs = positions * kernel * in_channels/groups * out_channels."""

    name: str
    positions: int  # output positions per example (H_out * W_out for a 2-d conv, tokens for a linear)
    kernel: int  # product of the kernel size (1 for a linear)
    in_channels: int
    out_channels: int
    groups: int
    # (group index, channels of this layer in that group); kept counts scale them down proportionally.
    in_members: list[tuple[int, int]] = field(default_factory=list)
    out_members: list[tuple[int, int]] = field(default_factory=list)

    def macs(self, kept: Sequence[int], sizes: Sequence[int]) -> int:
        out_channels = self.out_channels - _removed(self.out_members, kept, sizes)
        if self.groups == 1:
            in_per_group = self.in_channels - _removed(self.in_members, kept, sizes)
        else:
            # grouped/depthwise: channels go with their group, the inputs per group stay as they are
            in_per_group = self.in_channels // self.groups
        return self.positions * self.kernel * in_per_group * out_channels


def _removed(members: list[tuple[int, int]], kept: Sequence[int], sizes: Sequence[int]) -> int:
    # a layer can hold several copies of a group's channels (e.g. a linear after flattening C x H x W)
    return sum(count * (sizes[g] - kept[g]) // sizes[g] for g, count in members)


def _trace(model: nn.Module, input_shape: Sequence[int]) -> _Trace:
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ModelError("the model has no parameters; there are no channels to prune")
    example = torch.randn(1, *input_shape, device=parameter.device, dtype=parameter.dtype)
    names = {module: name for name, module in model.named_modules()}
    modes = {module: module.training for module in model.modules()}
    try:
        # eval mode: the tracing forwards must not update batch-norm statistics
        model.eval()
        with torch.enable_grad():  # torch-pruning traces through autograd
            calls, output_layers = _record_layer_calls(model, example, names)
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    finally:
        for module, training in modes.items():
            module.training = training

    order = {name: position for position, (name, _, _) in enumerate(calls)}
    groups = []
    for tp_group in graph.get_all_groups(ignored_layers=output_layers):
        group = _describe_group(graph, tp_group, names, order)
        if group is not None:
            groups.append(group)
    groups.sort(key=lambda g: order[g.name])

    modules = dict(model.named_modules())
    layers = []
    for name, positions, module in calls:
        kernel = math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1
        if isinstance(module, nn.Linear):
            in_channels, out_channels, conv_groups = module.in_features, module.out_features, 1
        else:
            in_channels, out_channels, conv_groups = module.in_channels, module.out_channels, module.groups
        layer = LayerMacs(name, positions, kernel, in_channels, out_channels, conv_groups)
        for index, group in enumerate(groups):
            for member in group.members:
                if member.module == name:
                    target = layer.out_members if member.dim == "out" else layer.in_members
                    target.append((index, len(member.indices)))
        layers.append(layer)
    return _Trace(graph, groups, modules, layers, names, order)


def _record_layer_calls(
    model: nn.Module, example: torch.Tensor, names: dict[nn.Module, str]
) -> tuple[list[tuple[str, int, nn.Module]], list[nn.Module]]:
    """Forward once; return (name, output positions per example, module) per conv/linear call, in call order,
    and the layers whose output is the model's output."""
    calls: list[tuple[str, int, nn.Module]] = []
    grad_fns: dict[Any, nn.Module] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        calls.append((names[module], output.numel() // (output.shape[0] * channels), module))
        grad_fns[output.grad_fn] = module

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _MAC_LAYERS)]
    try:
        output = model(example)
    finally:
        for handle in handles:
            handle.remove()
    output_layers = [grad_fns[t.grad_fn] for t in _tensors(output) if t.grad_fn in grad_fns]
    return calls, output_layers


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _describe_group(
    graph: tp.DependencyGraph, tp_group: Any, names: dict[nn.Module, str], order: dict[str, int]
) -> PrunableGroup | None:
    """Our view of a torch-pruning group, re-rooted at its first producing layer; None if not prunable."""
    producers = [
        item.dep.target.module
        for item in tp_group
        if graph.is_out_channel_pruning_fn(item.dep.handler)
        and isinstance(item.dep.target.module, _MAC_LAYERS)
        and names.get(item.dep.target.module) in order
    ]
    if not producers:
        return None
    first = min(producers, key=lambda m: order[names[m]])
    num_channels = graph.get_out_channels(first)
    if num_channels is None or num_channels < 2:
        return None
    pruner = graph.get_pruner_of_module(first)
    tp_group = graph.get_pruning_group(first, pruner.prune_out_channels, list(range(num_channels)))
    members = []
    for item in tp_group:
        if item.dep.target.type == tp.ops.OPTYPE.OUTPUT:
            return None  # these channels reach the model's output
        name = names.get(item.dep.target.module)
        if name is None:  # an operation without weights (add, reshape, concat...)
            continue
        dim = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        members.append(GroupMember(name, dim, tuple(int(i) for i in item.idxs), tuple(int(i) for i in item.root_idxs)))
    return PrunableGroup(names[first], num_channels, tuple(members))


# --------------------------------------------------------------------------------------------------------------
# Channel importance: a criterion is a callable (model, group) -> Tensor(num_channels), higher = keep.

Criterion = Callable[..., torch.Tensor]  # (model, group, **data) -> (num_channels,) scores


def l1_channel_scores(model: nn.Module, group: PrunableGroup) -> torch.Tensor:
    """(num_channels,) L1 norm of each channel's filters, summed over the group's producing layers."""
    modules = dict(model.named_modules())
    scores = torch.zeros(group.num_channels, dtype=torch.float64)
    for member in group.members:
        module = modules[member.module]
        if member.dim != "out" or not isinstance(module, _MAC_LAYERS):
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
    samples = lasso.sample_layers(model, names, batches, points_per_image=points_per_image, seed=seed)
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
    samples: Mapping[str, lasso.LayerSamples],
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


# --------------------------------------------------------------------------------------------------------------
# Channel counts


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


def _check_length(keep_ratios: Sequence[float], names: Sequence[str]) -> None:
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
        _check_length(keep_ratios, names)
        return list(keep_ratios)
    unknown = sorted(set(keep_ratios) - set(names))
    if unknown:
        raise ConfigError(f"keep ratio for group {unknown[0]!r}: no such prunable group; known: {', '.join(names)}")
    for name, ratio in keep_ratios.items():
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"keep ratio for group {name!r}: got {ratio!r}; allowed range is (0, 1]")
    return [keep_ratios.get(name, 1.0) for name in names]


# --------------------------------------------------------------------------------------------------------------
# Pruning


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
) -> dict[str, int]:
    """Remove channels from ``model`` in place: group i keeps its best kept_channel_count(n_i, ratio_i)
    channels by ``criterion``. Returns the kept count of every group, by name.

    - ``"l1"``: every group is scored on the model as passed in, then all are pruned.
    - ``"lasso"``: groups are pruned one at a time in forward order, each selected on features sampled from
      the model as it is then (earlier groups already pruned and reconstructed); the regression target is the
      output of the model as passed in (He et al.), for a layer that feeds a residual add corrected by the drift
      of the add's other operand (``lasso.residual_target``). With ``reconstruct`` the consumers of each group
      are then refit by least squares on the kept channels. Groups that LASSO cannot regress fall back to L1,
      with a warning.

    Args:
        keep_ratios: one per group of ``prunable_groups(model, input_shape)``, in that order; or a mapping
            group name -> ratio, the groups not named keeping all their channels.
        round_to: kept counts are multiples of this (8 suits ONNX Runtime's x86 convolution kernels).
        criterion: a key of ``CRITERIA``.
        batches: ``"lasso"`` only (required): input mini-batches run through the model to sample features.
        points_per_image: ``"lasso"`` only: output positions sampled per image and layer.
        seed: ``"lasso"`` only: the sampled positions depend on it alone (with the layer and batch).
        reconstruct: ``"lasso"`` only: refit the consumers' weights after selection.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion: got {criterion!r}; allowed: {', '.join(CRITERIA)}")
    if criterion == "lasso" and batches is None:
        raise ConfigError("criterion 'lasso' needs training data: pass batches= (input mini-batches)")
    trace = _trace(model, input_shape)
    ratios = _ratios_per_group(keep_ratios, [g.name for g in trace.groups])
    counts = [kept_channel_count(g.num_channels, r, round_to) for g, r in zip(trace.groups, ratios, strict=True)]
    if criterion == "lasso":
        _prune_lasso_(
            model,
            trace,
            counts,
            list(batches or ()),
            points_per_image=points_per_image,
            seed=seed,
            reconstruct=reconstruct,
        )
        return {group.name: kept for group, kept in zip(trace.groups, counts, strict=True)}

    score = CRITERIA[criterion]
    # score every group before touching any weights, so no score sees a half-pruned model
    plans = []
    for group, kept in zip(trace.groups, counts, strict=True):
        scores = score(model, group)
        if scores.shape != (group.num_channels,):
            raise ModelError(
                f"criterion {criterion!r} returned shape {tuple(scores.shape)} for group "
                f"{group.name!r}; expected ({group.num_channels},)"
            )
        plans.append((group, kept, _unkept(scores, kept)))
    for group, _, remove in plans:
        trace.remove_(group.name, remove)
    return {group.name: kept for group, kept, _ in plans}


def _unkept(scores: torch.Tensor, kept: int) -> list[int]:
    # stable sort: among equal scores the lower channel index is kept
    keep = set(torch.argsort(scores, descending=True, stable=True)[:kept].tolist())
    return [i for i in range(len(scores)) if i not in keep]


def _prune_lasso_(
    model: nn.Module,
    trace: _Trace,
    counts: Sequence[int],
    batches: list[torch.Tensor],
    *,
    points_per_image: int,
    seed: int,
    reconstruct: bool,
) -> None:
    todo = [(g.name, kept) for g, kept in zip(trace.groups, counts, strict=True) if kept < g.num_channels]
    if not todo:
        return
    if not batches:
        raise ConfigError("criterion 'lasso' needs training data: batches= is empty")
    sampling = {"points_per_image": points_per_image, "seed": seed}
    pruned = {name for name, _ in todo}
    observed = list(
        dict.fromkeys(m.module for g in trace.groups if g.name in pruned for m in lasso_consumers(model, g)[0])
    )
    # targets: the model as passed in (its outputs and residual partners), sampled once for every group
    reference = lasso.sample_layers(model, observed, batches, keep_inputs=False, **sampling)
    # which reference output channel each current output channel of an observed layer is
    channels = {name: torch.arange(reference[name].outputs.shape[1]) for name in observed}

    for name, kept in todo:
        group = trace.current_group(name)
        if group is None or kept >= group.num_channels:
            continue
        consumers, reason = lasso_consumers(model, group)
        refits: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if reason:
            warnings.warn(f"group {name!r}: {reason}; its channels are chosen by L1 norm", stacklevel=3)
            remove = _unkept(l1_channel_scores(model, group), kept)
        else:
            names = [member.module for member in consumers]
            partners = [n for n in names if reference[n].partner is not None]
            current = lasso.sample_layers(model, names, batches, keep_outputs=False, partners=partners, **sampling)
            targets = {n: lasso.residual_target(reference[n], current[n], channels[n]) for n in names}
            selection = lasso.select_channels(_problem(model, group, consumers, current, targets), kept)
            remove = sorted(set(range(group.num_channels)) - set(selection.keep))
            if reconstruct:
                refits = _refits(trace, group, consumers, current, targets, set(remove))
        trace.remove_(name, remove)
        _forget_channels(group, remove, channels)
        for module_name, (weight, bias_change) in refits.items():
            _write_weights_(trace.modules[module_name], weight, bias_change)


def _refits(
    trace: _Trace,
    group: PrunableGroup,
    consumers: Sequence[GroupMember],
    samples: Mapping[str, lasso.LayerSamples],
    targets: Mapping[str, torch.Tensor],
    removed: set[int],
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Least-squares weights of every consumer for the input features (and output channels) that remain."""
    refits = {}
    for member in consumers:
        module = trace.modules[member.module]
        inputs = samples[member.module].inputs
        dropped = {f for f, c in zip(member.indices, member.group_indices, strict=True) if c in removed}
        kept_features = [f for f in range(inputs.shape[1]) if f not in dropped]
        weight = module.weight.detach().reshape(module.weight.shape[0], module.weight.shape[1], -1)
        target = targets[member.module]
        # a consumer inside the group's residual stream loses some of its outputs too: refit only those that stay
        lost = {
            i
            for m in group.members
            if m.module == member.module and m.dim == "out"
            for i, c in zip(m.indices, m.group_indices, strict=True)
            if c in removed
        }
        if lost:
            stay = [i for i in range(target.shape[1]) if i not in lost]
            target, weight = target[:, stay], weight[stay]
        refits[member.module] = lasso.least_squares_weights(
            inputs, target, kept_features, weight, bias=module.bias is not None
        )
    return refits


def _forget_channels(group: PrunableGroup, removed: Sequence[int], channels: dict[str, torch.Tensor]) -> None:
    """Keep ``channels`` (layer -> reference channel of each current output) in step with a removal."""
    removed_set = set(removed)
    for member in group.members:
        if member.dim == "out" and member.module in channels:
            gone = {i for i, c in zip(member.indices, member.group_indices, strict=True) if c in removed_set}
            keep = [i for i in range(len(channels[member.module])) if i not in gone]
            channels[member.module] = channels[member.module][keep]


def _write_weights_(module: nn.Module, weight: torch.Tensor, bias_change: torch.Tensor | None) -> None:
    if weight.numel() != module.weight.numel():
        raise ModelError(
            f"reconstruction produced {tuple(weight.shape)} weights for a layer of shape {tuple(module.weight.shape)}"
        )
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape))
        if bias_change is not None:
            module.bias.add_(bias_change.to(module.bias.dtype))


# --------------------------------------------------------------------------------------------------------------
# MACs, analytically: the search projects every candidate onto the budget, many times per second.


@dataclass(frozen=True)
class MacsTable:
    """The groups' sizes and every conv/linear call: plain data, no reference to the model."""

    names: tuple[str, ...]  # prunable groups, in order
    sizes: tuple[int, ...]  # channels per prunable group
    layers: tuple[LayerMacs, ...]

    def macs(self, keep_ratios: Sequence[float], round_to: int) -> int:
        kept = [kept_channel_count(n, r, round_to) for n, r in zip(self.sizes, keep_ratios, strict=True)]
        return self.macs_of_counts(kept)

    def macs_of_counts(self, kept: Sequence[int]) -> int:
        """MACs with ``kept[i]`` channels left in group i."""
        return sum(layer.macs(kept, self.sizes) for layer in self.layers)


# model -> (parameter shapes, input shape, table); a pruned or resized model gets a fresh table
_TABLES: weakref.WeakKeyDictionary[nn.Module, tuple[Any, tuple[int, ...], MacsTable]] = weakref.WeakKeyDictionary()


def macs_table(model: nn.Module, input_shape: Sequence[int]) -> MacsTable:
    """The model's MACs as a function of per-group keep ratios (picklable: searchers carry it to the budget)."""
    fingerprint = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    cached = _TABLES.get(model)
    if cached is not None and cached[0] == fingerprint and cached[1] == tuple(input_shape):
        return cached[2]
    trace = _trace(model, input_shape)
    table = MacsTable(
        tuple(g.name for g in trace.groups), tuple(g.num_channels for g in trace.groups), tuple(trace.layers)
    )
    _TABLES[model] = (fingerprint, tuple(input_shape), table)
    return table


def macs_after(model: nn.Module, input_shape: Sequence[int], keep_ratios: Sequence[float], round_to: int) -> int:
    """Conv + linear multiply-accumulates per example that ``prune_channels_`` with these arguments leaves
    (bias additions not counted). Computed from a per-layer table, without pruning anything."""
    table = macs_table(model, input_shape)
    _check_length(keep_ratios, table.names)
    return table.macs(keep_ratios, round_to)


def project_to_budget(
    model: nn.Module,
    input_shape: Sequence[int],
    keep_ratios: Sequence[float],
    target_macs_ratio: float,
    *,
    round_to: int,
    min_ratio: float,
) -> tuple[float, ...]:
    """Scale a proposal so that it spends the MACs budget: ratios clip(s * r_i, min_ratio, 1) with the
    largest s for which MACs after rounding <= target_macs_ratio * the unpruned MACs; then top up.

    s may exceed 1: a proposal far under budget grows toward it (accuracy grows with MACs). The relative shape
    (and the order) of the ratios is kept, except where clipping flattens it. Raises ConfigError if even every
    ratio at ``min_ratio`` misses the target.

    Top-up: kept counts move in whole channels (multiples of ``round_to``), and at the largest s the next
    channel of several groups may cross at once, so the scaled proposal can land well under the budget (7.8%
    under for a ResNet-20 at a 0.21 target, round_to=1). The remainder is spent greedily, one group and one
    rounding step at a time, while the step fits: first the steps that keep the proposal's order (a group never
    overtakes the ratio of a group proposed higher), largest MACs gain first; when none of those fits, any step
    that fits, largest gain first (with round_to=8 a ResNet-20 was otherwise left up to 21% under its budget).
    Topped-up groups get ratio kept / channels exactly.
    """
    if not 0.0 < target_macs_ratio <= 1.0:
        raise ConfigError(f"search.target_macs_ratio: got {target_macs_ratio!r}; allowed range is (0, 1]")
    if not 0.0 < min_ratio <= 1.0:
        raise ConfigError(f"min_keep_ratio: got {min_ratio!r}; allowed range is (0, 1]")
    table = macs_table(model, input_shape)
    if not table.names:
        raise ModelError(
            f"the model ({type(model).__name__}) has no prunable channel group (no conv/linear layer whose outputs "
            f"can be removed without changing the model's output), so search.target_macs_ratio="
            f"{target_macs_ratio:g} cannot be reached by pruning"
        )
    _check_length(keep_ratios, table.names)
    budget = target_macs_ratio * table.macs([1.0] * len(table.names), round_to)

    def scaled(scale: float) -> tuple[float, ...]:
        return tuple(min(max(scale * r, min_ratio), 1.0) for r in keep_ratios)

    def fits(scale: float) -> bool:
        return table.macs(scaled(scale), round_to) <= budget

    low, high = 0.0, 1.0 / min(keep_ratios)  # scaled(0): all min_ratio; scaled(high): all 1
    if not fits(low):
        smallest = table.macs(scaled(low), round_to) / (budget / target_macs_ratio)
        raise ConfigError(
            f"search.target_macs_ratio: got {target_macs_ratio:g}; the smallest reachable with "
            f"round_to={round_to} and min ratio {min_ratio:g} is {smallest:.3f}"
        )
    if fits(high):
        return scaled(high)
    # MACs grow monotonically with the scale: bisect to the last scale that fits (relative width 2^-40)
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return _top_up(table, scaled(low), keep_ratios, budget, round_to)


def _top_up(
    table: MacsTable, ratios: Sequence[float], proposal: Sequence[float], budget: float, round_to: int
) -> tuple[float, ...]:
    """Grow single groups by one rounding step while the MACs still fit (see ``project_to_budget``)."""
    ratios = list(ratios)
    kept = [kept_channel_count(n, r, round_to) for n, r in zip(table.sizes, ratios, strict=True)]
    macs = table.macs_of_counts(kept)
    while True:
        best: tuple[tuple[bool, int, float, int], int, int] | None = None
        for group, size in enumerate(table.sizes):
            if kept[group] >= size:
                continue
            grown = min(kept[group] + round_to, size)
            gain = table.macs_of_counts(kept[:group] + [grown] + kept[group + 1 :]) - macs
            if macs + gain > budget:
                continue
            keeps_order = all(
                grown / size <= ratios[other] for other in range(len(ratios)) if proposal[other] > proposal[group]
            )
            key = (keeps_order, gain, proposal[group], -group)
            if best is None or key > best[0]:
                best = (key, group, grown)
        if best is None:
            return tuple(ratios)
        _, group, grown = best
        macs += best[0][1]
        kept[group] = grown
        ratios[group] = grown / table.sizes[group]


# --------------------------------------------------------------------------------------------------------------
# Loading a pruned checkpoint into an unpruned architecture


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
