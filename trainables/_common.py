"""The Ray edge of a trial: Tune config in, ``tune.report`` per epoch out; Ray Train (DDP) when asked.

A trial fine-tunes one candidate. With ``resources.workers_per_trial == 1`` it trains in its own process (no
worker-group start-up cost); with more it runs a ``TorchTrainer`` inside the trial (DDP, gloo on CPU, nccl on
GPU), named after the trial id so a restarted trial resumes from its last checkpoint, its rank-0 metrics
forwarded to Tune by ``TuneReportCallback`` (``fit`` all-reduces them first, so rank 0 speaks for all).
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pf_ray.candidate import (
    PROXY_ACCURACY,
    SCORE,
    candidate_learner_config,
    compress,
    fine_tune,
    per_layer_space,
    score,
)
from pf_ray.checkpoint import load_checkpoint, save_checkpoint
from pf_ray.config import ExperimentConfig, Scoring, TrainConfig, from_dict, is_remote, to_dict
from pf_ray.data import load_data
from pf_ray.errors import ConfigError
from pf_ray.learners import learner_config_class
from pf_ray.train import ACCURACY, EPOCH

MODEL_FILE = "model.pt"  # inside each Ray Train checkpoint directory: the finalized model (a pf-ray checkpoint)
TRAINING_STATE_FILE = "training_state.pt"  # beside it: the state dict of the model being trained, and its epoch


def load_training_state(candidate: Any, directory: str | Path) -> int:
    """Load a retrain checkpoint's training state into a freshly prepared candidate; returns its epoch."""
    state = torch.load(Path(directory) / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    candidate.model.load_state_dict(state["model"])
    return int(state[EPOCH])


def run_trial(learner_name: str, config: dict[str, Any], *, experiment: dict[str, Any],
              baseline_checkpoint: str | bytes) -> None:
    """Fine-tune the candidate that ``config`` (flat per-layer values) describes; report every epoch.

    ``baseline_checkpoint``: the checkpoint file's bytes (what ``pf-ray compress`` sends, through Ray's object
    store, so any node can run the trial), or a path readable here.
    """
    from ray import tune

    spec = from_dict(ExperimentConfig, experiment)
    if spec.learner.name != learner_name:
        raise ConfigError(f"trainable {learner_name!r} was given learner {spec.learner.name!r}")
    data = load_data(spec.dataset, seed=spec.seed)
    baseline = load_baseline(baseline_checkpoint, data.input_shape, data.num_classes, user_model=spec.model.name)
    space = per_layer_space(spec, baseline, data.input_shape)
    values = space.values_from(config) if space is not None else None
    learner_config = candidate_learner_config(spec, baseline, data.input_shape, values)

    if spec.resources.workers_per_trial == 1 or spec.search.scoring is Scoring.PROXY:
        torch.set_num_threads(spec.resources.cpus_per_trial)
        candidate = compress(spec, baseline, data, learner_config)
        if spec.search.scoring is Scoring.PROXY:  # no fine-tuning: one report, the proxy is the accuracy
            proxy = candidate.static_metrics[PROXY_ACCURACY]
            tune.report({EPOCH: 1, ACCURACY: proxy, **candidate.static_metrics,
                         SCORE: score(proxy, candidate.static_metrics, spec.search.reward)})
            return
        fine_tune(candidate, data, spec.search.fine_tune, validation_subset=spec.search.validation_subset,
                  report=tune.report, reward=spec.search.reward, seed=spec.seed)
        return

    from ray.tune.integration.ray_train import TuneReportCallback

    context = tune.get_context()
    if is_remote(spec.storage.path):  # remote storage: the Train run goes in the trial's folder there, which
        storage = context.get_storage()  # every node (and a resumed driver) can reach
        storage_path, filesystem = f"{storage.trial_fs_path}/train", storage.storage_filesystem
    else:  # the trial's folder on this node, written atomically (pf_ray.atomic_fs)
        from pf_ray.atomic_fs import atomic_local_filesystem

        storage_path, filesystem = str(Path(context.get_trial_dir()) / "train"), atomic_local_filesystem()
    ray_train_fit(
        spec,
        learner_config=to_dict(learner_config),
        baseline_checkpoint=baseline_checkpoint,
        train_config=spec.search.fine_tune,
        validation_subset=spec.search.validation_subset,
        num_workers=spec.resources.workers_per_trial,
        cpus_per_worker=spec.resources.cpus_per_worker,
        name=context.get_trial_id(),
        storage_path=storage_path,
        storage_filesystem=filesystem,
        callbacks=[TuneReportCallback()],
    )


def load_baseline(checkpoint: str | bytes, input_shape: tuple[int, int, int], num_classes: int, *,
                  user_model: str) -> torch.nn.Module:
    """The baseline from a checkpoint file's bytes (written to a temporary file first) or from its path.

    ``user_model``: the experiment's ``model.name`` (a user model file is imported only if it is the one named)."""
    if isinstance(checkpoint, str):
        return load_checkpoint(checkpoint, expect_input_shape=input_shape, expect_num_classes=num_classes,
                               user_model=user_model)[0]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "baseline.pt"
        path.write_bytes(checkpoint)
        return load_checkpoint(path, expect_input_shape=input_shape, expect_num_classes=num_classes,
                               user_model=user_model)[0]


def ray_train_fit(
    spec: ExperimentConfig,
    *,
    learner_config: dict[str, Any],
    baseline_checkpoint: str | bytes,
    train_config: TrainConfig,
    validation_subset: int | None,
    num_workers: int,
    cpus_per_worker: int,
    name: str,
    storage_path: str,
    storage_filesystem: Any = None,
    callbacks: list[Any] = (),
    max_failures: int = 2,
    progress: Any = None,
):
    """Compress + fine-tune with a ``TorchTrainer`` of ``num_workers``; returns the ``ray.train.Result``.

    ``baseline_checkpoint``: the checkpoint file's bytes (sent to the workers through Ray's object store) or a
    path every worker can read. ``storage_path``: a local folder or a URI (s3://...), or a path on
    ``storage_filesystem`` (a ``pyarrow.fs.FileSystem``) when that is given.
    Resumes from the last checkpoint of the run ``(storage_path, name)`` if there is one, and retries a worker
    group that died (a lost node) up to ``max_failures`` times from its last checkpoint. ``progress``: a
    ``ray.util.queue.Queue`` the driver drains (``pf_ray.launch.driver_progress``): rank 0 puts its progress
    lines (``(PROGRESS_LINE, text)``) and each epoch's metrics (``(PROGRESS_SCALARS, epoch, metrics)``) there, so
    the driver writes the progress log and TensorBoard files on its own disk, wherever rank 0 runs.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "experiment": to_dict(spec),
            "learner_config": learner_config,
            "baseline_checkpoint": baseline_checkpoint,
            "train_config": to_dict(train_config),
            "validation_subset": validation_subset,
            "cpus_per_worker": cpus_per_worker,
            "progress": progress,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=spec.resources.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    return trainer.fit()


def _train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    spec = from_dict(ExperimentConfig, loop_config["experiment"])
    learner_config = from_dict(learner_config_class(spec.learner.name), loop_config["learner_config"])
    train_config = from_dict(TrainConfig, loop_config["train_config"])
    torch.set_num_threads(loop_config["cpus_per_worker"])
    context = ray.train.get_context()
    distributed = context.get_world_size() > 1
    data = load_data(spec.dataset, seed=spec.seed)

    # The learner's prepare runs again on a restart too: it rebuilds what the model's state dict does not hold
    # (pruned shapes, mask and quantizer modules) before the checkpointed training state is loaded into it.
    baseline = load_baseline(loop_config["baseline_checkpoint"], data.input_shape, data.num_classes,
                             user_model=spec.model.name)
    candidate = compress(spec, baseline, data, learner_config)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group: continue after the last finished epoch
        with checkpoint.as_directory() as directory:
            start_epoch = load_training_state(candidate, directory)

    send = _sender(loop_config.get("progress")) if context.get_world_rank() == 0 else None

    def report(metrics: dict[str, Any]) -> None:
        # Every rank must call report; only rank 0 writes the (identical) model.
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if send is not None:
                send((PROGRESS_SCALARS, metrics[EPOCH], {key: value for key, value in metrics.items()
                                                         if isinstance(value, (int, float)) and key != EPOCH}))
            if context.get_world_rank() == 0:
                # MODEL_FILE: the deployable model (the learner's finalize on a copy; what the retrain returns);
                # TRAINING_STATE_FILE: the model as it trains (masks, quantizer ranges), to resume from.
                torch.save({"model": candidate.model.state_dict(), EPOCH: metrics[EPOCH]},
                           os.path.join(directory, TRAINING_STATE_FILE))
                save_checkpoint(
                    os.path.join(directory, MODEL_FILE), candidate.learner.finalize(copy.deepcopy(candidate.model)),
                    model_config=spec.model,
                    input_shape=data.input_shape, num_classes=data.num_classes, metrics=metrics,
                    extra={EPOCH: metrics[EPOCH], "learner": spec.learner.name,
                           "learner_config": to_dict(learner_config),
                           "static_metrics": candidate.static_metrics},
                )
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)

    log = None if send is None else (lambda line: send((PROGRESS_LINE, line)))
    if log is not None and start_epoch:
        log(f"  resuming from the checkpoint of epoch {start_epoch}/{train_config.epochs}")
    fine_tune(candidate, data, train_config, validation_subset=loop_config["validation_subset"],
              report=report, reward=spec.search.reward, seed=spec.seed, wrap=ray.train.torch.prepare_model,
              distributed=distributed, device=ray.train.torch.get_device(), start_epoch=start_epoch, log=log)


PROGRESS_LINE = "line"  # (PROGRESS_LINE, text): a progress line for the driver's log
PROGRESS_SCALARS = "scalars"  # (PROGRESS_SCALARS, epoch, {name: value}): an epoch's metrics for TensorBoard


def _sender(queue: Any):
    """Rank 0's way to the driver's progress queue; None without one. Progress is best effort: a queue that is
    gone (its driver died, and this worker group is about to be stopped too) never fails the training."""
    if queue is None:
        return None
    warned = []

    def send(item: tuple[Any, ...]) -> None:
        try:
            queue.put(item, timeout=10)
        except Exception as error:  # noqa: BLE001 - any Ray or queue error: drop the item, say so once
            if not warned:
                warned.append(True)
                print(f"pf-ray: progress for the driver dropped ({type(error).__name__}: {error})", flush=True)

    return send

