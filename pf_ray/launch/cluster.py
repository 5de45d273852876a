"""Ray for a run: the cluster it connects to (or the local Ray it starts), and how many trials fit at once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from pf_ray.config import ExperimentConfig
from pf_ray.errors import ConfigError
from pf_ray.storage import is_remote

Log = Callable[[str], None]

# A trial that runs a TorchTrainer only waits for its workers: it reserves a sliver of a CPU, so that the
# workers' own CPUs (which Tune does not reserve for it) are what limits concurrency.
TRAIN_DRIVER_CPUS = 0.25
# What a trial driver takes of ``resources.driver_resource``: the clusters/ YAMLs give the head 1000 units, so
# the custom resource places drivers without limiting how many run (the CPUs do that).
DRIVER_RESOURCE_SHARE = 0.001


def cpu_count() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
        ray.init(address="local", num_cpus=config.resources.num_cpus or cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="WARNING", log_to_driver=False)
    resources = ray.cluster_resources()
    log(f"ray: {int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs")
    return True


@contextlib.contextmanager
def ray_for(config: ExperimentConfig, *, log: Log) -> Iterator[None]:
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


def trial_cost(config: ExperimentConfig) -> tuple[dict[str, float], float]:
    """The resources a trial reserves through Tune, and the CPUs it really occupies (its Train workers too)."""
    resources = config.resources
    if resources.workers_per_trial == 1:
        reserve = {"cpu": float(resources.cpus_per_trial), "gpu": resources.trial_gpus}
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
