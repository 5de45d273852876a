"""Channels that must be removed together: dependency groups traced with torch-pruning (Fang et al., "DepGraph",
CVPR 2023), and each conv/linear call's MACs as a function of the groups' kept channels.

Every layer that shares a channel (a residual trunk, the batch norm after a conv, the next conv's inputs, a
depthwise conv in between) is a member of the channel's group. This is the only module of pf_ray that imports
torch-pruning.

The analysis is bounded (``AnalysisLimits``): torch-pruning's index propagation can grow without end through
operations that mix channels (a reshape across the channel axis feeding a matrix product: 24 GB and 9 minutes
before the kernel killed it, issue 15). A model it cannot finish in time and memory is refused in one line.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping

from pf_ray.errors import ModelError
from pf_ray.hooks import forward_hooks

# Layers whose multiply-accumulates we count (pf_ray.metrics' definition): 2-d convolutions and linear layers.
# They are also the layers a prunable group must start from.
MAC_LAYERS = (nn.Conv2d, nn.Linear)


# Default bound on one model's dependency analysis. Tracing and grouping take well under a second for ResNet-20 and
# a few seconds for torchvision's ResNet-50 on the 2-core machines; a model that needs minutes is one whose index
# propagation is exploding, not one that is merely large.
ANALYSIS_SECONDS = 120.0
ANALYSIS_MEMORY_BYTES = 8 << 30  # growth of the process's resident memory; also at most half of what is available
PROGRESS_SECONDS = 15.0  # a progress line this often while the analysis runs


@dataclass(frozen=True)
class AnalysisLimits:
    """How long and how much memory torch-pruning's analysis of one model may take, and how often it says where it
    is. The whole analysis is bounded, not each group: groups found before a bound is hit are not used, because
    how far an analysis gets depends on the machine's load, and every trial (another process, maybe another
    machine) must see the same groups as the preflight, or the search's vectors would not line up."""

    seconds: float = ANALYSIS_SECONDS
    memory_bytes: int = ANALYSIS_MEMORY_BYTES
    progress_seconds: float = PROGRESS_SECONDS
    log: Callable[[str], None] | None = None  # progress lines; None: standard error


class _LimitExceeded(BaseException):  # noqa: N818 - raised into the analysing thread; BaseException: no library
    """Raised asynchronously into the analysing thread by the watchdog."""  # `except Exception` swallows it


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: only the time bound applies
        return 0


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class _Watchdog:
    """Watches the calling thread from another one: a progress line every ``progress_seconds``, and
    ``_LimitExceeded`` raised into the caller when the time or memory bound is passed (at its next Python bytecode:
    torch-pruning's propagation is Python loops)."""

    def __init__(self, limits: AnalysisLimits) -> None:
        self.limits = limits
        self.step = "starting"  # what the analysis is doing, for progress lines and the refusal
        self.exceeded = ""  # which bound was passed, once it was
        self.start = time.monotonic()
        self.base = _resident_bytes()
        available = _available_bytes()
        self.memory = limits.memory_bytes if available is None else min(limits.memory_bytes, available // 2)
        self._target = threading.get_ident()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._sent = False
        self._thread = threading.Thread(target=self._watch, name="pf-ray-analysis-watchdog", daemon=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def at(self, step: str) -> None:
        """The analysis moves on to ``step``: past the time bound already, it stops here (the watchdog's
        asynchronous stop covers the long steps in between)."""
        self.step = step
        if self.elapsed() > self.limits.seconds:
            self.exceeded = f"took more than {self.limits.seconds:g} s"
            raise _LimitExceeded

    def grown(self) -> int:
        return max(_resident_bytes() - self.base, 0)

    def _watch(self) -> None:
        log = self.limits.log or (lambda line: print(line, file=sys.stderr, flush=True))
        next_progress = self.limits.progress_seconds
        while not self._done.wait(0.05):
            elapsed, grown = self.elapsed(), self.grown()
            if elapsed >= next_progress:
                log(f"channel dependency analysis: {elapsed:.0f} s, +{grown / 2**30:.1f} GB so far, {self.step}")
                next_progress += self.limits.progress_seconds
            if elapsed > self.limits.seconds:
                self.exceeded = f"took more than {self.limits.seconds:g} s"
            elif self.memory and grown > self.memory:
                self.exceeded = f"needed more than {self.memory / 2**30:.1f} GB"
            if self.exceeded:
                with self._lock:
                    if not self._done.is_set():
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(
                            ctypes.c_ulong(self._target), ctypes.py_object(_LimitExceeded))
                        self._sent = True
                return

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done.set()
            if self._sent:  # an exception sent but not yet raised would surface later, anywhere: withdraw it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), None)
        self._thread.join()


@contextmanager
def _bounded(model: nn.Module, limits: AnalysisLimits) -> Iterator[_Watchdog]:
    """Run the block under ``limits``; a ModelError in one line if it passes one."""
    watchdog = _Watchdog(limits)
    try:
        with watchdog:
            yield watchdog
    except _LimitExceeded:
        pass
    if watchdog.exceeded:
        gc.collect()  # the abandoned analysis' index lists
        raise ModelError(
            f"channel pruning: the dependency analysis of {type(model).__name__} {watchdog.exceeded} (stopped "
            f"while {watchdog.step}, after {watchdog.elapsed():.0f} s): some operation mixes channels in a way "
            "torch-pruning cannot follow (e.g. a reshape across the channel axis into a matrix product); compress "
            "this model with a learner that keeps its channels (weight_sparsification, uniform_quantization, "
            "native_int8), or replace that operation"
        )


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
    problem: str = ""  # why the analysis cannot describe it ("" if it can): left unpruned, its members may be partial

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
        with _tolerant_reshapes():
            return _describe_group(self.graph, self.graph.get_pruning_group(root, pruner.prune_out_channels, channels),
                                   self.names, self.order)

    def remove_(self, name: str, channels: Sequence[int]) -> None:
        """Physically remove ``channels`` (indices of group ``name``) from every member of the group."""
        if channels:
            root = self.modules[name]
            pruner = self.graph.get_pruner_of_module(root)
            with _tolerant_reshapes():
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


def trace_groups(model: nn.Module, input_shape: Sequence[int], limits: AnalysisLimits | None = None) -> GroupTrace:
    """Trace ``model`` on a random example of ``input_shape`` (in eval mode; its modes are restored), or return the
    last trace if it was of this very model with the same parameter shapes (nothing pruned since).

    Raises ModelError (one line) when the analysis passes ``limits`` (default ``AnalysisLimits()``)."""
    global _last_trace
    key = (tuple((name, tuple(p.shape)) for name, p in model.named_parameters()), tuple(input_shape))
    if _last_trace is not None and _last_trace[0]() is model and _last_trace[1] == key:
        return _last_trace[2]
    trace = _trace(model, input_shape, limits or AnalysisLimits())
    _last_trace = (weakref.ref(model), key, trace)
    return trace


def _trace(model: nn.Module, input_shape: Sequence[int], limits: AnalysisLimits) -> GroupTrace:
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ModelError("the model has no parameters; there are no channels to prune")
    example = torch.randn(1, *input_shape, device=parameter.device, dtype=parameter.dtype)
    names = {module: name for name, module in model.named_modules()}
    with _bounded(model, limits) as watchdog:
        # eval mode: the tracing forwards must not update batch-norm statistics; torch-pruning traces through
        # autograd
        with forward_hooks(model, training=False), torch.enable_grad():
            watchdog.at("tracing the forward pass")
            calls, output_layers = _record_layer_calls(model, example, names)
            watchdog.at("building the dependency graph")
            unmapped: set[nn.Module] = set()
            with _analysis_errors(model, watchdog), _tolerant_reshapes(unmapped):
                graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        order = {name: position for position, (name, _, _) in enumerate(calls)}
        groups: dict[str, PrunableGroup] = {}
        with _analysis_errors(model, watchdog), _tolerant_reshapes(unmapped):
            for root, tp_group in _all_groups(graph, output_layers, names, watchdog):
                try:
                    group = _describe_group(graph, tp_group, names, order, unmapped)
                except Exception as error:  # noqa: BLE001 - torch-pruning lost its way in this group only
                    group = _undescribed_group(graph, root, names, order, error)
                if group is not None and group.name not in groups:
                    groups[group.name] = group
    groups = sorted(groups.values(), key=lambda g: order[g.name])

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


@contextmanager
def _analysis_errors(model: nn.Module, watchdog: _Watchdog) -> Iterator[None]:
    """torch-pruning failing on a graph it does not understand (e.g. a ZeroDivisionError in its reshape index
    mapping for torchvision's ShuffleNet-v2) is the model's limit, not a bug of ours: one line, as for the bounds."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - whatever torch-pruning raises
        text = str(error).strip().splitlines()
        raise ModelError(
            f"channel pruning: torch-pruning cannot analyse the channels of {type(model).__name__} (while "
            f"{watchdog.step}: {type(error).__name__}{': ' + text[0][:200] if text else ''}); compress this model "
            "with a learner that keeps its channels (weight_sparsification, uniform_quantization, native_int8)"
        ) from error


def _all_groups(graph: tp.DependencyGraph, ignored: list[nn.Module], names: dict[nn.Module, str],
                watchdog: _Watchdog) -> Iterator[tuple[nn.Module, Any]]:
    """torch-pruning's ``get_all_groups`` (1.6), step by step so that progress lines can name the layer at hand:
    (root layer, its group) for each conv/linear layer whose outputs no earlier group already covers. A root whose
    grouping raises comes with its exception instead of a group."""
    ignored = ignored + graph.IGNORED_LAYERS_IN_TRACING
    roots = [m for m in graph.module2node
             if isinstance(m, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)) and m not in ignored]
    covered: set[nn.Module] = set()
    for position, root in enumerate(roots, 1):
        pruner = graph.get_pruner_of_module(root)
        if root in covered or pruner is None or pruner.get_out_channels(root) is None:
            continue
        watchdog.at(f"grouping the outputs of {names.get(root, type(root).__name__)!r} ({position} of {len(roots)})")
        try:
            tp_group = graph.get_pruning_group(root, pruner.prune_out_channels,
                                               list(range(pruner.get_out_channels(root))))
        except Exception as error:  # noqa: BLE001 - e.g. an IndexError through a channel shuffle (ShuffleNet-v2)
            if root not in ignored:
                yield root, error
            continue
        prunable = True
        for item in tp_group:
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                covered.add(item.dep.target.module)
                prunable = prunable and item.dep.target.module not in ignored
        if prunable:
            yield root, tp_group


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
    graph: tp.DependencyGraph, tp_group: Any, names: dict[nn.Module, str], order: dict[str, int],
    unmapped: Collection[nn.Module] = (),
) -> PrunableGroup | None:
    """Our view of a torch-pruning group, re-rooted at its first producing layer; None if not prunable. A group
    through one of the ``unmapped`` reshapes gets a ``problem``; an exception (its root's grouping raised) is raised."""
    if isinstance(tp_group, BaseException):
        raise tp_group
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
    problem = ""
    for item in tp_group:
        if item.dep.target.type == tp.ops.OPTYPE.OUTPUT:
            return None  # these channels reach the model's output
        if item.dep.target.module in unmapped or item.dep.source.module in unmapped:
            problem = ("its channels pass through a reshape across the channel axis that the dependency analysis "
                       "cannot map (e.g. a channel shuffle)")
        name = names.get(item.dep.target.module)
        if name is None:  # an operation without weights (add, reshape, concat...)
            continue
        dim = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
        members.append(GroupMember(name, dim, tuple(int(i) for i in item.idxs), tuple(int(i) for i in item.root_idxs)))
    return PrunableGroup(names[first], num_channels, tuple(members), problem)


def _undescribed_group(graph: tp.DependencyGraph, root: nn.Module, names: dict[nn.Module, str],
                       order: dict[str, int], error: BaseException) -> PrunableGroup | None:
    """The outputs of ``root``, whose group torch-pruning could not build or describe: a group of that layer alone
    with a ``problem``, so that it is listed as left unpruned (None for a layer the forward pass never called)."""
    name = names.get(root)
    num_channels = graph.get_out_channels(root)
    if name not in order or num_channels is None or num_channels < 2:
        return None
    channels = tuple(range(num_channels))
    text = str(error).strip().splitlines()
    return PrunableGroup(name, num_channels, (GroupMember(name, "out", channels, channels),),
                         f"the dependency analysis cannot follow its channels ({type(error).__name__}"
                         f"{': ' + text[0][:120] if text else ''}; e.g. through a channel shuffle)")


@contextmanager
def _tolerant_reshapes(unmapped: set[nn.Module] | None = None) -> Iterator[None]:
    """While torch-pruning (re)builds its index mappings (building the graph, and in every ``get_pruning_group``):
    the reshapes whose mapping torch-pruning 1.6 cannot work out keep the identity mapping instead of failing the
    whole analysis, and are added to ``unmapped``: the groups through them get a ``problem`` and are left unpruned.

    Those are the reshapes of a tensor of 5 or more dimensions (torch-pruning handles 1-d and 4-d ones only, but
    misses the sizes it checks that on under PyTorch 2, ``_saved_self_sym_sizes``, and maps them as flattenings:
    millions of indices for torchvision ShuffleNet-v2's channel shuffle), and those where it divides by zero (it
    infers 0 channels after the reshape: the shuffle's view from 4 to 5 dimensions)."""
    unmapped = set() if unmapped is None else unmapped
    original = tp_index_mapping.update_reshape_index_mapping

    def tolerant(graph: tp.DependencyGraph, node: Any) -> None:
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)  # the reshape's input sizes
        if sizes is not None and len(sizes) >= 5:
            unmapped.add(node.module)
            return
        try:
            original(graph, node)
        except ZeroDivisionError:  # raised before any mapping is set: the reshape keeps the identity mapping
            unmapped.add(node.module)

    tp_index_mapping.update_reshape_index_mapping = tolerant
    try:
        yield
    finally:
        tp_index_mapping.update_reshape_index_mapping = original

