"""Physical channel pruning through dependency groups (Fang et al., "DepGraph", CVPR 2023).

Channels are removed from the weights, not masked: every layer that shares a channel (a residual trunk, the
batch norm after a conv, the next conv's inputs, a depthwise conv in between) loses it together, so the pruned
model is really smaller and faster. Channel selection follows PocketFlow's non-LASSO option (L1 norm of the
filters, Li et al., ICLR 2017); LASSO selection (He et al., ICCV 2017) plugs in as another ``CRITERIA`` entry.

This is the only module of pf_ray that imports torch-pruning.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from pf_ray.errors import ConfigError, ModelError

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
    return _Trace(graph, groups, modules, layers)


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
# Channel importance: a criterion is a plain callable (model, group) -> Tensor(num_channels), higher = keep.

Criterion = Callable[[nn.Module, PrunableGroup], torch.Tensor]


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


CRITERIA: dict[str, Criterion] = {"l1": l1_channel_scores}


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


# --------------------------------------------------------------------------------------------------------------
# Pruning


def prune_channels_(
    model: nn.Module,
    input_shape: Sequence[int],
    keep_ratios: Sequence[float],
    *,
    round_to: int = 8,
    criterion: str = "l1",
) -> dict[str, int]:
    """Remove channels from ``model`` in place: group i keeps its best kept_channel_count(n_i, ratio_i)
    channels by ``criterion``. Returns the kept count per group name.

    Args:
        keep_ratios: one per group of ``prunable_groups(model, input_shape)``, in that order.
        round_to: kept counts are multiples of this (8 suits ONNX Runtime's x86 convolution kernels).
        criterion: a key of ``CRITERIA``.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion: got {criterion!r}; allowed: {', '.join(CRITERIA)}")
    trace = _trace(model, input_shape)
    _check_length(keep_ratios, [g.name for g in trace.groups])
    score = CRITERIA[criterion]
    # score every group before touching any weights, so no score sees a half-pruned model
    plans = []
    for group, ratio in zip(trace.groups, keep_ratios, strict=True):
        kept = kept_channel_count(group.num_channels, ratio, round_to)
        scores = score(model, group)
        if scores.shape != (group.num_channels,):
            raise ModelError(
                f"criterion {criterion!r} returned shape {tuple(scores.shape)} for group "
                f"{group.name!r}; expected ({group.num_channels},)"
            )
        # stable sort: among equal scores the lower channel index is kept
        keep = set(torch.argsort(scores, descending=True, stable=True)[:kept].tolist())
        plans.append((group, kept, [i for i in range(group.num_channels) if i not in keep]))

    graph = trace.graph
    for group, _, remove in plans:
        if remove:
            root = trace.modules[group.name]
            pruner = graph.get_pruner_of_module(root)
            graph.get_pruning_group(root, pruner.prune_out_channels, remove).prune()
    return {group.name: kept for group, kept, _ in plans}


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
    largest s for which MACs after rounding <= target_macs_ratio * the unpruned MACs.

    s may exceed 1: a proposal far under budget grows toward it (accuracy grows with MACs). The relative shape
    (and the order) of the ratios is kept, except where clipping flattens it. Raises ConfigError if even every
    ratio at ``min_ratio`` misses the target.
    """
    if not 0.0 < target_macs_ratio <= 1.0:
        raise ConfigError(f"search.target_macs_ratio: got {target_macs_ratio!r}; allowed range is (0, 1]")
    if not 0.0 < min_ratio <= 1.0:
        raise ConfigError(f"min_keep_ratio: got {min_ratio!r}; allowed range is (0, 1]")
    table = macs_table(model, input_shape)
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
    return scaled(low)


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
