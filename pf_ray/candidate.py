"""One candidate compressed model: a proposal (per-layer values) -> the learner's config -> the compressed model,
fine-tuned and scored.

Everything a trial does that is not Ray lives here, so the same code runs in a trial's own process, in each
Ray Train worker and in the final retraining, and is tested without Ray.

Every stage runs on the one ``device`` the caller passes (``pf_ray.devices.training_device``): the learner's
prepare (selection, reconstruction, calibration), the proxy score with its BatchNorm re-estimation, fine-tuning.
Latency, INT8 scoring and export run on a CPU copy.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pf_ray.config import DistillationConfig, ExperimentConfig, Reward, SearchConfig, TrainConfig
from pf_ray.data import DataBundle
from pf_ray.devices import check_same_structure, model_device, prepare_for_device
from pf_ray.learners import Learner
from pf_ray.learners.base import CountsSteps, KeepsFp32Layers, ScoresInt8, SearchesPerLayer
from pf_ray.metrics import (
    ACCURACY,
    FP32_LAYERS,
    INT8_ACCURACY,
    LATENCY_MS,
    LATENCY_RATIO,
    LAYER_VALUES,
    MACS,
    MACS_RATIO,
    PARAMS,
    PROXY_ACCURACY,
    REMOVED_BLOCKS,
    SCORE,
    finite_number,
    model_stats,
)
from pf_ray.ops.blocks import removed_blocks
from pf_ray.ops.latency_budget import LatencySource
from pf_ray.search_space import PerLayerSpace
from pf_ray.spec import RunSpec
from pf_ray.train import Report, evaluate, fit, recalibrate_batchnorm, subset

logger = logging.getLogger(__name__)

LATENCY_EXPONENT = -0.07  # MnasNet's soft-constraint exponent: 2x over the target costs 5% of the reward


def search_space(spec: RunSpec, model: nn.Module, input_shape: tuple[int, int, int],
                 latency: LatencySource | None = None) -> PerLayerSpace | None:
    """The learner's per-layer search space on ``model``, or None for a learner (or mode) with nothing to search.
    ``latency``: the deployment target's latency table, for ``search.budget: latency``."""
    learner = spec.build_learner()
    if not isinstance(learner, SearchesPerLayer):
        return None
    return learner.search_space(model, input_shape, spec.experiment.search, latency)


def resolve(spec: RunSpec, model: nn.Module, input_shape: tuple[int, int, int],
            proposal: Sequence[float] | None) -> RunSpec:
    """``spec`` with the candidate's learner config: ``proposal`` projected onto the budget and filled in (``spec``
    itself without a proposal, or for a learner with nothing to search)."""
    space = search_space(spec, model, input_shape) if proposal is not None else None
    return spec if space is None else spec.with_learner_config(space.apply(spec.learner_config, proposal))


@dataclass(frozen=True)
class Candidate:
    spec: RunSpec  # its learner_config is the candidate's (per-layer values filled in)
    model: nn.Module
    learner: Learner
    static_metrics: dict[str, Any]  # MACs, params, ratio, per-layer values: the same every epoch
    teacher: nn.Module | None = None  # the frozen baseline, when the experiment distils (learner.distillation)

    @property
    def distillation(self) -> DistillationConfig | None:
        return self.spec.experiment.learner.distillation if self.teacher is not None else None


def teacher_for(experiment: ExperimentConfig, baseline: nn.Module) -> nn.Module | None:
    """A frozen copy of the baseline to distil from, or None when ``learner.distillation`` is not set."""
    if experiment.learner.distillation is None:
        return None
    teacher = copy.deepcopy(baseline).eval()
    teacher.requires_grad_(False)
    return teacher


def make_candidate(spec: RunSpec, baseline: nn.Module, data: DataBundle, *,
                   proposal: Sequence[float] | None = None, measure: bool = True,
                   device: str | torch.device = "cpu", distributed: bool = False) -> Candidate:
    """Apply the learner to a copy of ``baseline`` (the baseline itself is left untouched, on its device).

    Args:
        proposal: per-layer values from a searcher, projected onto the budget into the learner's config (the space
            is built on the copy that is then compressed); None: ``spec.learner_config`` as it is.
        measure: also measure what only the search uses: the proxy accuracy (and, with ``search.reward:
            latency``, the latency). The retrain does not.
        device: where the learner's prepare and the proxy run, and the candidate's model stays.
        distributed: one of several DDP ranks (a process group is up): every rank prepares its own candidate
            from the same baseline and seed, and they check together that their compressed models have the same
            structure (``devices.check_same_structure``: all raise, on every rank, if not); DDP then broadcasts
            rank 0's weights.
    """
    model = copy.deepcopy(baseline).to(device)
    spec = resolve(spec, model, data.input_shape, proposal)
    learner = spec.build_learner()
    model = learner.prepare(model, data)
    if distributed:
        check_same_structure(model, device)
    experiment = spec.experiment
    baseline_macs = model_stats(baseline, data.input_shape).macs
    stats = model_stats(model, data.input_shape)
    static = {MACS: stats.macs, PARAMS: stats.params, MACS_RATIO: stats.macs / max(baseline_macs, 1)}
    if isinstance(learner, SearchesPerLayer) and getattr(spec.learner_config, learner.searched_field):
        static[LAYER_VALUES] = list(getattr(spec.learner_config, learner.searched_field))
    removed = removed_blocks(model)
    if removed:  # depth pruning: with LAYER_VALUES, what the search space's vector holds (PerLayerSpace.recorded)
        static[REMOVED_BLOCKS] = removed
    if isinstance(learner, KeepsFp32Layers) and learner.fp32_layers():  # the same, for a precision search
        static[FP32_LAYERS] = list(learner.fp32_layers())
    if measure and experiment.search.reward is Reward.LATENCY:
        from pf_ray.export.latency import reward_latency

        static[LATENCY_MS], wanted = reward_latency(copy.deepcopy(model).cpu(), baseline, data.input_shape,
                                                    experiment)  # measured on the CPU runtime: a CPU copy
        static[LATENCY_RATIO] = static[LATENCY_MS] / wanted
    if measure:
        static[PROXY_ACCURACY] = proxy_accuracy(model, data, experiment.search)
    return Candidate(spec, model, learner, static, teacher_for(experiment, baseline))


def proxy_accuracy(model: nn.Module, data: DataBundle, search: SearchConfig) -> float:
    """The fast proxy (PocketFlow's reward): validation accuracy right after compression, before any
    fine-tuning, with BatchNorm statistics re-estimated on ``search.proxy_bn_images`` training images (on a copy:
    the candidate's own statistics are left for fine-tuning to update). Runs on the model's device."""
    device = model_device(model)
    probe = recalibrate_batchnorm(copy.deepcopy(model), data.train, images=search.proxy_bn_images, device=device)
    return evaluate(probe, subset(data.validation, search.validation_subset), device=device)[ACCURACY]


def best_trial(trials: list[dict[str, Any]], max_epochs: int) -> dict[str, Any] | None:
    """The top-scoring trial record among those that ran every epoch (ASHA stopped the rest early), else among
    all that reported a finite score; None if none did. Records are results.json's (``error``, ``score``,
    ``epoch`` keys). Ties go to the smallest trial id: the choice does not depend on the records' order, which
    differs between a run and its resumed continuation."""
    scored = [t for t in trials if not t.get("error") and finite_number(t.get(SCORE)) is not None]
    complete = [t for t in scored if (finite_number(t.get("epoch")) or 0) >= max_epochs] or scored
    ranked = sorted(complete, key=lambda t: str(t.get("trial_id")))
    return max(ranked, key=lambda t: finite_number(t[SCORE]), default=None)


def int8_scorer(candidate: Candidate, data: DataBundle,
                validation_subset: int | None) -> Callable[[nn.Module], float] | None:
    """For a learner scored on its INT8 artifact (``ScoresInt8``: channel pruning's precision search): a function
    giving a model's validation accuracy as the deployment target's INT8 artifact, with the learner's FP32 layers
    (calibrated on ``export.calibration_samples`` training images, as the export is). None for the others."""
    learner = candidate.learner
    if not (isinstance(learner, ScoresInt8) and learner.scores_int8()):
        return None
    from torch.utils.data import DataLoader

    from pf_ray.export.quantized_eval import quantized_accuracy
    from pf_ray.export.verify import dataset_inputs

    experiment = candidate.spec.experiment
    calibration = dataset_inputs(data.train, limit=experiment.export.calibration_samples)
    batches = list(DataLoader(subset(data.validation, validation_subset), batch_size=512, shuffle=False))
    images, labels = torch.cat([x for x, _ in batches]), torch.cat([torch.as_tensor(y) for _, y in batches])
    fp32 = learner.fp32_layers() if isinstance(learner, KeepsFp32Layers) else ()

    def accuracy(model: nn.Module) -> float:
        return quantized_accuracy(model, data.input_shape, experiment.target, calibration, images, labels,
                                  fp32_layers=fp32)

    return accuracy


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


def schedule_line(train_config: TrainConfig, world_size: int) -> str:
    """What a run's optimiser steps average over, said once per run: ``batch_size`` is per worker and the
    learning rate is not scaled with the number of workers, so a search trial (``resources.workers_per_trial``
    workers) and the retrain (``retrain.num_workers``) step with different effective batches when their worker
    counts differ."""
    workers = f"{world_size} workers" if world_size != 1 else "1 worker"
    batch = train_config.batch_size
    return (f"  schedule: batch {batch} per worker x {workers} = {batch * world_size} examples per step, learning rate "
            f"{train_config.learning_rate:g} (per-worker batch; the rate is not scaled with the number of workers)")


def fine_tune(candidate: Candidate, data: DataBundle, train_config: TrainConfig, *,
              validation_subset: int | None, report: Report | None = None,
              wrap: Callable[[nn.Module], nn.Module] | None = None, distributed: bool = False,
              device: str | torch.device = "cpu", start_epoch: int = 0,
              log: Callable[[str], None] | None = None) -> nn.Module:
    """Fine-tune the candidate (seeded by the experiment's seed, scored by its ``search.reward``); every epoch's
    report carries its static metrics too. Returns the final model.

    Args:
        wrap: e.g. Ray Train's ``prepare_model`` (DDP) in a distributed worker; the model is on ``device``
            (cudnn and channels-last set there) before it is wrapped.
        device: where it trains; the arithmetic is ``resources.precision`` (fp32, or bf16 autocast).

    A candidate with a teacher (``learner.distillation`` set) distils from it with its distillation config.
    """
    experiment = candidate.spec.experiment
    model = prepare_for_device(candidate.model, device)
    trained = wrap(model) if wrap is not None else model

    int8_accuracy = int8_scorer(candidate, data, validation_subset)

    def report_with_static(metrics: dict[str, Any]) -> None:
        if report is not None:
            static = candidate.static_metrics
            accuracy = metrics[ACCURACY]
            if int8_accuracy is not None:  # a precision search: what ships is the INT8 artifact
                metrics = {**metrics, INT8_ACCURACY: int8_accuracy(model)}
                accuracy = metrics[INT8_ACCURACY]
            report({**metrics, **static, SCORE: score(accuracy, static, experiment.search.reward)})

    world_size = torch.distributed.get_world_size() if distributed else 1
    line = schedule_line(train_config, world_size)
    log(line) if log is not None else logger.info(line)
    counts_steps = isinstance(candidate.learner, CountsSteps)
    fit(trained, data.train, train_config, validation_set=subset(data.validation, validation_subset),
        on_step=candidate.learner.on_step, on_start=candidate.learner.set_total_steps if counts_steps else None,
        report=report_with_static, seed=experiment.seed, distributed=distributed,
        device=device, precision=experiment.resources.precision, start_epoch=start_epoch, log=log,
        teacher=candidate.teacher, distillation=candidate.distillation)
    return candidate.learner.finalize(model)

