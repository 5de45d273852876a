"""The composition root: baseline -> search (Ray Tune) -> retrain (Ray Train) -> export -> verify -> results.

This is the only module of ``pf_ray`` that wires Ray, the trainables and the search algorithms together, and
it imports them lazily, so ``import pf_ray`` works without Ray.

Run folder (``<storage.path>/<storage.name>``; with a remote ``storage.path`` (s3://, gs://) Ray writes search/ and
retrain/ there directly, and the driver writes the rest in ``<storage.staging_path>/<storage.name>`` and uploads
it to ``<storage.path>/<storage.name>`` after writing config.yaml and when the run ends)::

    config.yaml            the resolved experiment (every default filled in)
    search/                the Ray Tune experiment (one folder per trial)
    retrain/               the Ray Train run of the best candidate (checkpoints per epoch, progress.log,
                           tensorboard/ with each epoch's metrics); search/<trial>/ has Tune's TensorBoard files
    artifacts/             compressed.pt; baseline and compressed as .onnx, .int8.onnx, .ort, .int8.ort;
                           manifest.json (sizes, SHA-256, inputs, preprocessing, verified figures)
    results.json           machine-readable summary: baseline, every trial, the choice, the artifacts
    report.md, report.html the readable report (plots under report_files/, embedded in the HTML);
                           `pf-ray report RUN_DIR` rebuilds them, also for an interrupted run
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from pf_ray.atomic_fs import atomic_local_filesystem
from pf_ray.candidate import (
    LAYER_VALUES,
    MACS_RATIO,
    PROXY_ACCURACY,
    SCORE,
    MacsBudget,
    PerLayerSpace,
    best_trial,
    per_layer_space,
    project,
)
from pf_ray.checkpoint import load_checkpoint, save_checkpoint
from pf_ray.config import ExperimentConfig, Scoring, StorageConfig, is_remote, to_dict
from pf_ray.data import DataBundle, load_data
from pf_ray.errors import AccuracyGuardError, ConfigError, SearchError
from pf_ray.learners import build_learner
from pf_ray.metrics import model_stats
from pf_ray.models import absolute_model_name, build_model
from pf_ray.search_state import DamagedSearchState, describe, reconcile
from pf_ray.train import ACCURACY, EPOCH, evaluate, fit

Log = Callable[[str], None]

# A trial that runs a TorchTrainer only waits for its workers: it reserves a sliver of a CPU, so that the
# workers' own CPUs (which Tune does not reserve for it) are what limits concurrency.
TRAIN_DRIVER_CPUS = 0.25
SEARCH_DIR = "search"  # the Tune experiment's folder in the run folder
# What a trial driver takes of ``resources.driver_resource``: the clusters/ YAMLs give the head 1000 units, so
# the custom resource places drivers without limiting how many run (the CPUs do that).
DRIVER_RESOURCE_SHARE = 0.001


@dataclass(frozen=True)
class Prepared:
    """Everything checked before the run folder is created (so bad input leaves nothing on disk)."""

    config: ExperimentConfig
    data: DataBundle
    baseline_path: Path | None  # None: the baseline must be trained first
    run_dir: Path  # the local run folder
    run_storage: str  # where Ray writes search/ and retrain/: run_dir itself, or a URI (run_location)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------------
# Where a run's files go.


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` for a URI, keeping its query (``s3://bucket/runs?region=eu-west-1``) at the end."""
    root, question, query = base.partition("?")
    return "/".join([root.rstrip("/"), *parts]) + question + query


def local_root(storage: StorageConfig) -> Path:
    """The driver's folder for run folders and the baseline cache: storage.path, or staging_path if remote."""
    return Path(storage.staging_path if is_remote(storage.path) else storage.path)


def run_location(storage: StorageConfig, name: str) -> tuple[Path, str]:
    """The run's local folder, and where Ray writes its search/ and retrain/ (the same folder, or a URI)."""
    folder = local_root(storage) / name
    return folder, join_uri(storage.path, name) if is_remote(storage.path) else str(folder)


def upload(run_dir: Path, run_storage: str) -> None:
    """Copy the local run folder into the remote one (Ray's search/ and retrain/ there are kept)."""
    if is_remote(run_storage):
        import pyarrow.fs

        filesystem, path = pyarrow.fs.FileSystem.from_uri(run_storage)
        filesystem.create_dir(path, recursive=True)  # a no-op on object stores; file:// needs the folder
        pyarrow.fs.copy_files(str(run_dir), path, destination_filesystem=filesystem)


def _filesystem(location: str):
    """pyarrow's filesystem and path for a URI or a local path."""
    import pyarrow.fs

    if is_remote(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def _exists(location: str) -> bool:
    import pyarrow.fs

    filesystem, path = _filesystem(location)
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def ray_storage(location: str) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for a Ray ``RunConfig`` writing to ``location``: a URI goes as it is
    (object stores replace files atomically); a local folder goes through pf-ray's atomic filesystem, so a
    driver killed while Ray copies its state leaves no half-written file behind (see ``pf_ray.atomic_fs``)."""
    if is_remote(location):
        return location, None
    return str(Path(location).resolve()), atomic_local_filesystem()


def _set_aside(location: str) -> str:
    """Rename a folder to ``<name>.damaged-<time>`` (kept for inspection); returns the new location."""
    filesystem, path = _filesystem(location)
    target = f"{path.rstrip('/')}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    filesystem.move(path, target)
    return target


# --------------------------------------------------------------------------------------------------------------
# Baseline.


def baseline_cache_path(config: ExperimentConfig) -> Path:
    """Where ``pf-ray train`` caches the baseline: keyed by everything that changes the trained weights."""
    key = json.dumps([to_dict(config.model), to_dict(config.dataset), to_dict(config.baseline.train),
                      config.seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return local_root(config.storage) / "baselines" / f"{config.model.name.replace('/', '_').replace(':', '_')}-" \
                                                      f"{config.dataset.name}-{digest}.pt"


def remote_baseline(config: ExperimentConfig) -> str | None:
    """With a remote storage.path, the baseline cache is also kept there (``<storage.path>/baselines/<file>``), so a
    run resumed or started from another machine finds it; None for a local storage path or a given checkpoint."""
    if config.baseline.checkpoint or not is_remote(config.storage.path):
        return None
    return join_uri(config.storage.path, "baselines", baseline_cache_path(config).name)


def cached_baseline(config: ExperimentConfig, *, log: Log = print) -> Path | None:
    """The cached baseline on this machine, fetched from the remote storage first if only that has it."""
    local = baseline_cache_path(config)
    remote = remote_baseline(config)
    if not local.exists() and remote is not None and _exists(remote):
        _copy_file(remote, str(local))
        log(f"baseline: fetched {remote}")
    return local if local.exists() else None


def _copy_file(source: str, target: str) -> None:
    """Copy one file between a URI and a local path, either way; a local target is written whole (a temporary
    file renamed), an object store replaces its objects atomically itself."""
    import pyarrow.fs

    source_filesystem, source_path = _filesystem(source)
    target_filesystem, target_path = _filesystem(target)
    target_filesystem.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
    local = isinstance(target_filesystem, pyarrow.fs.LocalFileSystem)
    written = target_path + ".partial" if local else target_path
    pyarrow.fs.copy_files(source_path, written, source_filesystem=source_filesystem,
                          destination_filesystem=target_filesystem)
    if local:
        os.replace(written, target_path)


def train_baseline(config: ExperimentConfig, data: DataBundle, *, log: Log = print, force: bool = False) -> Path:
    """Train the full-precision baseline in this process (all cores) and cache it; reuse the cache if present.

    With a remote storage.path the cache is uploaded there too (``remote_baseline``)."""
    path = Path(config.baseline.checkpoint) if config.baseline.checkpoint else baseline_cache_path(config)
    if not config.baseline.checkpoint and not force:
        path = cached_baseline(config, log=log) or path
    if path.exists() and not force:
        log(f"baseline: using {path}")
        return path
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.resources.num_cpus or _cpu_count())
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    train = config.baseline.train
    size = min(len(data.train), train.train_subset or len(data.train))
    log(f"baseline: training {config.model.name} on {config.dataset.name} for {train.epochs} epoch(s), "
        f"{size} images")
    fit(model, data.train, train, validation_set=data.validation, seed=config.seed, log=log)
    metrics = evaluate(model, data.validation)
    save_checkpoint(path, model, model_config=config.model, input_shape=data.input_shape,
                    num_classes=data.num_classes, metrics={"validation_" + k: v for k, v in metrics.items()},
                    extra={"config": to_dict(config)})
    log(f"baseline: validation accuracy {metrics[ACCURACY]:.4f}; saved {path}")
    remote = remote_baseline(config)
    if remote is not None:
        _copy_file(str(path), remote)
        log(f"baseline: uploaded to {remote}")
    return path


# --------------------------------------------------------------------------------------------------------------
# Checks before anything is written.


def _absolute(path: str | None) -> str | None:
    if path is None or is_remote(path):  # None, or a URI (s3://, gs://) that is not ours to resolve
        return path
    return str(Path(path).expanduser().resolve())


def with_absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Trials and Train workers run in their own working directories: resolve every relative path first."""
    return replace(
        config,
        model=replace(config.model, name=absolute_model_name(config.model.name)),
        dataset=replace(config.dataset, data_dir=_absolute(config.dataset.data_dir)),
        baseline=replace(config.baseline, checkpoint=_absolute(config.baseline.checkpoint)),
        storage=replace(config.storage, path=_absolute(config.storage.path),
                        staging_path=_absolute(config.storage.staging_path)),
        learner=replace(config.learner, options={
            key: _absolute(value) if key == "ratios_file" else value
            for key, value in config.learner.options.items()}),
    )


def prepare(config: ExperimentConfig, *, log: Log = print) -> Prepared:
    """Validate every input that can be checked up front: learner options, data, model, checkpoint, budget."""
    config = with_absolute_paths(config)
    config.learner_config()
    data = load_data(config.dataset, seed=config.seed)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    baseline_path: Path | None = None
    if config.baseline.checkpoint:
        baseline_path = Path(config.baseline.checkpoint)
        model, info = load_checkpoint(baseline_path, expect_input_shape=data.input_shape,
                                      expect_num_classes=data.num_classes, user_model=config.model.name)
        if info.model != config.model:
            raise ConfigError(f"baseline.checkpoint: {str(baseline_path)!r} holds model {info.model.name!r}; "
                              f"model.name is {config.model.name!r}")
    else:
        baseline_path = cached_baseline(config, log=log)
    # What the learner's prepare() would refuse inside every trial (ratios for another model, more stages than
    # prunable groups, nothing prunable), refused now.
    build_learner(config.learner.name, config.learner_config()).check(model, data.input_shape)
    space = per_layer_space(config, model, data.input_shape)
    if space is not None:
        project(config, model, data.input_shape, [space.low] * len(space.names))  # raises if out of reach
    available = config.resources.num_cpus or (_cpu_count() if config.resources.ray_address is None else None)
    if available is not None:  # a local Ray: its size is known now (a remote cluster's is checked at search)
        max_concurrent_trials(config, available)
    name = config.storage.name or f"{config.model.name.replace('/', '_').replace(':', '_')}-" \
                                  f"{config.learner.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, run_storage = run_location(config.storage, name)
    taken = [str(run_dir)] if run_dir.exists() else []
    if is_remote(run_storage) and _exists(run_storage):
        taken.append(run_storage)
    if taken:
        raise ConfigError(f"storage.name: run folder {taken[0]!r} already exists; choose another name")
    return Prepared(config, data, baseline_path, run_dir, run_storage)


# --------------------------------------------------------------------------------------------------------------
# Ray.


def start_ray(config: ExperimentConfig, *, log: Log = print) -> bool:
    """Connect to the configured cluster, or start a local Ray on 127.0.0.1. Returns True if we started it."""
    # Keep every address of a local Ray on loopback (by default Ray advertises the machine's interface).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return False
    if config.resources.ray_address:
        ray.init(address=config.resources.ray_address, logging_level="WARNING", log_to_driver=False)
    else:
        # address "local": a Ray of our own, even where RAY_ADDRESS or another cluster's address file points
        # elsewhere (without it, ray.init joins an existing cluster on this machine).
        ray.init(address="local", num_cpus=config.resources.num_cpus or _cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    resources = ray.cluster_resources()
    log(f"ray: {int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs")
    return True


def trial_cost(config: ExperimentConfig) -> tuple[dict[str, float], float]:
    """The resources a trial reserves through Tune, and the CPUs it really occupies (its Train workers too)."""
    resources = config.resources
    if resources.workers_per_trial == 1:
        reserve = {"cpu": float(resources.cpus_per_trial), "gpu": 1.0 if resources.use_gpu else 0.0}
        cost = float(resources.cpus_per_trial)
    else:
        reserve = {"cpu": TRAIN_DRIVER_CPUS}
        cost = TRAIN_DRIVER_CPUS + resources.workers_per_trial * resources.cpus_per_worker
    if resources.driver_resource:  # pin trial drivers to the nodes offering it (the clusters/ YAMLs' head)
        reserve[resources.driver_resource] = DRIVER_RESOURCE_SHARE  # a custom resource: a flat key
    return reserve, cost


def max_concurrent_trials(config: ExperimentConfig, cluster_cpus: float) -> int:
    """How many trials fit at once, so nested Train workers never wait for CPUs held by other trials."""
    _, cost = trial_cost(config)
    if config.resources.workers_per_trial == 1 and cost > cluster_cpus:
        raise ConfigError(f"resources.cpus_per_trial: got {config.resources.cpus_per_trial}; the cluster has "
                          f"{cluster_cpus:g} CPUs")
    if cost > cluster_cpus:
        raise ConfigError(f"resources.workers_per_trial: one trial needs {cost:g} CPUs (driver "
                          f"{TRAIN_DRIVER_CPUS:g} + {config.resources.workers_per_trial} workers x "
                          f"{config.resources.cpus_per_worker} CPU); the cluster has {cluster_cpus:g}")
    return max(1, int(cluster_cpus // cost))


def _trial_log(log: Log, max_epochs: int):
    """A Tune callback that prints one short line per trial event (instead of Tune's wide tables)."""
    from ray import tune

    class TrialLog(tune.Callback):
        def __init__(self, log_function: Log) -> None:  # an argument, not a closure: the class is pickled
            self.log = log_function

        def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks; a log function need not travel
            return {}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.log = print

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.log(f"  trial {trial.trial_id}: epoch {result.get(EPOCH)}/{max_epochs}, validation accuracy "
                     f"{result.get(ACCURACY, float('nan')):.4f} (before fine-tuning "
                     f"{result.get(PROXY_ACCURACY, float('nan')):.4f}), "
                     f"{result.get(MACS_RATIO, float('nan')):.3f} of the MACs")

        def on_trial_complete(self, iteration, trials, trial, **info):
            epochs = (trial.last_result or {}).get(EPOCH, 0)
            if epochs < max_epochs:
                self.log(f"  trial {trial.trial_id}: stopped by ASHA after epoch {epochs}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.log(f"  trial {trial.trial_id}: failed (details in {trial.local_path}/error.txt)")

    return TrialLog(log)


def run_search(config: ExperimentConfig, space: PerLayerSpace, baseline_path: Path, run_storage: str | Path, *,
               log: Log = print, resume: bool = False) -> list[dict[str, Any]]:
    """Ray Tune search with ASHA; returns one record per trial (values, last metrics, status, error).

    ``run_storage``: the run folder, or its URI for a remote storage.path; the experiment goes to its search/.
    ``resume``: continue the search saved in ``run_storage/search`` (``pf-ray resume``): finished trials are kept,
    unfinished ones continue from their last checkpoint (or start again), and the searcher's state (DDPG agent
    and replay buffer, GP observations, TPE history) is restored from Tune's experiment checkpoint.
    """
    import ray
    from ray import tune

    from pf_ray.orphans import orphan_reaper
    from search_algs import make_searcher
    from search_algs.concurrency import ClusterConcurrency
    from search_algs.schedulers import make_asha
    from trainables import get_trainable

    search = config.search
    max_epochs = search_epochs(config)
    searcher, param_space = make_searcher(search.algorithm, space, metric=SCORE, mode="max",
                                          seed=search.seed, num_trials=search.num_trials, max_epochs=max_epochs)
    concurrency = max_concurrent_trials(config, ray.cluster_resources().get("CPU", 1.0))
    reserve, cost = trial_cost(config)
    # Re-derived from the cluster's CPUs before each new trial: nodes that join (autoscaling) raise it.
    searcher = ClusterConcurrency(searcher, cpus_per_trial=cost)
    # The checkpoint's bytes travel through Ray's object store: trials on other nodes cannot read our disk.
    trainable = tune.with_resources(
        tune.with_parameters(get_trainable(config.learner.name), experiment=to_dict(config),
                             baseline_checkpoint=Path(baseline_path).read_bytes()),
        reserve,
    )
    log(f"search: {search.algorithm.value}, {search.num_trials} trials over {len(space.names)} layer groups, "
        f"{concurrency} at a time (more as nodes join), scored by {search.reward.value} "
        + ("right after compression (proxy)" if search.scoring is Scoring.PROXY
           else f"after each of {max_epochs} fine-tuning epoch(s), ASHA stopping the weak"))
    # Tune saves the experiment state (trials, searcher, scheduler) at most this often; "0" = after every event,
    # so a driver killed at any moment loses no finished trial (the state is small; this costs milliseconds).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    run_storage = str(run_storage)
    storage_path, filesystem = ray_storage(run_storage)
    search_dir = join_uri(storage_path, SEARCH_DIR) if is_remote(storage_path) else f"{storage_path}/{SEARCH_DIR}"
    state_filesystem, state_path = (filesystem, search_dir) if filesystem else _filesystem(search_dir)
    if resume and tune.Tuner.can_restore(search_dir, storage_filesystem=filesystem):
        try:
            state = reconcile(state_filesystem, state_path)
        except DamagedSearchState as error:
            kept = _set_aside(search_dir)
            log(f"search: cannot resume it: {error}; the search starts again (the damaged folder is kept as {kept})")
        else:
            log(f"search: resuming {search_dir} ({describe(state)})"
                + (f"; reconciled the saved state: {'; '.join(state.changed)}" if state.changed else ""))
            tuner = tune.Tuner.restore(search_dir, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False, storage_filesystem=filesystem)
            return _trial_records(tuner.fit(), space)
    if _exists(search_dir):  # stopped before Tune saved any experiment state: nothing in it can be resumed
        log(f"search: {search_dir} holds no saved search state; starting the search again")
        state_filesystem.delete_dir(state_path)
    # Only Ray Train trials leave placement groups behind (pf_ray.orphans): no GCS reads for in-process trials.
    reaper = [orphan_reaper()] if config.resources.workers_per_trial > 1 else []
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_asha(max_epochs=max_epochs, grace_period=search.grace_period,
                                reduction_factor=search.reduction_factor),
            metric=SCORE,
            mode="max",
            num_samples=search.num_trials,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(name=SEARCH_DIR, storage_path=storage_path, storage_filesystem=filesystem,
                                  verbose=1, callbacks=[_trial_log(log, max_epochs), *reaper],
                                  failure_config=tune.FailureConfig(max_failures=search.max_failures)),
    )
    return _trial_records(tuner.fit(), space)


def _trial_records(grid: Any, space: PerLayerSpace) -> list[dict[str, Any]]:
    """One plain record per trial of a finished Tune run (its ``ResultGrid``), for results.json."""
    trials = []
    for result in grid:
        metrics = dict(result.metrics or {})
        values = [float(result.config[key]) for key in space.keys()] if result.config else []
        trials.append({
            "trial_id": metrics.get("trial_id", Path(result.path).name),
            "proposal": values,
            "layer_values": metrics.get("layer_values"),
            SCORE: metrics.get(SCORE),
            ACCURACY: metrics.get(ACCURACY),
            PROXY_ACCURACY: metrics.get(PROXY_ACCURACY),
            EPOCH: metrics.get(EPOCH, 0),
            MACS_RATIO: metrics.get(MACS_RATIO),
            "macs": metrics.get("macs"),
            "latency_ms": metrics.get("latency_ms"),  # these two with search.reward latency only
            "latency_ratio": metrics.get("latency_ratio"),
            "params": metrics.get("params"),
            "error": None if result.error is None else error_text(result.error),
            "timestamp": metrics.get("timestamp"),  # when its last result came (orders the report's progress plot)
        })
    return trials


def error_text(error: BaseException) -> str:
    """A trial's failure as one readable line: the exception raised in the trial (not Ray's wrapper with the
    worker's traceback), e.g. "FloatingPointError: training diverged: loss is nan at epoch 1, step 1"."""
    while getattr(error, "cause", None) is not None:  # RayTaskError / TuneError wrap the trial's own exception
        error = error.cause
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def search_epochs(config: ExperimentConfig) -> int:
    """How many results a full trial reports: one per fine-tuning epoch, or one for proxy scoring."""
    return 1 if config.search.scoring is Scoring.PROXY else config.search.fine_tune.epochs


def choose_best(trials: list[dict[str, Any]], max_epochs: int) -> dict[str, Any]:
    """The best-scoring trial among those that finished every epoch (``best_trial``); SearchError if none scored."""
    best = best_trial(trials, max_epochs)
    if best is None:
        errors = [t["error"] for t in trials if t["error"]]
        raise SearchError(f"every trial failed; first error: {errors[0] if errors else 'no metrics reported'}")
    return best


@contextlib.contextmanager
def driver_progress(folder: Path, log: Log, interval: float = 0.5):
    """A queue for a Ray Train run's rank 0 to send its progress to this process (see ``ray_train_fit``).

    While the block runs, a thread here drains it: progress lines go to ``log`` and to ``folder/progress.log``,
    each epoch's metrics to TensorBoard files in ``folder/tensorboard`` (as ``retrain/<metric>``). Both are
    written by the driver on its own disk, wherever on the cluster rank 0 trains. The queue's actor lives on this
    node and takes no CPU.
    """
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tensorboardX import SummaryWriter  # Ray Tune's own TensorBoard writer, installed with ray[tune]

    from trainables._common import PROGRESS_LINE, PROGRESS_SCALARS

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    folder.mkdir(parents=True, exist_ok=True)
    board = SummaryWriter(str(folder / "tensorboard"))
    done = threading.Event()

    def write(items: list[Any]) -> None:
        with open(folder / "progress.log", "a") as progress:
            for kind, *rest in items:
                if kind == PROGRESS_LINE:
                    progress.write(rest[0] + "\n")
                    log(rest[0])
                elif kind == PROGRESS_SCALARS:
                    epoch, metrics = rest
                    for key, value in metrics.items():
                        board.add_scalar(f"retrain/{key}", value, global_step=epoch)
        board.flush()

    def drain() -> None:
        while True:
            finished = done.is_set()
            try:
                size = queue.qsize()
                items = queue.get_nowait_batch(size) if size else []
            except Exception:  # noqa: BLE001 - the queue's actor is gone (Ray shutting down): nothing more comes
                return
            if items:
                write(items)
            if finished:
                return
            done.wait(interval)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join()
        board.close()
        with contextlib.suppress(Exception):
            queue.shutdown(force=True)  # drained above; a graceful stop would wait 5 s


def retrain(config: ExperimentConfig, learner_config: Any, baseline_path: Path, run_dir: Path, *,
            log: Log = print, run_storage: str | None = None) -> torch.nn.Module:
    """Compress the baseline with the chosen settings and fine-tune it with the full budget on Ray Train.

    The Train run goes to ``<run_storage>/retrain`` (default: the run folder); its progress log and TensorBoard
    files to ``run_dir/retrain`` on this machine (sent by rank 0 through ``driver_progress``).
    """
    from trainables._common import MODEL_FILE, ray_train_fit

    log(f"retrain: {config.retrain.train.epochs} epoch(s) on {config.retrain.num_workers} Ray Train worker(s)")
    import ray

    from pf_ray.orphans import settle

    # The retrain runs alone: its workers share the cluster's CPUs, each within one node. Stopped Ray Train
    # trials may have left placement groups holding CPUs (pf_ray.orphans): gone first, or the retrain waits.
    if not settle():
        log("retrain: placement groups of the search are still held; the retrain may wait for their CPUs")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    largest_node = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=1)
    storage_path, filesystem = ray_storage(run_storage or str(run_dir))
    with driver_progress(run_dir / "retrain", log) as progress:
        result = ray_train_fit(
            config,
            learner_config=to_dict(learner_config),
            baseline_checkpoint=Path(baseline_path).read_bytes(),  # through the object store, as for trials
            train_config=config.retrain.train,
            validation_subset=None,
            num_workers=config.retrain.num_workers,
            cpus_per_worker=max(1, min(int(largest_node), cpus // config.retrain.num_workers)),
            name="retrain",
            storage_path=storage_path,
            storage_filesystem=filesystem,
            progress=progress,
        )
    if result.error is not None:
        raise SearchError(f"retraining failed: {result.error}")
    log(f"retrain: validation accuracy {result.metrics.get(ACCURACY, float('nan')):.4f} after "
        f"{result.metrics.get(EPOCH)} epoch(s)")
    with result.checkpoint.as_directory() as directory:
        # the finalized model; a learner with its own finalized layers rebuilds them (Learner.rebuild_finalized)
        model, _ = load_checkpoint(Path(directory) / MODEL_FILE, user_model=config.model.name)
        return model


# --------------------------------------------------------------------------------------------------------------
# The whole pipeline.


def compress(config: ExperimentConfig, *, log: Log = print, command: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the results dict (also written to ``results.json``)."""
    from pf_ray.report import COMMAND_FILE

    started = time.time()
    prepared = prepare(config, log=log)
    config, run_dir, run_storage = prepared.config, prepared.run_dir, prepared.run_storage
    with _ray_for(config, log=log):
        check_storage(config)
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        if command:
            (run_dir / COMMAND_FILE).write_text(command + "\n")
        upload(run_dir, run_storage)
        log(f"run folder: {run_dir}" + (f" (uploaded to {run_storage})" if run_storage != str(run_dir) else ""))
        return _pipeline(config, prepared.data, prepared.baseline_path, run_dir, run_storage, log=log,
                         command=command, started=started, resume=False)


def resume(run_dir: str | Path, *, log: Log = print, staging_path: str | None = None) -> dict[str, Any]:
    """Continue an interrupted run (``pf-ray resume RUN_DIR``) from where it stopped.

    The baseline is reused from its cache, the search continues from Tune's last experiment checkpoint (finished
    trials kept, the searcher's state restored), the retrain from its last epoch checkpoint; export, verification
    and the report run again. The run folder is trusted input: Tune unpickles its saved state.

    ``run_dir`` is the local run folder; with a remote storage.path (in its config.yaml) the search and retrain
    are found at ``<storage.path>/<folder name>``. It may also be that remote folder's URI (resuming on another
    machine than the one that started the run): its driver files are fetched into ``<staging>/<name>`` first,
    ``staging`` being ``staging_path`` if given, else the run's storage.staging_path.
    """
    started = time.time()
    if is_remote(str(run_dir)):
        run_dir = fetch_run(str(run_dir), staging_path, log=log)
    elif staging_path is not None:
        raise ConfigError(f"--staging: got {staging_path!r} with the local run folder {str(run_dir)!r}; it is "
                          f"only for a run given by its storage URI (s3://..., gs://...)")
    run_dir = Path(run_dir).expanduser().resolve()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"run_dir: {str(run_dir)!r} is not a pf-ray run folder (it has no config.yaml)")
    if (run_dir / "results.json").is_file():
        log(f"resume: {run_dir} already finished (results.json); nothing to do "
            f"(`pf-ray report {run_dir}` rebuilds its report)")
        return json.loads((run_dir / "results.json").read_text())
    from pf_ray.config import load_experiment
    from pf_ray.report import COMMAND_FILE

    config = load_experiment(config_file)
    run_storage = join_uri(config.storage.path, run_dir.name) if is_remote(config.storage.path) else str(run_dir)
    data = load_data(config.dataset, seed=config.seed)
    baseline_path: Path | None = None
    if config.baseline.checkpoint:
        baseline_path = Path(config.baseline.checkpoint)
        if not baseline_path.is_file():
            raise ConfigError(f"baseline.checkpoint: {str(baseline_path)!r} (in {config_file}) no longer exists")
    else:
        baseline_path = cached_baseline(config, log=log)
    command_file = run_dir / COMMAND_FILE
    command = command_file.read_text().strip() if command_file.is_file() else None
    with _ray_for(config, log=log):
        check_storage(config)
        log(f"resume: {run_dir}" + (f" (search and retrain in {run_storage})" if run_storage != str(run_dir)
                                    else ""))
        return _pipeline(config, data, baseline_path, run_dir, run_storage, log=log, command=command,
                         started=started, resume=True)


def fetch_run(uri: str, staging_path: str | None, *, log: Log = print) -> Path:
    """The local run folder for a run in remote storage, its driver files fetched from ``uri`` if not here yet.

    The driver's files (config.yaml, command.txt, chosen_trial.json, and whatever was uploaded when it stopped)
    are copied into ``<staging>/<name>``; Ray's search/ and retrain/ stay in the storage, where the resumed run
    reads and continues them. A staging path given here replaces the one in the fetched config.yaml (the first
    machine's folder)."""
    import pyarrow.fs

    from pf_ray.config import from_dict

    name = uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]
    filesystem, root = _filesystem(uri)
    config_info = filesystem.get_file_info(f"{root}/config.yaml")
    if config_info.type != pyarrow.fs.FileType.File:
        raise ConfigError(f"run_dir: {uri!r} is not a pf-ray run folder (it has no config.yaml)")
    with filesystem.open_input_stream(f"{root}/config.yaml") as stream:
        config_text = stream.read().decode()
    try:
        config = yaml.safe_load(config_text)
    except yaml.YAMLError as error:
        raise ConfigError(f"run_dir: {uri}/config.yaml is not valid YAML ({error})") from None
    if not isinstance(config, dict) or not isinstance(config.get("storage") or {}, dict):
        raise ConfigError(f"run_dir: {uri}/config.yaml is not a pf-ray run configuration")
    storage = config.get("storage") or {}
    if not is_remote(str(storage.get("path", ""))):
        raise ConfigError(f"run_dir: {uri!r} holds a run whose storage.path is {storage.get('path')!r}, not a URI; "
                          f"resume it from its local folder")
    staging = Path(staging_path or storage.get("staging_path") or "runs").expanduser().resolve()
    local = staging / name
    if local.exists():
        log(f"resume: using the local run folder {local}")
        return local
    if staging_path is not None:
        storage["staging_path"] = str(staging)
        config["storage"] = storage
    from_dict(ExperimentConfig, config).learner_config()  # one this version cannot read: refused before writing
    partial = staging / f".{name}.fetching"  # renamed to the run folder once whole
    shutil.rmtree(partial, ignore_errors=True)
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
        relative = info.path[len(root):].lstrip("/")
        if info.type != pyarrow.fs.FileType.File or relative.split("/", 1)[0] in (SEARCH_DIR, "retrain"):
            continue
        _copy_file(join_uri(uri, *relative.split("/")), str(partial / relative))
    (partial / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    partial.rename(local)
    log(f"resume: fetched {uri} into {local}")
    return local


@contextlib.contextmanager
def _ray_for(config: ExperimentConfig, *, log: Log):
    """Ray for the block: the configured cluster, or a local Ray that is shut down when the block ends."""
    started_ray = start_ray(config, log=log)
    try:
        yield
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def check_storage(config: ExperimentConfig) -> None:
    """On a cluster, trials write to the storage path from every node: it must be shared (s3://, gs://, NFS)."""
    import ray

    path = config.storage.path
    if is_remote(path) or config.storage.shared:
        return
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) > 1:
        raise ConfigError(
            f"storage.path: {path!r} is a local folder, but the Ray cluster has {len(nodes)} nodes; trials on "
            f"other nodes could not write there. Use a shared path (s3://bucket/runs, gs://bucket/runs), or "
            f"an NFS folder mounted at the same path on every node with storage.shared: true")


def _pipeline(config: ExperimentConfig, data: DataBundle, baseline_path: Path | None, run_dir: Path,
              run_storage: str, *, log: Log, command: str | None, started: float, resume: bool) -> dict[str, Any]:
    """Baseline -> search -> retrain -> export -> verify -> results.json and report, in an existing run folder
    (Ray already connected); the run folder is uploaded to ``run_storage`` at the end if that is remote."""
    from pf_ray.candidate import candidate_learner_config
    from pf_ray.export.verify import accuracy_guard
    from pf_ray.report import write_report

    try:
        baseline_path = baseline_path or train_baseline(config, data, log=log)
        baseline, baseline_info = load_checkpoint(baseline_path, expect_input_shape=data.input_shape,
                                                  expect_num_classes=data.num_classes, user_model=config.model.name)

        space = per_layer_space(config, baseline, data.input_shape)
        trials: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        if space is not None:
            trials = run_search(config, space, baseline_path, run_storage, log=log, resume=resume)
            best = _chosen(run_dir, trials) if resume else None
            if best is None:
                best = choose_best(trials, search_epochs(config))
                _write_json(run_dir / CHOICE_FILE, {"trial_id": best["trial_id"]})
                # in the storage now: a resume from another machine must retrain this candidate, whose
                # checkpoints the retrain is about to write there, whatever ties the search has
                upload(run_dir, run_storage)
            else:  # the retrain may have checkpointed that candidate: continue it, whatever ties the search had
                log(f"search: keeping the candidate chosen before the interruption ({best['trial_id']})")
            learner_config = candidate_learner_config(config, baseline, data.input_shape, best["proposal"])
            log(f"search: best trial {best['trial_id']}: validation accuracy {best[ACCURACY]:.4f}, "
                + (f"at {best[MACS_RATIO]:.3f} of the baseline MACs" if isinstance(space.budget, MacsBudget)
                   else f"{space.field} {_short(best.get(LAYER_VALUES))} (budget use {_budget_use(space, best)})"))
        else:
            learner_config = config.learner_config()
        model = retrain(config, learner_config, baseline_path, run_dir, log=log, run_storage=run_storage)

        artifacts_dir = run_dir / "artifacts"
        save_checkpoint(artifacts_dir / "compressed.pt", model, model_config=config.model,
                        input_shape=data.input_shape, num_classes=data.num_classes,
                        extra={"learner": config.learner.name, "learner_config": to_dict(learner_config),
                               "dataset": to_dict(config.dataset)})
        torch.set_num_threads(config.resources.num_cpus or _cpu_count())
        reports = export_and_verify({"baseline": baseline, "compressed": model}, data, config, artifacts_dir,
                                    log=log, learner=build_learner(config.learner.name, learner_config))
        results = {
            "command": command,
            "config": to_dict(config),
            "resumed": resume,
            "baseline": {"checkpoint": str(baseline_path), "sha256": baseline_info.sha256,
                         **model_stats(baseline, data.input_shape).__dict__},
            "search": {"algorithm": config.search.algorithm.value if space else None,
                       "layer_names": list(space.names) if space else [], "trials": trials, "best": best},
            "learner_config": to_dict(learner_config),
            "compressed": {"checkpoint": str(artifacts_dir / "compressed.pt"),
                           **model_stats(model, data.input_shape).__dict__},
            "artifacts": reports,
            "accuracy_guard": {"max_accuracy_drop": config.export.max_accuracy_drop,
                               "failures": accuracy_guard(reports, config.export.max_accuracy_drop)},
            "seconds": round(time.time() - started, 1),
        }
        _write_json(run_dir / "results.json", results)
        report_md, report_html = write_report(run_dir)
        if results["accuracy_guard"]["failures"]:
            raise AccuracyGuardError("; ".join(results["accuracy_guard"]["failures"]))
        log(summary_table(results, config))
        log(f"artifacts: {artifacts_dir}")
        log(f"results:   {run_dir / 'results.json'}")
        log(f"report:    {report_html} (and {report_md.name})")
        return results
    except BaseException:
        log(f"run failed; partial run folder left for inspection (`pf-ray resume {run_dir}` continues it)")
        raise
    finally:
        if is_remote(run_storage):  # the run folder, finished or not, next to its search and retrain
            upload(run_dir, run_storage)
            log(f"uploaded {run_dir} to {run_storage}")


def _short(values: Any) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]" if values else "-"


def _budget_use(space: PerLayerSpace, trial: dict[str, Any]) -> str:
    """``cost / target`` of a trial's projected per-layer values, e.g. "0.200 of 0.200"."""
    values = trial.get(LAYER_VALUES)
    if space.budget is None or not values:
        return "-"
    return f"{space.budget.cost(values):.3f} of {space.budget.target:.3f}"


CHOICE_FILE = "chosen_trial.json"  # the search's winner, written before the retrain starts


def _chosen(run_dir: Path, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial record an interrupted run had chosen for its retrain (None if it had not chosen yet)."""
    path = run_dir / CHOICE_FILE
    if not path.is_file():
        return None
    chosen = json.loads(path.read_text())["trial_id"]
    return next((trial for trial in trials if trial["trial_id"] == chosen), None)


def export_and_verify(models: dict[str, torch.nn.Module], data: DataBundle, config: ExperimentConfig,
                      artifacts_dir: Path, *, log: Log = print, learner: Any = None,
                      learner_model: str = "compressed") -> list[dict[str, Any]]:
    """Export each model in every configured format, verify each file on its runtime, write the manifest.

    ``learner``: the learner that made the model named ``learner_model``. Where it stores weights compactly
    (``learner.packed``: sparse, k-bit, codebooks) that model is also written as ``<name>.pfpack``, the stored
    size, verified by decoding it; where it has its own INT8 files (``learner.int8_artifacts``: native_int8's
    ExecuTorch program and QDQ ONNX) they are written and verified on their runtimes too.
    Returns one row per artifact: the verification report plus the model's MACs, params and PyTorch accuracy.
    Calibration and verification draw progress bars on ``log``.
    """
    from pf_ray.export import export_all
    from pf_ray.export.manifest import artifact_entry, preprocessing, write_manifest
    from pf_ray.export.packed import pack_state_dict, write_packed
    from pf_ray.export.verify import verify_artifact, verify_packed
    from pf_ray.progress import progress_to

    rows, entries = [], []
    with progress_to(log):
        for stem, net in models.items():
            stats = model_stats(net, data.input_shape)
            torch_accuracy = evaluate(net, data.test)[ACCURACY]
            paths = export_all(net, data, config.export, artifacts_dir, stem=stem)
            if stem == learner_model and hasattr(learner, "int8_artifacts"):
                native = learner.int8_artifacts(net, data, artifacts_dir, stem)
                paths.update({f"native_{fmt}": path for fmt, path in native.items()})
            if stem == learner_model and hasattr(learner, "packed"):
                paths["pfpack"] = artifacts_dir / f"{stem}.pfpack"
                sizes = write_packed(paths["pfpack"], pack_state_dict(net.state_dict(), learner.packed(net)),
                                     meta={"model": to_dict(config.model), "learner": config.learner.name})
                log(f"packed: {paths['pfpack'].name}: {sizes['file_bytes'] / 1024:.1f} KiB "
                    f"({sizes['dense_bytes'] / 1024:.1f} KiB as float32)")
            for fmt, path in paths.items():
                if fmt == "pfpack":
                    log(f"verify: {path.name} (pfpack) decoded into the model, on PyTorch")
                    report = verify_packed(path, model=net, data=data, reference_inputs=_reference_inputs(data))
                else:
                    log(f"verify: {path.name} ({fmt}) on "
                        f"{'ExecuTorch' if 'pte' in fmt else 'ONNX Runtime'}")
                    report = verify_artifact(path, model=net, data=data, threads=config.export.latency_threads,
                                             batch_sizes=config.export.latency_batch_sizes,
                                             repeats=config.export.latency_repeats,
                                             reference_inputs=_reference_inputs(data), format_name=fmt)
                row = {"model": stem, "format": fmt, "macs": stats.macs, "params": stats.params,
                       "torch_test_accuracy": torch_accuracy, **report.to_dict()}
                rows.append(row)
                entries.append(artifact_entry(path, format_name=fmt, model=stem, verified={
                    key: row[key] for key in ("test_accuracy", "torch_test_accuracy", "top1_agreement",
                                              "max_abs_diff", "latency")}))
    manifest = write_manifest(artifacts_dir, entries, preprocessing_info=preprocessing(data, config.dataset.name))
    log(f"manifest: {manifest}")
    return rows


def _reference_inputs(data: DataBundle) -> torch.Tensor:
    count = min(256, len(data.test))
    return torch.stack([data.test[i][0] for i in range(count)])


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(temporary, path)


def summary_table(results: dict[str, Any], config: ExperimentConfig) -> str:
    """The before/after table printed at the end of ``pf-ray compress``."""
    batch = config.export.latency_batch_sizes[0]
    rows = results["artifacts"]
    reference = next((r for r in rows if r["model"] == "baseline" and r["format"] == "onnx"), rows[0])
    base_latency = reference["latency"][str(batch)]["median_ms"]
    header = (f"| artifact | test accuracy | MACs | params | file size | latency b{batch} "
              f"({config.export.latency_threads} thread) | speed-up |")
    lines = ["", header, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        latency = (row["latency"].get(str(batch)) or {}).get("median_ms")  # none for a .pfpack (storage only)
        timing = f"{latency:.3f} ms | {base_latency / latency:.2f}x" if latency else "- | -"
        lines.append(
            f"| {Path(row['path']).name} | {100 * row['test_accuracy']:.2f}% | {row['macs'] / 1e6:.2f}M | "
            f"{row['params'] / 1e3:.1f}k | {row['size_bytes'] / 1024:.0f} KiB | {timing} |")
    return "\n".join(lines) + "\n"
