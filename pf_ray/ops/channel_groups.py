"""Channels that must be removed together: dependency groups traced with torch-pruning (Fang et al., "DepGraph",
CVPR 2023), and each conv/linear call's MACs as a function of the groups' kept channels.

Every layer that shares a channel (a residual trunk, the batch norm after a conv, the next conv's inputs, a
depthwise conv in between) is a member of the channel's group. This is the only module of pf_ray that imports
torch-pruning.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from pf_ray.errors import ModelError
from pf_ray.hooks import forward_hooks

# Layers whose multiply-accumulates we count (pf_ray.metrics' definition): 2-d convolutions and linear layers.
# They are also the layers a prunable group must start from.
MAC_LAYERS = (nn.Conv2d, nn.Linear)


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
    return trace_groups(model, input_shape).groups


@dataclass
class GroupTrace:
    """What one traced forward pass tells us: the dependency graph, the groups and the MACs table. Pruning through
    it (``remove_``) changes the traced model itself."""

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


def require_prunable_groups(model: nn.Module, input_shape: Sequence[int], learner: str) -> list[PrunableGroup]:
    """``prunable_groups``, or a ModelError naming ``learner`` when there are none (nothing it could prune)."""
    groups = prunable_groups(model, input_shape)
    if not groups:
        raise ModelError(f"{learner}: the model ({type(model).__name__}) has no prunable channel group: no "
                         "conv/linear layer whose outputs can be removed without changing the model's output")
    return groups


# The most recent trace, for the next caller on the same model while its layers keep their shapes: a trial traces
# its model once, for the search space, and prunes it through that same trace. One slot only, because a trace holds
# its model (torch-pruning's graph keeps a reference to it).
_last_trace: tuple[weakref.ref, tuple[Any, ...], GroupTrace] | None = None


def trace_groups(model: nn.Module, input_shape: Sequence[int]) -> GroupTrace:
    """Trace ``model`` on a random example of ``input_shape`` (in eval mode; its modes are restored), or return the
    last trace if it was of this very model with the same parameter shapes (nothing pruned since)."""
    global _last_trace
    key = (tuple((name, tuple(p.shape)) for name, p in model.named_parameters()), tuple(input_shape))
    if _last_trace is not None and _last_trace[0]() is model and _last_trace[1] == key:
        return _last_trace[2]
    trace = _trace(model, input_shape)
    _last_trace = (weakref.ref(model), key, trace)
    return trace


def _trace(model: nn.Module, input_shape: Sequence[int]) -> GroupTrace:
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ModelError("the model has no parameters; there are no channels to prune")
    example = torch.randn(1, *input_shape, device=parameter.device, dtype=parameter.dtype)
    names = {module: name for name, module in model.named_modules()}
    # eval mode: the tracing forwards must not update batch-norm statistics; torch-pruning traces through autograd
    with forward_hooks(model, training=False), torch.enable_grad():
        calls, output_layers = _record_layer_calls(model, example, names)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)

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
    return GroupTrace(graph, groups, modules, layers, names, order)


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

    with forward_hooks(model, {m: hook for m in model.modules() if isinstance(m, MAC_LAYERS)}):
        output = model(example)
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
        and isinstance(item.dep.target.module, MAC_LAYERS)
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

