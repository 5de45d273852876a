"""The Ray edge of a trial: Tune config in, ``tune.report`` per epoch out; Ray Train (DDP) when asked.

A trial fine-tunes one candidate. With ``resources.workers_per_trial == 1`` it trains in its own process (no
worker-group start-up cost); with more it runs a ``TorchTrainer`` inside the trial (``trainables.train_loop``),
named after the trial id so a restarted trial resumes from its last checkpoint, its rank-0 metrics forwarded to
Tune by ``TuneReportCallback``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pf_ray.candidate import fine_tune, make_candidate, score
from pf_ray.config import Scoring
from pf_ray.data import load_data
from pf_ray.devices import training_device
from pf_ray.errors import ConfigError
from pf_ray.metrics import ACCURACY, EPOCH, PROXY_ACCURACY, SCORE
from pf_ray.search_space import PerLayerSpace, proposal_from
from pf_ray.spec import RunSpec
from pf_ray.storage import is_remote
from trainables.train_loop import TrainJob, load_baseline, ray_train_fit


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares; ``tune.with_parameters`` sends it once, through Ray's object store."""

    spec: RunSpec  # the run's spec, as the driver resolved it
    space: PerLayerSpace | None  # the driver's search space (its budget): proposals are projected with it, in
    # every trial alike, without tracing the model again; None for a learner with nothing to search
    baseline_checkpoint: str | bytes  # the checkpoint file's bytes (any node can run the trial), or a path here


def run_trial(learner_name: str, config: dict[str, Any], setup: TrialSetup) -> None:
    """Fine-tune the candidate that ``config`` (flat per-layer values) describes; report every epoch."""
    from ray import tune

    spec, baseline_checkpoint = setup.spec, setup.baseline_checkpoint
    if spec.learner_name != learner_name:
        raise ConfigError(f"trainable {learner_name!r} was given learner {spec.learner_name!r}")
    experiment = spec.experiment
    data = load_data(experiment.dataset, seed=experiment.seed)
    baseline = load_baseline(baseline_checkpoint, data.input_shape, data.num_classes,
                             user_model=experiment.model.name)
    proposal = proposal_from(config)  # None for a learner with nothing to search
    if proposal is not None and setup.space is not None:  # the candidate's learner config
        spec = spec.with_learner_config(setup.space.apply(spec.learner_config, proposal))
    search, resources = experiment.search, experiment.resources

    if resources.workers_per_trial == 1 or search.scoring is Scoring.PROXY:
        torch.set_num_threads(resources.cpus_per_trial)
        if resources.workers_per_trial == 1:  # the GPU Ray reserved for this trial (CUDA_VISIBLE_DEVICES), or the CPU
            device = training_device(resources)
        else:  # proxy scoring, Train workers configured: this process reserved no GPU of its own, only a CPU share
            device = training_device(resources) if torch.cuda.is_available() else torch.device("cpu")
        candidate = make_candidate(spec, baseline, data, device=device)
        if search.scoring is Scoring.PROXY:  # no fine-tuning: one report, the proxy is the accuracy
            proxy = candidate.static_metrics[PROXY_ACCURACY]
            tune.report({EPOCH: 1, ACCURACY: proxy, **candidate.static_metrics,
                         SCORE: score(proxy, candidate.static_metrics, search.reward)})
            return
        fine_tune(candidate, data, search.fine_tune, validation_subset=search.validation_subset,
                  report=tune.report, device=device)
        return

    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    # The Train run goes through the filesystem the search writes with (pf_ray.launch.atomic_fs for a local
    # folder: files appear whole or not at all).
    storage = context.get_storage()
    if is_remote(experiment.storage.path):  # the trial's folder in the remote storage, which every node (and a
        storage_path = f"{storage.trial_fs_path}/train"  # resumed driver) can reach
    else:  # the trial's folder on this node
        storage_path = str(Path(context.get_trial_dir()) / "train")
    job = TrainJob(spec, search.fine_tune, search.validation_subset,
                   num_workers=resources.workers_per_trial, cpus_per_worker=resources.cpus_per_worker,
                   name=context.get_trial_id(), storage_path=storage_path,
                   storage_filesystem=storage.storage_filesystem)
    ray_train_fit(job, baseline_checkpoint, callbacks=[TuneReportCallback()])
