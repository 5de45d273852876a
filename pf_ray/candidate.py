"""One candidate compressed model: per-layer search values -> learner config -> compressed, fine-tuned model.

Everything a trial does that is not Ray lives here, so the same code runs in a trial's own process, in each
Ray Train worker and in the final retraining, and is tested without Ray.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from pf_ray.config import DistillationConfig, ExperimentConfig, Reward, SearchConfig, TrainConfig
from pf_ray.data import DataBundle
from pf_ray.learners import build_learner
from pf_ray.metrics import finite_number, model_stats
from pf_ray.ops.macs_budget import MacsTable, macs_table, project_to_budget
from pf_ray.search_space import PerLayerSpace, layer_features
from pf_ray.train import ACCURACY, Report, evaluate, fit, recalibrate_batchnorm, subset

# Metric keys a candidate adds to every epoch's report.
SCORE = "score"  # what searchers and ASHA maximise (search.reward applied to the search.scoring accuracy)
PROXY_ACCURACY = "proxy_accuracy"  # validation accuracy right after compression, before any fine-tuning
MACS = "macs"
LATENCY_MS = "latency_ms"  # batch-1 ONNX Runtime latency on the trial's node (search.reward: latency)
LATENCY_RATIO = "latency_ratio"  # candidate latency / (target_macs_ratio * baseline latency), same node
LATENCY_EXPONENT = -0.07  # MnasNet's soft-constraint exponent: 2x over the target costs 5% of the reward
PARAMS = "params"
MACS_RATIO = "macs_ratio"  # candidate MACs / baseline MACs
LAYER_VALUES = "layer_values"  # the projected per-layer vector the learner used (e.g. keep ratios)


@dataclass(frozen=True)
class MacsBudget:
    """Channel pruning's budget: the MACs left by per-group keep ratios (after rounding), as a fraction."""

    target: float
    table: MacsTable  # plain data (no model): searchers carry it to the Ray driver
    round_to: int

    def cost(self, values: Sequence[float]) -> float:
        full = self.table.macs([1.0] * len(self.table.sizes), self.round_to)
        return self.table.macs(values, self.round_to) / full


def per_layer_space(experiment: ExperimentConfig, model: nn.Module,
                    input_shape: tuple[int, int, int]) -> PerLayerSpace | None:
    """The learner's per-layer search space on ``model``, or None for a learner with nothing to search."""
    if experiment.learner.name == "channel_pruning":
        from pf_ray.learners.channel_pruning import ChannelPruning, search_dimensions

        learner_config = experiment.learner_config()
        if getattr(learner_config, "mode", "auto") != "auto":  # uniform or list: the ratios are given
            return None
        names = tuple(search_dimensions(model, input_shape))
        budget = MacsBudget(experiment.search.target_macs_ratio, macs_table(model, input_shape),
                            learner_config.round_to)
        return PerLayerSpace(ChannelPruning.searched_field, names, low=learner_config.min_keep_ratio, high=1.0,
                             budget=budget, features=layer_features(model, input_shape, names))
    # Every other learner owns its budget (a global sparsity, an average bit width) and describes its own space.
    learner = build_learner(experiment.learner.name, experiment.learner_config())
    search_space = getattr(learner, "search_space", None)
    return None if search_space is None else search_space(model, input_shape)


def project(experiment: ExperimentConfig, model: nn.Module, input_shape: tuple[int, int, int],
            values: Sequence[float]) -> tuple[float, ...]:
    """Project a proposal onto the budget, so no candidate that misses it is ever scored."""
    if experiment.learner.name == "channel_pruning":
        learner_config = experiment.learner_config()
        return tuple(project_to_budget(macs_table(model, input_shape), values, experiment.search.target_macs_ratio,
                                       round_to=learner_config.round_to,
                                       min_ratio=learner_config.min_keep_ratio, model_name=type(model).__name__))
    learner = build_learner(experiment.learner.name, experiment.learner_config())
    return tuple(learner.project(model, input_shape, values)) if hasattr(learner, "project") else tuple(values)


def candidate_learner_config(experiment: ExperimentConfig, model: nn.Module, input_shape: tuple[int, int, int],
                             values: Sequence[float] | None) -> Any:
    """The learner's typed config with the (projected) per-layer values filled in."""
    learner_config = experiment.learner_config()
    space = per_layer_space(experiment, model, input_shape)
    if space is None or values is None:
        return learner_config
    return replace(learner_config, **{space.field: project(experiment, model, input_shape, values)})


@dataclass(frozen=True)
class Candidate:
    model: nn.Module
    learner: Any
    learner_config: Any
    static_metrics: dict[str, Any]  # MACs, params, ratio, per-layer values: the same every epoch
    teacher: nn.Module | None = None  # the frozen baseline, when the experiment distils (learner.distillation)
    distillation: DistillationConfig | None = None  # its weight and temperature (set with the teacher)

    def __post_init__(self) -> None:
        if (self.teacher is None) != (self.distillation is None):
            raise ValueError("Candidate: a teacher and a distillation config go together (see teacher_for)")


def teacher_for(experiment: ExperimentConfig, baseline: nn.Module) -> nn.Module | None:
    """A frozen copy of the baseline to distil from, or None when ``learner.distillation`` is not set."""
    if experiment.learner.distillation is None:
        return None
    teacher = copy.deepcopy(baseline).eval()
    teacher.requires_grad_(False)
    return teacher


def compress(experiment: ExperimentConfig, baseline: nn.Module, data: DataBundle,
             learner_config: Any) -> Candidate:
    """Apply the learner to a copy of ``baseline`` (the baseline itself is left untouched)."""
    learner = build_learner(experiment.learner.name, learner_config)
    model = learner.prepare(copy.deepcopy(baseline), data)
    baseline_macs = model_stats(baseline, data.input_shape).macs
    stats = model_stats(model, data.input_shape)
    static = {MACS: stats.macs, PARAMS: stats.params, MACS_RATIO: stats.macs / max(baseline_macs, 1)}
    field = getattr(learner, "searched_field", None)  # the config field a per-layer search fills
    searched = getattr(learner_config, field, None) if field else None
    if searched:
        static[LAYER_VALUES] = list(searched)
    if experiment.search.reward is Reward.LATENCY:
        from pf_ray.export.latency import latency_ms

        static[LATENCY_MS] = latency_ms(model, data.input_shape)
        target = experiment.search.target_macs_ratio * latency_ms(baseline, data.input_shape)
        static[LATENCY_RATIO] = static[LATENCY_MS] / target
    static[PROXY_ACCURACY] = proxy_accuracy(model, data, experiment.search)
    return Candidate(model, learner, learner_config, static, teacher_for(experiment, baseline),
                     experiment.learner.distillation)


def proxy_accuracy(model: nn.Module, data: DataBundle, search: SearchConfig) -> float:
    """The fast proxy (PocketFlow's reward): validation accuracy right after compression, before any
    fine-tuning, with BatchNorm statistics re-estimated on ``search.proxy_bn_images`` training images (on a copy:
    the candidate's own statistics are left for fine-tuning to update)."""
    probe = recalibrate_batchnorm(copy.deepcopy(model), data.train, images=search.proxy_bn_images)
    return evaluate(probe, subset(data.validation, search.validation_subset))[ACCURACY]


def best_trial(trials: list[dict[str, Any]], max_epochs: int) -> dict[str, Any] | None:
    """The top-scoring trial record among those that ran every epoch (ASHA stopped the rest early), else among
    all that reported a finite score; None if none did. Records are results.json's (``error``, ``score``,
    ``epoch`` keys). Ties go to the smallest trial id: the choice does not depend on the records' order, which
    differs between a run and its resumed continuation."""
    scored = [t for t in trials if not t.get("error") and finite_number(t.get(SCORE)) is not None]
    complete = [t for t in scored if (finite_number(t.get("epoch")) or 0) >= max_epochs] or scored
    ranked = sorted(complete, key=lambda t: str(t.get("trial_id")))
    return max(ranked, key=lambda t: finite_number(t[SCORE]), default=None)


def score(accuracy: float, static: dict[str, Any], reward: Reward) -> float:
    """The number searchers maximise, from an accuracy and the candidate's static metrics.

    AMC's reward is -error * ln(MACs): with MACs fixed by the budget it ranks like accuracy, but it lets a
    candidate under budget trade accuracy for fewer MACs. The latency reward multiplies accuracy by
    (latency / target) ** -0.07, so between candidates of equal MACs the one faster on the runtime wins.
    """
    if reward is Reward.AMC:
        return -(1.0 - accuracy) * math.log(max(static[MACS], 1))
    if reward is Reward.LATENCY:
        return accuracy * static[LATENCY_RATIO] ** LATENCY_EXPONENT
    return accuracy


def fine_tune(candidate: Candidate, data: DataBundle, train_config: TrainConfig, *,
              validation_subset: int | None, report: Report | None, reward: Reward = Reward.ACCURACY,
              seed: int = 0,
              wrap: Callable[[nn.Module], nn.Module] | None = None, distributed: bool = False,
              device: str | torch.device = "cpu", start_epoch: int = 0,
              log: Callable[[str], None] | None = None) -> nn.Module:
    """Fine-tune the candidate; every epoch's report carries its static metrics too. Returns the final model.

    Args:
        wrap: e.g. Ray Train's ``prepare_model`` (DDP) in a distributed worker.

    A candidate with a teacher (``learner.distillation`` set) distils from it with its distillation config.
    """
    model = candidate.model
    trained = wrap(model) if wrap is not None else model

    def report_with_static(metrics: dict[str, Any]) -> None:
        if report is not None:
            static = candidate.static_metrics
            report({**metrics, **static, SCORE: score(metrics[ACCURACY], static, reward)})

    fit(trained, data.train, train_config, validation_set=subset(data.validation, validation_subset),
        on_step=candidate.learner.on_step, on_start=getattr(candidate.learner, "set_total_steps", None),
        report=report_with_static, seed=seed, distributed=distributed,
        device=device, start_epoch=start_epoch, log=log,
        teacher=candidate.teacher, distillation=candidate.distillation)
    return candidate.learner.finalize(model)

