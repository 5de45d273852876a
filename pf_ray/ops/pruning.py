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
from pf_ray.ops.channel_choice import (  # noqa: F401  (also imported from here)
    MAX_LASSO_FEATURES,
    channel_blocks,
    is_grouped_conv,
    l1_channel_scores,
    lasso_consumers,
    lasso_problem,
    unkept_channels,
)
from pf_ray.ops.channel_groups import PrunableGroup, trace_groups
from pf_ray.ops.feature_sampling import sample_layers
from pf_ray.ops.lasso_pruning import prune_lasso_

# Where LASSO's regression inputs come from: "pruned": the model pruned so far, group by group (exact He et al.,
# every candidate samples its own); "baseline": the baseline's, for every group (PocketFlow's one feature cache:
# nothing depends on the candidate, so a search computes it once, ``feature_cache``)
FEATURE_SOURCES = ("pruned", "baseline")

# The field a user sets to choose per-group ratios; named in errors about the ratio vector.
KEEP_RATIOS_FIELD = "learner.options.layer_keep_ratios"

# Channel importance: a criterion is a callable (model, group) -> Tensor(num_channels), higher = keep.
Criterion = Callable[..., torch.Tensor]  # (model, group, **data) -> (num_channels,) scores


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
    problem = lasso_problem(model, group, consumers, samples, targets)
    return lasso.selection_scores(lasso.select_channels(problem, num_kept))


CRITERIA: dict[str, Criterion] = {"l1": l1_channel_scores, "lasso": lasso_channel_scores}


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
        plans.append((group, kept, unkept_channels(scores, kept, channel_blocks(model, group))))
    for group, _, remove in plans:
        trace.remove_(group.name, remove)
    return {group.name: kept for group, kept, _ in plans}


def group_multiples(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Per prunable group (forward order): the multiple its kept count must be, the number of convolution groups
    its channels are spread over (``channel_blocks``), 1 for a group without a grouped convolution."""
    multiples = []
    for group in trace_groups(model, input_shape).groups:
        blocks = channel_blocks(model, group)
        multiples.append(1 if blocks is None else len(set(blocks)))
    return tuple(multiples)
