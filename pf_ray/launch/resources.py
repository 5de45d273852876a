"""What a run asks Ray for: ``resources.*`` (and the cluster's node types) mapped to Ray requests, and the requests
no node of the cluster could ever grant, refused before anything trains. Pure: no Ray here; ``cluster.py`` reads
the live cluster into a ``ClusterShape``.

The mapping (docs/design.md, "Resources and GPUs", holds the same table for users):

    trial, workers_per_trial 1   Tune reserves one bundle {CPU: cpus_per_trial, GPU: trial_gpus}; the trial trains
                                 in that process (trial_gpus: gpus_per_trial, else 1 with use_gpu, else 0)
    trial, workers_per_trial N   Tune reserves {CPU: 0.25} for the trial driver, which starts a TorchTrainer of N
                                 workers {CPU: cpus_per_worker, GPU: 1 with use_gpu}
    retrain                      a TorchTrainer of retrain.num_workers workers {CPU: share, GPU: 1 with use_gpu};
                                 share = with use_gpu the fewest CPUs per GPU of any GPU node type (so a worker
                                 fits every GPU node), else the cluster's CPUs split among the workers
    baseline                     without use_gpu: the driver's own CPUs (no Ray request); with use_gpu one Ray task
                                 {CPU: share, GPU: 1}, share as for a one-worker retrain
    trial_driver + driver_resource: every trial driver also asks 0.001 of that custom resource (the CPU head's)
"""

from __future__ import annotations

from dataclasses import dataclass

from pf_ray.config import ExperimentConfig, ResourcesConfig
from pf_ray.errors import ConfigError

# A trial that runs a TorchTrainer only waits for its workers: it reserves a sliver of a CPU, so that the
# workers' own CPUs (which Tune does not reserve for it) are what limits concurrency.
TRAIN_DRIVER_CPUS = 0.25
# What a trial driver takes of ``resources.driver_resource``: the clusters/ YAMLs give the head 1000 units, so
# the custom resource places drivers without limiting how many run (the CPUs do that).
DRIVER_RESOURCE_SHARE = 0.001
# Ray Train gives each of its workers one whole GPU when use_gpu is set (ScalingConfig(use_gpu=True)).
GPUS_PER_TRAIN_WORKER = 1.0
# floor(gpus / gpus_per_trial) in floating point: 1 / 0.1 is 10.000000000000002, 0.3 / 0.1 is 2.9999999999999996
_ROUNDING = 1e-9

Bundle = dict[str, float]  # Ray's resource names: "CPU", "GPU", custom ones


@dataclass(frozen=True)
class NodeType:
    """One kind of node a cluster has or can start: an autoscaler's node type, or one live node."""

    name: str  # for messages: "g5.xlarge", "gpu_spot", "this machine"
    cpus: float
    gpus: float = 0.0
    max_count: int = 1  # how many such nodes the cluster can have at once (an autoscaler's max_workers)


@dataclass(frozen=True)
class ClusterShape:
    """The nodes a run can ever get. ``complete`` False: more node types may exist than these (an autoscaler whose
    node types could not be read), so what these lack cannot be refused, only sized for."""

    node_types: tuple[NodeType, ...]
    where: str  # names the source in messages: "the local Ray", "the autoscaler's node types", ...
    complete: bool = True

    @property
    def gpu_types(self) -> tuple[NodeType, ...]:
        return tuple(node for node in self.node_types if node.gpus > 0)

    @property
    def max_gpus(self) -> float:
        """GPUs when every node type is at its max_count."""
        return sum(node.gpus * node.max_count for node in self.node_types)

    @property
    def max_cpus(self) -> float:
        return sum(node.cpus * node.max_count for node in self.node_types)

    def describe_gpus(self) -> str:
        """e.g. "at most 8 GPUs (gpu_spot: 4 CPUs, 1 GPU, up to 8 nodes)"."""
        if not self.gpu_types:
            return "no GPU"
        kinds = ", ".join(f"{node.name}: {node.cpus:g} CPUs, {node.gpus:g} GPU{'' if node.gpus == 1 else 's'}"
                          + (f", up to {node.max_count} nodes" if node.max_count > 1 else "")
                          for node in self.gpu_types)
        return f"at most {self.max_gpus:g} GPU{'' if self.max_gpus == 1 else 's'} ({kinds})"


@dataclass(frozen=True)
class RayRequests:
    """Everything a run asks Ray for, as Ray bundles ({"CPU": 1, "GPU": 0.25, ...})."""

    trial: Bundle  # what Tune reserves for one trial (its driver, and with workers_per_trial 1 its training)
    trial_workers: tuple[Bundle, ...]  # the trial's Ray Train workers; () when it trains in its own process
    retrain_workers: tuple[Bundle, ...]  # the retrain's Ray Train workers
    baseline: Bundle | None  # the Ray task that trains the baseline; None: on the driver's CPUs, no request
    concurrent_trials: int  # how many trials fit at once when the cluster is at its largest

    @property
    def retrain_cpus_per_worker(self) -> int:
        return int(self.retrain_workers[0]["CPU"])


def trial_bundle(resources: ResourcesConfig) -> Bundle:
    """The one bundle Tune reserves for a trial (its placement group's first bundle)."""
    if resources.workers_per_trial == 1:
        bundle = {"CPU": float(resources.cpus_per_trial), "GPU": resources.trial_gpus}
    else:
        bundle = {"CPU": TRAIN_DRIVER_CPUS}
    if resources.driver_resource:  # pin trial drivers to the nodes offering it (the clusters/ YAMLs' head)
        bundle[resources.driver_resource] = DRIVER_RESOURCE_SHARE
    return bundle


def train_worker_bundle(cpus: int, use_gpu: bool) -> Bundle:
    """One Ray Train worker: ``ScalingConfig(use_gpu, resources_per_worker={"CPU": cpus})`` asks for this."""
    return {"CPU": float(cpus), "GPU": GPUS_PER_TRAIN_WORKER if use_gpu else 0.0}


def trial_footprint(resources: ResourcesConfig) -> tuple[float, float]:
    """(CPUs, GPUs) one trial really occupies: its Tune reservation plus its Ray Train workers (which Tune does not
    reserve for it)."""
    if resources.workers_per_trial == 1:
        return float(resources.cpus_per_trial), resources.trial_gpus
    gpus = resources.workers_per_trial * GPUS_PER_TRAIN_WORKER if resources.use_gpu else 0.0
    return TRAIN_DRIVER_CPUS + resources.workers_per_trial * resources.cpus_per_worker, gpus


def trial_slots(cluster_cpus: float, cluster_gpus: float, trial_cpus: float, trial_gpus: float) -> int:
    """How many trials fit at once: floor(CPUs / CPUs per trial), and floor(GPUs / GPUs per trial) when trials take
    GPUs (fractions allowed: 0.25 GPU per trial on 2 GPUs is 8); at least 1, so a search on a cluster still
    scaling up from zero asks for one trial, which makes the autoscaler add a node."""
    slots = int(cluster_cpus / trial_cpus + _ROUNDING)
    if trial_gpus > 0:
        slots = min(slots, int(cluster_gpus / trial_gpus + _ROUNDING))
    return max(1, slots)


def worker_cpus(num_workers: int, use_gpu: bool, cluster: ClusterShape) -> int:
    """CPUs per Ray Train worker of the retrain (and of the baseline's task, ``num_workers`` 1).

    With use_gpu: the fewest CPUs per GPU of any GPU node type, so one worker per GPU fits every GPU node (on
    clusters/aws.yaml a g5.xlarge has 4 CPUs and 1 GPU: 4, not the 8 of the CPU head); 1 if no GPU node type is
    known. Without: the cluster's CPUs split among the workers, at most the largest node's (as before GPUs)."""
    if use_gpu:
        shares = [int(node.cpus // node.gpus) for node in cluster.gpu_types]
        return max(1, min(shares, default=1))
    largest = max((node.cpus for node in cluster.node_types), default=1.0)
    return max(1, min(int(largest), int(cluster.max_cpus) // num_workers))


def ray_requests(config: ExperimentConfig, cluster: ClusterShape) -> RayRequests:
    """Every Ray request of a run with ``config`` on ``cluster`` (``check_requests`` says whether they fit)."""
    resources = config.resources
    trial_workers = ()
    if resources.workers_per_trial > 1:
        trial_workers = (train_worker_bundle(resources.cpus_per_worker, resources.use_gpu),) \
            * resources.workers_per_trial
    retrain_cpus = worker_cpus(config.retrain.num_workers, resources.use_gpu, cluster)
    baseline = None
    if resources.use_gpu:
        baseline = train_worker_bundle(worker_cpus(1, True, cluster), True)
    return RayRequests(
        trial=trial_bundle(resources), trial_workers=trial_workers,
        retrain_workers=(train_worker_bundle(retrain_cpus, resources.use_gpu),) * config.retrain.num_workers,
        baseline=baseline,
        concurrent_trials=trial_slots(cluster.max_cpus, cluster.max_gpus, *trial_footprint(resources)))


def _fits(bundle: Bundle, node: NodeType) -> bool:
    return bundle.get("CPU", 0.0) <= node.cpus and bundle.get("GPU", 0.0) <= node.gpus


def check_gpu_requests(config: ExperimentConfig, cluster: ClusterShape) -> None:
    """Refuse, with the field, the value and what the cluster has, the GPU requests no node of ``cluster`` could
    grant (they would wait for ever). Without use_gpu, or on a cluster whose node types are not all known,
    nothing is refused.

    Raises:
        ConfigError: use_gpu with no GPU; more Ray Train workers (1 GPU each) than GPUs; a trial's or a worker's
            bundle (CPUs with its GPU) that no GPU node type holds.
    """
    resources = config.resources
    if not resources.use_gpu or not cluster.complete:
        return
    has = f"{cluster.where} has {cluster.describe_gpus()}"
    if not cluster.gpu_types:
        raise ConfigError(f"resources.use_gpu: got true; {has}; set resources.use_gpu to false, or run on a "
                          f"cluster with GPU nodes")
    requests = ray_requests(config, cluster)
    if resources.workers_per_trial > 1:
        if resources.workers_per_trial > cluster.max_gpus:
            raise ConfigError(f"resources.workers_per_trial: got {resources.workers_per_trial} Ray Train workers "
                              f"of 1 GPU each; {has}")
        if not any(_fits(requests.trial_workers[0], node) for node in cluster.gpu_types):
            raise ConfigError(f"resources.cpus_per_worker: got {resources.cpus_per_worker}; each Ray Train worker "
                              f"needs them with its GPU on one node, and {has}")
    elif resources.trial_gpus > 0 and not any(_fits(requests.trial, node) for node in cluster.gpu_types):
        raise ConfigError(f"resources.cpus_per_trial: got {resources.cpus_per_trial} with "
                          f"{resources.trial_gpus:g} GPU per trial; no GPU node offers both: {has}")
    if config.retrain.num_workers > cluster.max_gpus:
        raise ConfigError(f"retrain.num_workers: got {config.retrain.num_workers} Ray Train workers of 1 GPU "
                          f"each (resources.use_gpu); {has}")


def check_precision(resources: ResourcesConfig, *, cuda_available: bool, bf16_supported: bool | None) -> str | None:
    """Refuse bf16 on this machine's GPU when it has none with bf16; otherwise a note when it can only be checked
    where the trials run (None when nothing needs saying).

    ``cuda_available``/``bf16_supported``: what ``torch.cuda`` says on the machine the trials' GPUs are in (a local
    Ray); pass ``cuda_available=False`` for a remote cluster.
    """
    if resources.precision != "bf16" or not resources.use_gpu:
        return None  # fp32 runs anywhere; bf16 on CPUs is supported by torch everywhere
    if not cuda_available:
        return ("resources.precision bf16: the GPUs are not visible here, so their bf16 support is checked when "
                "each trial starts")
    if not bf16_supported:
        raise ConfigError("resources.precision: got 'bf16'; this machine's GPU has no bf16 "
                          "(torch.cuda.is_bf16_supported() is false: it needs Ampere or later); allowed here: fp32")
    return None
