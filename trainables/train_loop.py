"""Ray Train (DDP) for one candidate: what multi-worker trials and the final retrain run.

``ray_train_fit`` runs a ``TorchTrainer`` for a ``TrainJob``: every worker loads the baseline, applies the
learner (the spec's learner config, per-layer values filled in), and fine-tunes with ``candidate.fine_tune``
(gloo on CPU, nccl on GPU; ``fit`` all-reduces the metrics, so rank 0 speaks for all). Rank 0 saves a checkpoint
every epoch; a restarted worker group continues after the last one.

A diverged loss (NaN or inf: ``fit``'s FloatingPointError) is deterministic: retrying it would diverge again. The
ranks detect it together (``fit`` all-reduces a finite flag every step), rank 0 writes ``DIVERGED_FILE`` into the
run's folder and every worker returns normally, so Ray Train does not restart the group; ``ray_train_fit`` then
raises the FloatingPointError in the caller (the trial fails once, with that reason). Ray Train's ``max_failures``
retries are left for what a retry can fix: a lost node, a crashed worker.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pf_ray.candidate import Candidate, fine_tune, make_candidate
from pf_ray.checkpoint import load_checkpoint, save_checkpoint
from pf_ray.config import TrainConfig
from pf_ray.data import load_data
from pf_ray.devices import training_device
from pf_ray.metrics import EPOCH
from pf_ray.spec import RunSpec
from pf_ray.strict import to_dict
from trainables.progress_relay import PROGRESS_LINE, PROGRESS_SCALARS, sender

if TYPE_CHECKING:
    import pyarrow.fs
    import ray.train
    from ray.util.queue import Queue

DIVERGED_FILE = "diverged.txt"  # in the run's folder: why training diverged (written by rank 0)
MODEL_FILE = "model.pt"  # inside each Ray Train checkpoint directory: the finalized model (a pf-ray checkpoint)
TRAINING_STATE_FILE = "training_state.pt"  # beside it: the state dict of the model being trained, and its epoch


@dataclass(frozen=True)
class TrainJob:
    """One Ray Train run of one candidate: what to train, how, on how many workers, and where its run goes.

    ``storage_path``: a local folder or a URI (s3://...), or a path on ``storage_filesystem`` when that is given.
    The run ``(storage_path, name)`` resumes from its last checkpoint if it has one, and a worker group that died
    (a lost node) is restarted from it up to ``max_failures`` times.
    """

    spec: RunSpec  # the experiment, and the candidate's learner config (its per-layer values filled in)
    train: TrainConfig  # the schedule: the search's fine_tune, or the retrain's
    validation_subset: int | None  # validation examples each epoch is scored on (None: all)
    num_workers: int
    cpus_per_worker: int
    name: str
    storage_path: str
    storage_filesystem: pyarrow.fs.FileSystem | None = None
    max_failures: int = 2
    measure: bool = True  # also the proxy accuracy (and latency) a search trial reports; the retrain needs neither


def ray_train_fit(job: TrainJob, baseline_checkpoint: str | bytes, *,
                  callbacks: Sequence[ray.train.UserCallback] = (), progress: Queue | None = None
                  ) -> ray.train.Result:
    """Run ``job`` with a ``TorchTrainer``; returns its ``ray.train.Result``.

    Args:
        baseline_checkpoint: the checkpoint file's bytes (sent to the workers through Ray's object store) or a
            path every worker can read.
        callbacks: Ray Train callbacks of the driver (a trial's ``TuneReportCallback``).
        progress: a queue the driver drains (``trainables.progress_relay.driver_progress``): rank 0 sends its
            progress lines and each epoch's metrics there, so the driver writes them on its own disk.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"job": job, "baseline_checkpoint": baseline_checkpoint, "progress": progress},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.spec.experiment.resources.use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=job.storage_path,
            storage_filesystem=job.storage_filesystem,
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    reason = _read_diverged(result.filesystem, result.path)
    if reason is not None:
        raise FloatingPointError(reason)
    return result


def _read_diverged(filesystem: pyarrow.fs.FileSystem | None, run_path: str) -> str | None:
    """The reason rank 0 wrote to ``DIVERGED_FILE`` in the run's folder, or None."""
    import pyarrow.fs

    filesystem = filesystem or pyarrow.fs.LocalFileSystem()
    path = f"{run_path}/{DIVERGED_FILE}"
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def _write_diverged(reason: str) -> None:
    """Rank 0: record why training diverged in the run's folder, for ``ray_train_fit`` to raise."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    with storage.storage_filesystem.open_output_stream(f"{storage.experiment_fs_path}/{DIVERGED_FILE}") as stream:
        stream.write(reason.encode())


def load_baseline(checkpoint: str | bytes, input_shape: tuple[int, int, int], num_classes: int, *,
                  user_model: str) -> nn.Module:
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


def load_training_state(candidate: Candidate, directory: str | Path) -> int:
    """Load a Ray Train checkpoint's training state into a freshly prepared candidate; returns its epoch."""
    state = torch.load(Path(directory) / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    candidate.model.load_state_dict(state["model"])
    return int(state[EPOCH])


def _train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    job: TrainJob = loop_config["job"]
    experiment = job.spec.experiment
    torch.set_num_threads(job.cpus_per_worker)
    context = ray.train.get_context()
    distributed = context.get_world_size() > 1
    device = training_device(experiment.resources, assigned=ray.train.torch.get_device())
    data = load_data(experiment.dataset, seed=experiment.seed)

    # The learner's prepare runs again on a restart too: it rebuilds what the model's state dict does not hold
    # (pruned shapes, mask and quantizer modules) before the checkpointed training state is loaded into it.
    baseline = load_baseline(loop_config["baseline_checkpoint"], data.input_shape, data.num_classes,
                             user_model=experiment.model.name)
    candidate = make_candidate(job.spec, baseline, data, measure=job.measure, device=device,
                               distributed=distributed)  # every rank the same structure, or all raise
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group: continue after the last finished epoch
        with checkpoint.as_directory() as directory:
            start_epoch = load_training_state(candidate, directory)

    send = sender(loop_config.get("progress")) if context.get_world_rank() == 0 else None

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
                    model_config=experiment.model,
                    input_shape=data.input_shape, num_classes=data.num_classes, metrics=metrics,
                    extra={EPOCH: metrics[EPOCH], "learner": job.spec.learner_name,
                           "learner_config": to_dict(job.spec.learner_config),
                           "static_metrics": candidate.static_metrics},
                )
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)

    log = None if send is None else (lambda line: send((PROGRESS_LINE, line)))
    if log is not None and start_epoch:
        log(f"  resuming from the checkpoint of epoch {start_epoch}/{job.train.epochs}")
    try:
        fine_tune(candidate, data, job.train, validation_subset=job.validation_subset,
                  report=report, wrap=ray.train.torch.prepare_model, distributed=distributed,
                  device=device, start_epoch=start_epoch, log=log)
    except FloatingPointError as error:  # every rank gets here together (fit's collective finite check)
        if context.get_world_rank() == 0:
            _write_diverged(str(error))
        return  # a normal end: Ray Train must not restart a deterministic failure
