"""The retrain, driver side: the chosen candidate compressed again and fine-tuned with the full budget on Ray Train.

The Train run itself (every worker's loop, its checkpoints) is ``trainables.train_loop``; here the driver makes
room for it on the cluster, sizes its workers, relays rank 0's progress to its own disk and loads the result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from pf_ray.checkpoint import load_checkpoint
from pf_ray.errors import SearchError
from pf_ray.launch.atomic_fs import ray_storage
from pf_ray.launch.resources import worker_cpus
from pf_ray.metrics import ACCURACY, EPOCH
from pf_ray.spec import RunSpec
from pf_ray.storage import RETRAIN_DIR, RunLocation
from trainables.progress_relay import driver_progress
from trainables.train_loop import MODEL_FILE, TrainJob, ray_train_fit

Log = Callable[[str], None]



def retrain(spec: RunSpec, baseline_path: Path, location: RunLocation, *, log: Log = print) -> nn.Module:
    """Compress the baseline with ``spec``'s learner config (the chosen candidate's) and fine-tune it with the
    retrain's budget on Ray Train; returns the finalized model.

    The Train run goes to ``<location.storage>/retrain``; its progress log and TensorBoard files to
    ``<location.folder>/retrain`` on this machine (sent by rank 0 through ``driver_progress``).
    """
    from pf_ray.launch.cluster import live_nodes, live_shape
    from pf_ray.launch.orphans import settle

    config = spec.experiment
    # The retrain runs alone: its workers share the cluster's CPUs, each within one node. Stopped Ray Train
    # trials may have left placement groups holding CPUs (pf_ray.launch.orphans): gone first, or the retrain waits.
    if not settle():
        log("retrain: placement groups of the search are still held; the retrain may wait for their CPUs")
    # Without GPUs the live nodes' CPUs are split among the workers; with GPUs each worker takes the CPUs per GPU
    # of the smallest GPU node type, so it fits on every GPU node (resources.worker_cpus).
    use_gpu = config.resources.use_gpu
    cpus_per_worker = worker_cpus(config.retrain.num_workers, use_gpu, live_shape(config) if use_gpu else live_nodes())
    log(f"retrain: {config.retrain.train.epochs} epoch(s) on {config.retrain.num_workers} Ray Train worker(s) of "
        f"{cpus_per_worker} CPU(s)" + (" and 1 GPU" if use_gpu else "") + " each")
    storage_path, filesystem = ray_storage(location.storage)
    job = TrainJob(spec, config.retrain.train, validation_subset=None, num_workers=config.retrain.num_workers,
                   cpus_per_worker=cpus_per_worker,
                   name=RETRAIN_DIR, storage_path=storage_path, storage_filesystem=filesystem, measure=False)
    with driver_progress(location.folder / RETRAIN_DIR, log) as progress:
        # the baseline's bytes go through the object store, as for trials
        result = ray_train_fit(job, Path(baseline_path).read_bytes(), progress=progress)
    if result.error is not None:
        raise SearchError(f"retraining failed: {result.error}")
    log(f"retrain: validation accuracy {result.metrics.get(ACCURACY, float('nan')):.4f} after "
        f"{result.metrics.get(EPOCH)} epoch(s)")
    with result.checkpoint.as_directory() as directory:
        # the finalized model; a learner with its own finalized layers rebuilds them (Learner.rebuild_finalized)
        model, _ = load_checkpoint(Path(directory) / MODEL_FILE, user_model=config.model.name)
        return model
