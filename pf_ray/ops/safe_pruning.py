"""Which channel groups can be pruned safely: a copy of the model is pruned at the search box's extremes and must
still run, keep its output shape and export to ONNX; the groups that break it are left unpruned (issue 15).

torch-pruning follows splits, concatenations and depthwise convolutions, but not every graph a user brings: a
channel shuffle (view/transpose/reshape) after a split gives it index mappings that point past a layer's channels,
and a grouped (non-depthwise) convolution loses its channel groups' alignment. Rather than trust the analysis, the
result is tested.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pf_ray.ops.channel_groups import PrunableGroup, trace_groups
from pf_ray.ops.pruning import is_grouped_conv, prune_channels_

Log = Callable[[str], None]


@dataclass(frozen=True)
class SkippedGroup:
    """A prunable group left unpruned, and why (one line, for the log, results.json and the report)."""

    name: str
    reason: str


def unsafe_groups(model: nn.Module, input_shape: Sequence[int], min_keep_ratio: float, round_to: int, *,
                  exclude: Sequence[str] = (), export: bool = True, log: Log | None = None) -> tuple[SkippedGroup, ...]:
    """The groups of ``prunable_groups(model, input_shape)`` that must be left unpruned, in forward order.

    A group is unsafe when its description is inconsistent with its layers (``structural_problem``), or when
    pruning it to ``min_keep_ratio`` (rounded to ``round_to``) makes a copy of the model fail to run, change its
    output shape or fail to export to ONNX: alone, or together with the safe groups before it. The model is not
    modified.

    Cost: one pruned copy (a trace, a forward, an export) when every group is safe, which is the common case; when
    not, one forward per group alone and at most one export per group while the safe set is rebuilt in forward
    order. The pruning criterion does not matter (the same shapes come out), so channels are chosen by L1 norm.

    Args:
        exclude: groups already left unpruned (by configuration): not tested, not returned.
        export: also export each pruned copy to ONNX (off only in tests that check running alone).
        log: one line per unsafe group as it is found.
    """
    skipped: list[SkippedGroup] = []

    def skip(name: str, reason: str) -> None:
        skipped.append(SkippedGroup(name, reason))
        if log is not None:
            log(f"channel group {name!r} left unpruned: {reason}")

    trace = trace_groups(model, input_shape)
    for group in structural_problems(model, input_shape, round_to, exclude=exclude):
        skip(group.name, group.reason)
    candidates = [g for g in trace.groups if g.name not in exclude and g.name not in {s.name for s in skipped}]
    reference = _output_shape(model, input_shape)

    def attempt(groups: Sequence[PrunableGroup], *, with_export: bool) -> str:
        ratios = {g.name: min_keep_ratio for g in groups}
        return _prune_and_check(model, input_shape, ratios, round_to, reference, with_export=with_export and export)

    if candidates and attempt(candidates, with_export=True):
        alone = []
        for group in candidates:
            reason = attempt([group], with_export=False)
            if reason:
                skip(group.name, reason)
            else:
                alone.append(group)
        if alone and attempt(alone, with_export=True):
            # the failure comes from groups pruned together, or from the export: rebuild the set one by one
            kept: list[PrunableGroup] = []
            for group in alone:
                reason = attempt([*kept, group], with_export=True)
                if reason:
                    skip(group.name, f"{reason} (pruned together with the groups before it)")
                else:
                    kept.append(group)
    order = {g.name: i for i, g in enumerate(trace.groups)}
    return tuple(sorted(skipped, key=lambda s: order[s.name]))


def structural_problems(model: nn.Module, input_shape: Sequence[int], round_to: int, *,
                        exclude: Collection[str] = ()) -> tuple[SkippedGroup, ...]:
    """The groups (less ``exclude``) whose description cannot be pruned as it stands (``structural_problem``), in
    forward order; no pruning, no forward pass: cheap enough for every trial."""
    modules = dict(model.named_modules())
    found = []
    for group in trace_groups(model, input_shape).groups:
        problem = "" if group.name in exclude else structural_problem(group, modules, round_to)
        if problem:
            found.append(SkippedGroup(group.name, problem))
    return tuple(found)


def structural_problem(group: PrunableGroup, modules: dict[str, nn.Module], round_to: int) -> str:
    """Why ``group``'s description cannot be pruned as it stands ("" if it can): channel indices beyond a layer's
    channels (torch-pruning's index mapping lost its way, e.g. through a channel shuffle), or a grouped
    convolution that is not depthwise and whose groups could not stay aligned. Its outputs can be pruned (the same
    number of channels in each of its groups, ``pruning.channel_blocks``) when ``round_to`` is a multiple of its
    groups; its inputs cannot (torch-pruning would cut every group's filters at the first group's positions). A
    group the dependency analysis could not describe says why itself (``PrunableGroup.problem``)."""
    if group.problem:
        return group.problem
    for member in group.members:
        module = modules.get(member.module)
        size = _channels(module, member.dim)
        if size is None:
            continue
        if any(i >= size for i in member.indices) or len(set(member.indices)) != len(member.indices):
            return (f"the dependency analysis maps its channels to indices {_span(member.indices)} of "
                    f"{member.module!r}, which has {size} {member.dim}put channels (an operation it cannot follow, "
                    "e.g. a channel shuffle after a split)")
        if not is_grouped_conv(module):
            continue
        if member.dim == "in":
            return (f"its channels feed grouped convolution {member.module!r} (groups={module.groups}), whose "
                    "inputs cannot be pruned evenly across its groups")
        if round_to % module.groups or len(member.indices) != module.out_channels:
            return (f"grouped convolution {member.module!r} (groups={module.groups}) keeps its groups aligned only "
                    f"when every kept count is a multiple of {module.groups} (round_to is {round_to})")
    return ""


def _channels(module: nn.Module | None, dim: str) -> int | None:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if dim == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if dim == "out" else module.in_features
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return module.num_features
    return None


def _span(indices: Sequence[int]) -> str:
    return f"{min(indices)}..{max(indices)}" if indices else "none"


def _output_shape(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    output = _forward(model, input_shape)
    return tuple(output.shape)


def _forward(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    parameter = next(model.parameters())
    example = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0)).to(parameter)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(example)
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, not a tensor")
    return output


def _prune_and_check(model: nn.Module, input_shape: Sequence[int], ratios: dict[str, float], round_to: int,
                     reference: tuple[int, ...], *, with_export: bool) -> str:
    """Prune a copy of ``model`` to ``ratios``; "" if it runs, keeps ``reference`` as output shape and (with
    ``with_export``) exports to ONNX; else what went wrong, in one line."""
    from pf_ray.export.onnx import export_onnx  # export pulls in onnx; only this check needs it here

    candidate = copy.deepcopy(model)
    try:
        prune_channels_(candidate, input_shape, ratios, round_to=round_to, criterion="l1")
    except Exception as error:  # noqa: BLE001 - any failure of the surgery makes the groups unsafe
        return f"pruning it fails ({_one_line(error)})"
    try:
        shape = tuple(_forward(candidate, input_shape).shape)
    except Exception as error:  # noqa: BLE001
        return f"the pruned model fails to run ({_one_line(error)})"
    if shape != reference:
        return f"the pruned model's output shape is {shape}, not {reference}"
    if with_export:
        with tempfile.TemporaryDirectory(prefix="pf-ray-safe-pruning-") as folder:
            try:
                export_onnx(candidate, input_shape, Path(folder) / "pruned.onnx")
            except Exception as error:  # noqa: BLE001
                return f"the pruned model fails to export to ONNX ({_one_line(error)})"
    return ""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]

