"""LASSO channel pruning's procedure (He et al., "Channel Pruning for Accelerating Very Deep Neural Networks",
ICCV 2017): groups pruned one at a time in forward order, each selected by LASSO on sampled features and its
consumers refit by least squares. ``pruning.prune_channels_(criterion="lasso")`` is the entry point; the maths is
in ``pf_ray.ops.lasso``, the sampling in ``pf_ray.ops.feature_sampling``, what a search shares in
``pf_ray.ops.feature_cache``.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

from pf_ray.errors import ConfigError, ModelError
from pf_ray.ops import feature_cache, lasso
from pf_ray.ops.channel_choice import channel_blocks, l1_channel_scores, lasso_consumers, lasso_problem, unkept_channels
from pf_ray.ops.channel_groups import GroupMember, GroupTrace, PrunableGroup
from pf_ray.ops.feature_sampling import LayerSamples, residual_target, sample_layers


def prune_lasso_(
    model: nn.Module,
    trace: GroupTrace,
    counts: Sequence[int],
    batches: list[torch.Tensor],
    *,
    points_per_image: int,
    seed: int,
    reconstruct: bool,
    features: str,
    costs: MutableMapping[str, Any],
) -> None:
    todo = [(g.name, kept) for g, kept in zip(trace.groups, counts, strict=True) if kept < g.num_channels]
    if not todo:
        return
    if not batches:
        raise ConfigError("criterion 'lasso' needs training data: batches= is empty")
    clock = _Clock(costs)
    sampling = {"points_per_image": points_per_image, "seed": seed}
    pruned = {name for name, _ in todo}
    observed = list(
        dict.fromkeys(m.module for g in trace.groups if g.name in pruned for m in lasso_consumers(model, g)[0])
    )
    # what depends on the model as passed in alone, once per search (feature_cache): the targets (its outputs and
    # residual partners); with features "baseline", every observed layer's refit statistics
    with clock("baseline"):
        if features == "baseline":
            statistics, costs["baseline_source"] = _baseline_statistics(model, observed, batches, **sampling)
        else:
            reference, costs["baseline_source"] = _reference_samples(model, observed, batches, **sampling)
    # which output channel / input feature of the model as passed in each current one of an observed layer is
    channels = {name: torch.arange(trace.modules[name].weight.shape[0]) for name in observed}
    inputs = {name: torch.arange(trace.modules[name].weight.shape[1]) for name in observed}

    for name, kept in todo:
        group = trace.current_group(name)
        if group is None or kept >= group.num_channels:
            continue
        consumers, reason = lasso_consumers(model, group)
        refits: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        blocks = channel_blocks(model, group)
        if reason:
            warnings.warn(f"group {name!r}: {reason}; its channels are chosen by L1 norm", stacklevel=3)
            remove = unkept_channels(l1_channel_scores(model, group), kept, blocks)
        else:
            names = [member.module for member in consumers]
            if features == "baseline":
                with clock("selection"):
                    problem = _problem_from_statistics(trace, group, consumers, statistics, channels, inputs)
                    selection = lasso.select_channels(problem, kept)
            else:
                with clock("sampling"):
                    partners = [n for n in names if reference[n].partner is not None]
                    current = sample_layers(model, names, batches, keep_outputs=False, partners=partners, **sampling)
                    targets = {n: residual_target(reference[n], current[n], channels[n]) for n in names}
                with clock("selection"):
                    selection = lasso.select_channels(lasso_problem(model, group, consumers, current, targets), kept)
            remove = sorted(set(range(group.num_channels)) - set(selection.keep))
            if blocks is not None:  # the LASSO's ranking, kept evenly across the convolution's groups
                remove = unkept_channels(lasso.selection_scores(selection), kept, blocks)
            if reconstruct:
                with clock("refit"):
                    if features == "baseline":
                        refits = _refits_from_statistics(trace, group, consumers, statistics, channels, inputs,
                                                         set(remove))
                    else:
                        refits = _refits(trace, group, consumers, current, targets, set(remove))
        trace.remove_(name, remove)
        _forget_channels(group, remove, channels)
        _forget_inputs(group, remove, inputs)
        for module_name, (weight, bias_change) in refits.items():
            _write_weights_(trace.modules[module_name], weight, bias_change)


class _Clock:
    """Adds the seconds spent in ``with clock(what):`` to ``costs[what]``."""

    def __init__(self, costs: MutableMapping[str, Any]) -> None:
        self.costs = costs

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.costs[what] = self.costs.get(what, 0.0) + time.perf_counter() - start


def _sum(problems: Iterable[lasso.ChannelProblem]) -> lasso.ChannelProblem:
    problems = list(problems)
    total = problems[0]
    for problem in problems[1:]:
        total = total + problem
    return total


def _reference_samples(
    model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], *, points_per_image: int, seed: int
) -> tuple[dict[str, LayerSamples], str]:
    """The outputs (and residual partners) of ``names`` sampled in ``model`` on ``batches``, cached, and where
    they came from (``feature_cache.cached``)."""
    settings = {"what": "reference", "names": list(names), "points_per_image": points_per_image, "seed": seed}

    def compute() -> feature_cache.Entry:
        samples = sample_layers(model, names, batches, keep_inputs=False, points_per_image=points_per_image,
                                seed=seed)
        return {n: {"outputs": s.outputs, "partner": s.partner, "partner_scale": s.partner_scale}
                for n, s in samples.items()}

    entry, where = feature_cache.cached(feature_cache.fingerprint(model, batches, settings), compute)
    return {n: LayerSamples(inputs=None, **fields) for n, fields in entry.items()}, where


def _baseline_statistics(
    model: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], *, points_per_image: int, seed: int
) -> tuple[dict[str, lasso.RefitStatistics], str]:
    """Every layer of ``names`` sampled in ``model`` on ``batches`` (the same points as ``sample_layers``), summed
    into its ``lasso.RefitStatistics`` (target: its own output before bias), cached, and where they came from."""
    settings = {"what": "statistics", "names": list(names), "points_per_image": points_per_image, "seed": seed,
                "holdout": lasso.HOLDOUT}

    def compute() -> feature_cache.Entry:
        images = sum(len(batch) for batch in batches)
        statistics: dict[str, lasso.RefitStatistics] = {}
        holdout: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {n: ([], []) for n in names}
        done = 0  # points of each layer so far = done images x points per image of that layer
        for index, batch in enumerate(batches):  # one batch at a time: the samples of them all would not fit
            samples = sample_layers(model, names, [batch], points_per_image=points_per_image, seed=seed,
                                    batch_offset=index)
            for n, sample in samples.items():
                x, y = sample.inputs, sample.outputs
                per_image = x.shape[0] // len(batch)
                if n not in statistics:
                    statistics[n] = lasso.empty_statistics(x.shape[1] * x.shape[2], y.shape[1], x.shape[2])
                # float32 products summed per batch in float64 (~1e-7 relative): float64 ones cost a minute
                lasso.add_points_(statistics[n], x, y, dtype=torch.float32)
                total = images * per_image
                first = max(total - int(round(total * lasso.HOLDOUT)) - done * per_image, 0)  # held out from here
                holdout[n][0].append(x[first:].flatten(1))
                holdout[n][1].append(y[first:])
            done += len(batch)
        entry = {}
        for n, s in statistics.items():
            entry[n] = {"gram": s.gram.float(), "right": s.right.float(), "energy": s.energy,
                        "holdout_inputs": torch.cat(holdout[n][0]), "holdout_target": torch.cat(holdout[n][1]),
                        "kernel": s.kernel}
        return entry

    entry, where = feature_cache.cached(feature_cache.fingerprint(model, batches, settings), compute)
    return {n: lasso.RefitStatistics(**fields) for n, fields in entry.items()}, where


def _problem_from_statistics(
    trace: GroupTrace,
    group: PrunableGroup,
    consumers: Sequence[GroupMember],
    statistics: Mapping[str, lasso.RefitStatistics],
    channels: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
) -> lasso.ChannelProblem:
    """The group's regression (``lasso_problem``) from the baseline's statistics: each consumer's current weights
    and features put in their baseline numbers, its outputs gone since left out."""
    problems = []
    for member in consumers:
        layer = statistics[member.module]
        weight = _in_baseline_features(trace.modules[member.module], inputs[member.module],
                                       layer.num_features // layer.kernel)
        features = inputs[member.module][list(member.indices)].tolist()
        problems.append(lasso.channel_problem_from_statistics(
            layer, weight, features, member.group_indices, group.num_channels,
            outputs=channels[member.module].tolist()))
    return _sum(problems)


def _in_baseline_features(module: nn.Module, inputs: torch.Tensor, width: int) -> torch.Tensor:
    """``module``'s weight (out, in, kernel) with its input features put back where they were in the model as
    passed in (``inputs``: which one of its ``width`` each current feature is); those gone since weigh zero."""
    weight = module.weight.detach().cpu().reshape(module.weight.shape[0], module.weight.shape[1], -1)  # stats: CPU
    full = torch.zeros(weight.shape[0], width, weight.shape[2], dtype=weight.dtype)
    full[:, inputs] = weight
    return full


def _refits_from_statistics(
    trace: GroupTrace,
    group: PrunableGroup,
    consumers: Sequence[GroupMember],
    statistics: Mapping[str, lasso.RefitStatistics],
    channels: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    removed: set[int],
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``_refits`` from the baseline's statistics: the same kept features and outputs, in their baseline numbers."""
    refits = {}
    for member in consumers:
        module = trace.modules[member.module]
        weight = module.weight.detach().reshape(module.weight.shape[0], module.weight.shape[1], -1)
        kept_features, stay = _refit_plan(group, member, weight.shape[1], weight.shape[0], removed)
        refits[member.module] = lasso.least_squares_from_statistics(
            statistics[member.module], inputs[member.module][kept_features].tolist(),
            weight[stay][:, kept_features], bias=module.bias is not None,
            outputs=channels[member.module][stay].tolist())
    return refits


def _refit_plan(
    group: PrunableGroup, member: GroupMember, in_features: int, out_features: int, removed: set[int]
) -> tuple[list[int], list[int]]:
    """(the consumer's input features that remain, its outputs that remain): a consumer inside the group's
    residual stream loses some of its outputs too, and only those that stay are refit."""
    dropped = {f for f, c in zip(member.indices, member.group_indices, strict=True) if c in removed}
    lost = {
        i
        for m in group.members
        if m.module == member.module and m.dim == "out"
        for i, c in zip(m.indices, m.group_indices, strict=True)
        if c in removed
    }
    return [f for f in range(in_features) if f not in dropped], [i for i in range(out_features) if i not in lost]


def _refits(
    trace: GroupTrace,
    group: PrunableGroup,
    consumers: Sequence[GroupMember],
    samples: Mapping[str, LayerSamples],
    targets: Mapping[str, torch.Tensor],
    removed: set[int],
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Least-squares weights of every consumer for the input features (and output channels) that remain."""
    refits = {}
    for member in consumers:
        module = trace.modules[member.module]
        inputs = samples[member.module].inputs
        weight = module.weight.detach().reshape(module.weight.shape[0], module.weight.shape[1], -1)
        kept_features, stay = _refit_plan(group, member, inputs.shape[1], weight.shape[0], removed)
        refits[member.module] = lasso.least_squares_weights(
            inputs, targets[member.module][:, stay], kept_features, weight[stay], bias=module.bias is not None
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


def _forget_inputs(group: PrunableGroup, removed: Sequence[int], inputs: dict[str, torch.Tensor]) -> None:
    """Keep ``inputs`` (layer -> original input feature of each current one) in step with a removal."""
    removed_set = set(removed)
    for member in group.members:
        if member.dim == "in" and member.module in inputs:
            gone = {i for i, c in zip(member.indices, member.group_indices, strict=True) if c in removed_set}
            inputs[member.module] = inputs[member.module][[i for i in range(len(inputs[member.module]))
                                                           if i not in gone]]


def _write_weights_(module: nn.Module, weight: torch.Tensor, bias_change: torch.Tensor | None) -> None:
    if weight.numel() != module.weight.numel():
        raise ModelError(
            f"reconstruction produced {tuple(weight.shape)} weights for a layer of shape {tuple(module.weight.shape)}"
        )
    with torch.no_grad():
        module.weight.copy_(weight.reshape(module.weight.shape))
        if bias_change is not None:
            module.bias.add_(bias_change.to(module.bias))  # float64 on the CPU -> the bias's dtype and device

