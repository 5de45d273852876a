"""Ray for a run: the cluster it connects to (or the local Ray it starts), its shape (node types: what the GPU
requests are checked against, ``pf_ray.launch.resources``), and how many trials fit at once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from pf_ray.config import ExperimentConfig
from pf_ray.errors import ConfigError
from pf_ray.launch.resources import (
    TRAIN_DRIVER_CPUS,
    ClusterShape,
    NodeType,
    check_gpu_requests,
    check_precision,
    trial_bundle,
    trial_footprint,
    trial_slots,
)
from pf_ray.storage import is_remote

Log = Callable[[str], None]


def cpu_count() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gpu_count() -> int:
    """The GPUs CUDA sees here (CUDA_VISIBLE_DEVICES respected); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_shape(config: ExperimentConfig) -> ClusterShape:
    """The local Ray ``start_ray`` starts: one node with resources.num_cpus / num_gpus, or what this machine has."""
    resources = config.resources
    gpus = resources.num_gpus if resources.num_gpus is not None else gpu_count()
    source = "GPUs detected by CUDA here" if resources.num_gpus is None else f"resources.num_gpus {gpus}"
    return ClusterShape((NodeType("this machine", cpus=resources.num_cpus or cpu_count(), gpus=gpus),),
                        where=f"the local Ray ({source})")


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
        # The GPUs preflight checked the requests against (local_shape), whatever Ray would detect itself.
        node = local_shape(config).node_types[0]
        ray.init(address="local", num_cpus=int(node.cpus), num_gpus=int(node.gpus), include_dashboard=False,
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
    """What a trial reserves through Tune (``tune.with_resources``' keys), and the CPUs it really occupies (its
    Train workers too). The same requests in Ray's own names: ``pf_ray.launch.resources.ray_requests``."""
    bundle = trial_bundle(config.resources)
    reserve = {"cpu": bundle.pop("CPU"), **({"gpu": bundle.pop("GPU")} if "GPU" in bundle else {}), **bundle}
    return reserve, trial_footprint(config.resources)[0]


def max_concurrent_trials(config: ExperimentConfig, cluster_cpus: float, cluster_gpus: float = 0.0) -> int:
    """How many trials fit at once, so nested Train workers never wait for CPUs (or GPUs) held by other trials."""
    cost, gpus = trial_footprint(config.resources)
    if config.resources.workers_per_trial == 1 and cost > cluster_cpus:
        raise ConfigError(f"resources.cpus_per_trial: got {config.resources.cpus_per_trial}; the cluster has "
                          f"{cluster_cpus:g} CPUs")
    if cost > cluster_cpus:
        raise ConfigError(f"resources.workers_per_trial: one trial needs {cost:g} CPUs (driver "
                          f"{TRAIN_DRIVER_CPUS:g} + {config.resources.workers_per_trial} workers x "
                          f"{config.resources.cpus_per_worker} CPU); the cluster has {cluster_cpus:g}")
    return trial_slots(cluster_cpus, cluster_gpus, cost, gpus)


# --------------------------------------------------------------------------------------------------------------
# A remote cluster's node types, read once connected: what its GPU requests are checked against.

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster launcher's config on its head, resources filled in
UNLIMITED_NODES = 10**6  # an autoscaler node group with no max_count (-1)


def node_types_from_launcher(launcher: dict) -> tuple[NodeType, ...]:
    """A cluster-launcher YAML's node types (``available_node_types``), each at most its max_workers (and the
    cluster's max_workers); the head type once. The resources must be filled in (as ``ray up`` does in the head's
    ``~/ray_bootstrap_config.yaml``; AWS detects them from the instance type)."""
    cluster_max = int(launcher.get("max_workers", UNLIMITED_NODES))
    types = []
    for name, node_type in launcher["available_node_types"].items():
        resources = node_type.get("resources") or {}
        count = 1 if name == launcher["head_node_type"] else min(int(node_type.get("max_workers", cluster_max)),
                                                                 cluster_max)
        if count > 0:
            types.append(NodeType(name, cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
                                  max_count=count))
    return tuple(types)


def live_shape(config: ExperimentConfig) -> ClusterShape:
    """The connected Ray's node types. A local Ray's (no resources.ray_address): its one node. A remote cluster's:
    the autoscaler's (autoscaler v2, as in the KubeRay manifests, reports
    them to the GCS; the cluster launcher's v1 leaves its config, resources filled in, in
    ``~/ray_bootstrap_config.yaml`` on the head, where ``ray job submit`` runs pf-ray), else the nodes alive now.
    Those are a lower bound (``complete`` False): an autoscaler that reports nothing may add other node types, and
    a plain Ray runs a read-only autoscaler monitor too, so the two cannot be told apart."""
    import yaml

    if not config.resources.ray_address:
        return live_nodes()
    try:  # a private API (Ray Train checks its worker groups against the same record): gone in a later Ray, skip
        from ray._private.state import state

        reported = state.get_cluster_config()
    except (ImportError, AttributeError):
        reported = None
    if reported is not None and reported.node_group_configs:
        return ClusterShape(tuple(
            NodeType(group.name, cpus=float(group.resources.get("CPU", 0)), gpus=float(group.resources.get("GPU", 0)),
                     max_count=UNLIMITED_NODES if group.max_count < 0 else group.max_count)
            for group in reported.node_group_configs), where="the cluster (its autoscaler's node types)")
    bootstrap = os.path.expanduser(BOOTSTRAP_CONFIG)
    if os.path.isfile(bootstrap):
        with open(bootstrap) as file:
            return ClusterShape(node_types_from_launcher(yaml.safe_load(file)),
                                where=f"the cluster (the node types of {BOOTSTRAP_CONFIG})")
    return live_nodes(complete=False)


def live_nodes(*, complete: bool = True) -> ClusterShape:
    """The nodes alive now, one node type each."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    return ClusterShape(tuple(NodeType(node.get("NodeManagerAddress", "node"), cpus=node["Resources"].get("CPU", 0),
                                       gpus=node["Resources"].get("GPU", 0)) for node in nodes),
                        where="the cluster (its nodes now)", complete=complete)


def check_cluster(config: ExperimentConfig, *, log: Log) -> None:
    """The GPU requests checked against a remote cluster, once connected (a local Ray's were checked in preflight):
    an impossible one ends the run before anything trains."""
    if not config.resources.ray_address or not config.resources.use_gpu:
        return
    shape = live_shape(config)
    if not shape.complete:
        log("resources: the cluster's node types are unknown (no autoscaler reported them, and "
            f"{BOOTSTRAP_CONFIG} is not here): its GPU requests are not checked")
    check_gpu_requests(config, shape)
    note = check_precision(config.resources, cuda_available=False, bf16_supported=None)
    if note:
        log(note)
