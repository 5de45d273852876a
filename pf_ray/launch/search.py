"""The search: Ray Tune trials (one candidate each) under a searcher and ASHA, and the choice among them."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pf_ray.candidate import best_trial
from pf_ray.config import ExperimentConfig, Scoring
from pf_ray.errors import SearchError
from pf_ray.launch.atomic_fs import ray_storage
from pf_ray.launch.cluster import max_concurrent_trials, trial_cost
from pf_ray.launch.resources import trial_footprint
from pf_ray.launch.search_state import DamagedSearchState, describe, reconcile
from pf_ray.metrics import (
    ACCURACY,
    EPOCH,
    FP32_LAYERS,
    LAYER_VALUES,
    MACS_RATIO,
    PROXY_ACCURACY,
    REMOVED_BLOCKS,
    SCORE,
    TRIAL_METRICS,
)
from pf_ray.search_space import PerLayerSpace
from pf_ray.spec import RunSpec
from pf_ray.storage import SEARCH_DIR, exists, filesystem_of, is_remote, join_uri, set_aside

if TYPE_CHECKING:
    from ray import tune

Log = Callable[[str], None]



def run_search(spec: RunSpec, space: PerLayerSpace, baseline_path: Path, run_storage: str | Path, *,
               log: Log = print, resume: bool = False, starts: Sequence[Sequence[float]] = (),
               name: str = SEARCH_DIR) -> list[dict[str, Any]]:
    """Ray Tune search with ASHA; returns one record per trial (values, last metrics, status, error).

    ``run_storage``: the run folder, or its URI for a remote storage.path; the experiment goes to its search/
    (``name``: another folder, one per target of a Pareto set).
    ``starts``: proposals every searcher makes right after the uniform one (the learner's knapsack allocation).
    ``resume``: continue the search saved in ``run_storage/search`` (``pf-ray resume``): finished trials are kept,
    unfinished ones continue from their last checkpoint (or start again), and the searcher's state (DDPG agent
    and replay buffer, GP observations, TPE history) is restored from Tune's experiment checkpoint.
    """
    import ray
    from ray import tune

    from pf_ray.launch.orphans import orphan_reaper
    from search_algs import make_searcher
    from search_algs.concurrency import ClusterConcurrency
    from search_algs.schedulers import make_asha
    from trainables import get_trainable
    from trainables.trial import TrialSetup

    config = spec.experiment
    search = config.search
    max_epochs = search_epochs(config)
    searcher, param_space = make_searcher(search.algorithm, space, metric=SCORE, mode="max", seed=search.seed,
                                          num_trials=search.num_trials, max_epochs=max_epochs, starts=starts)
    cluster = ray.cluster_resources()
    concurrency = max_concurrent_trials(config, cluster.get("CPU", 1.0), cluster.get("GPU", 0.0))
    reserve, _ = trial_cost(config)
    cpus, gpus = trial_footprint(config.resources)
    # Re-derived from the cluster's CPUs and GPUs before each new trial: nodes that join (autoscaling) raise it.
    searcher = ClusterConcurrency(searcher, cpus_per_trial=cpus, gpus_per_trial=gpus)
    # The spec and the space travel as they are (frozen dataclasses, pickled once into the object store); the
    # checkpoint's bytes too: trials on other nodes cannot read our disk.
    setup = TrialSetup(spec, space, Path(baseline_path).read_bytes())
    trainable = tune.with_resources(tune.with_parameters(get_trainable(spec.learner_name), setup=setup), reserve)
    log(f"search: {search.algorithm.value}, {search.num_trials} trials over {len(space.names)} layers "
        f"({space.label} each), {concurrency} at a time (more as nodes join), scored by {search.reward.value} "
        + ("right after compression (proxy)" if search.scoring is Scoring.PROXY
           else f"after each of {max_epochs} fine-tuning epoch(s), ASHA stopping the weak"))
    # Tune saves the experiment state (trials, searcher, scheduler) at most this often; "0" = after every event,
    # so a driver killed at any moment loses no finished trial (the state is small; this costs milliseconds).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    run_storage = str(run_storage)
    storage_path, filesystem = ray_storage(run_storage)
    search_dir = join_uri(storage_path, name) if is_remote(storage_path) else f"{storage_path}/{name}"
    state_filesystem, state_path = (filesystem, search_dir) if filesystem else filesystem_of(search_dir)
    if resume and tune.Tuner.can_restore(search_dir, storage_filesystem=filesystem):
        try:
            state = reconcile(state_filesystem, state_path)
        except DamagedSearchState as error:
            kept = set_aside(search_dir)
            log(f"search: cannot resume it: {error}; the search starts again (the damaged folder is kept as {kept})")
        else:
            log(f"search: resuming {search_dir} ({describe(state)})"
                + (f"; reconciled the saved state: {'; '.join(state.changed)}" if state.changed else ""))
            tuner = tune.Tuner.restore(search_dir, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False, storage_filesystem=filesystem)
            return trial_records(tuner.fit(), space)
    if exists(search_dir):  # stopped before Tune saved any experiment state: nothing in it can be resumed
        log(f"search: {search_dir} holds no saved search state; starting the search again")
        state_filesystem.delete_dir(state_path)
    # Only Ray Train trials leave placement groups behind (pf_ray.launch.orphans): no GCS reads otherwise.
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
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                  verbose=1, callbacks=[trial_log(log, max_epochs), *reaper],
                                  failure_config=tune.FailureConfig(max_failures=search.max_failures)),
    )
    return trial_records(tuner.fit(), space)


def trial_log(log: Log, max_epochs: int) -> tune.Callback:
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


def trial_records(grid: tune.ResultGrid, space: PerLayerSpace) -> list[dict[str, Any]]:
    """One plain record per trial of a finished Tune run, for results.json."""
    trials = []
    for result in grid:
        metrics = dict(result.metrics or {})
        values = [float(result.config[key]) for key in space.keys()] if result.config else []
        if metrics.get(LAYER_VALUES):  # the searched field's values (and removed blocks, FP32 layers) as a vector
            metrics[LAYER_VALUES] = space.recorded(metrics[LAYER_VALUES], metrics.get(REMOVED_BLOCKS) or (),
                                                   metrics.get(FP32_LAYERS) or ())
        trials.append({
            "trial_id": metrics.get("trial_id", Path(result.path).name),
            "proposal": values,
            **{key: metrics.get(key) for key in TRIAL_METRICS},
            EPOCH: metrics.get(EPOCH, 0),
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
