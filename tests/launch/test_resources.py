"""resources.* -> Ray requests (pf_ray/launch/resources.py): the table of docs/design.md "Resources and GPUs",
fractional GPUs, trial concurrency bounded by GPUs, and the GPU requests refused before anything trains.
Pure: no Ray (the cluster YAMLs' node types are checked in tests/clusters/test_cluster_resources.py)."""

from __future__ import annotations

import pytest

from pf_ray.config import ExperimentConfig, ResourcesConfig, RetrainConfig
from pf_ray.errors import ConfigError
from pf_ray.launch.cluster import max_concurrent_trials, trial_cost
from pf_ray.launch.resources import (
    ClusterShape,
    NodeType,
    check_gpu_requests,
    check_precision,
    ray_requests,
    trial_slots,
    worker_cpus,
)

# One machine with 16 CPUs and 2 GPUs; a CPU-only one; a CPU head with 4-CPU single-GPU workers (clusters/aws.yaml).
TWO_GPUS = ClusterShape((NodeType("this machine", cpus=16, gpus=2),), where="the local Ray")
NO_GPU = ClusterShape((NodeType("this machine", cpus=4),), where="the local Ray")
HEAD_AND_GPUS = ClusterShape((NodeType("head", cpus=8), NodeType("gpu_spot", cpus=4, gpus=1, max_count=8)),
                             where="the cluster")


def experiment(retrain_workers: int = 1, **resources) -> ExperimentConfig:
    return ExperimentConfig(resources=ResourcesConfig(**resources), retrain=RetrainConfig(num_workers=retrain_workers))


@pytest.mark.parametrize(("config", "cluster", "trial", "trial_workers", "retrain_worker", "baseline", "slots"), [
    pytest.param(experiment(), NO_GPU, {"CPU": 1.0, "GPU": 0.0}, (), {"CPU": 4.0, "GPU": 0.0}, None, 4,
                 id="cpu-only-default"),
    pytest.param(experiment(use_gpu=True), TWO_GPUS, {"CPU": 1.0, "GPU": 1.0}, (), {"CPU": 8.0, "GPU": 1.0},
                 {"CPU": 8.0, "GPU": 1.0}, 2, id="use-gpu-one-gpu-per-trial"),
    pytest.param(experiment(use_gpu=True, gpus_per_trial=0.25), TWO_GPUS, {"CPU": 1.0, "GPU": 0.25}, (),
                 {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, 8, id="quarter-gpu-per-trial"),
    pytest.param(experiment(use_gpu=True, gpus_per_trial=0.3, cpus_per_trial=2), TWO_GPUS,
                 {"CPU": 2.0, "GPU": 0.3}, (), {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, 6,
                 id="fraction-that-does-not-divide"),  # floor(2 / 0.3) = 6, floor(16 / 2) = 8
    pytest.param(experiment(use_gpu=True, gpus_per_trial=0.1), TWO_GPUS, {"CPU": 1.0, "GPU": 0.1}, (),
                 {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}, 16, id="tenth-gpu-bounded-by-cpus"),
    pytest.param(experiment(retrain_workers=2, use_gpu=True, workers_per_trial=2, cpus_per_worker=2), TWO_GPUS,
                 {"CPU": 0.25}, ({"CPU": 2.0, "GPU": 1.0},) * 2, {"CPU": 8.0, "GPU": 1.0},
                 {"CPU": 8.0, "GPU": 1.0}, 1, id="two-train-workers-per-trial"),
    pytest.param(experiment(retrain_workers=4, use_gpu=True, workers_per_trial=2, driver_resource="pf_ray_driver"),
                 HEAD_AND_GPUS, {"CPU": 0.25, "pf_ray_driver": 0.001}, ({"CPU": 1.0, "GPU": 1.0},) * 2,
                 {"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}, 4, id="cpu-head-gpu-workers"),
])
def test_the_documented_mapping(config, cluster, trial, trial_workers, retrain_worker, baseline, slots):
    requests = ray_requests(config, cluster)
    assert requests.trial == trial
    assert requests.trial_workers == trial_workers
    assert requests.retrain_workers == (retrain_worker,) * config.retrain.num_workers
    assert requests.baseline == baseline
    assert requests.concurrent_trials == slots
    check_gpu_requests(config, cluster)  # all of them fit


def test_tune_gets_the_trial_bundle_in_its_own_names():
    """``tune.with_resources`` takes lowercase cpu/gpu; a custom resource keeps its name (as before GPUs)."""
    assert trial_cost(experiment(use_gpu=True, gpus_per_trial=0.5)) == ({"cpu": 1.0, "gpu": 0.5}, 1.0)
    assert trial_cost(experiment()) == ({"cpu": 1.0, "gpu": 0.0}, 1.0)
    assert trial_cost(experiment(workers_per_trial=3, cpus_per_worker=2, driver_resource="head")) == \
        ({"cpu": 0.25, "head": 0.001}, 6.25)


@pytest.mark.parametrize(("cpus", "gpus", "trial_cpus", "trial_gpus", "slots"), [
    (16, 0, 1, 0.0, 16),  # CPU-only: the CPUs alone, as before
    (16, 2, 1, 1.0, 2),
    (16, 2, 1, 0.25, 8),
    (16, 1, 1, 0.1, 10),  # 1 / 0.1 is 10.000000000000002 in floating point
    (16, 0.3, 1, 0.1, 3),  # 0.3 / 0.1 is 2.9999999999999996
    (16, 2, 1, 0.3, 6),
    (4, 8, 1, 0.5, 4),  # bounded by the CPUs
    (8, 0, 2.25, 2.0, 1),  # no GPU yet (an autoscaler starting from zero): one trial, whose demand starts a node
])
def test_trial_slots_are_bounded_by_cpus_and_by_gpus(cpus, gpus, trial_cpus, trial_gpus, slots):
    assert trial_slots(cpus, gpus, trial_cpus, trial_gpus) == slots


def test_max_concurrent_trials_counts_gpus_with_use_gpu_only():
    assert max_concurrent_trials(experiment(), 16, 2) == 16
    assert max_concurrent_trials(experiment(use_gpu=True), 16, 2) == 2
    assert max_concurrent_trials(experiment(use_gpu=True, gpus_per_trial=0.25), 16, 2) == 8
    assert max_concurrent_trials(experiment(use_gpu=True, workers_per_trial=2), 16, 5) == 2  # 2 GPUs each


def test_retrain_workers_take_the_cpus_per_gpu_of_the_smallest_gpu_node_type():
    mixed = ClusterShape((NodeType("head", 8), NodeType("a10g", 4, 1, 8), NodeType("4xt4", 48, 4, 2)), where="c")
    assert worker_cpus(2, True, mixed) == 4  # min(4 / 1, 48 / 4)
    assert worker_cpus(2, True, NO_GPU) == 1  # no GPU node type known (a cluster whose types are unknown)
    assert worker_cpus(2, False, mixed) == 48  # CPU-only: min(largest node, all CPUs // workers), as before GPUs
    assert worker_cpus(64, False, NO_GPU) == 1


@pytest.mark.parametrize(("config", "cluster", "message"), [
    pytest.param(experiment(use_gpu=True), NO_GPU,
                 "resources.use_gpu: got true; the local Ray has no GPU; set resources.use_gpu to false", id="no-gpu"),
    pytest.param(experiment(use_gpu=True, workers_per_trial=3), TWO_GPUS,
                 "resources.workers_per_trial: got 3 Ray Train workers of 1 GPU each; the local Ray has at most 2 "
                 "GPUs (this machine: 16 CPUs, 2 GPUs)", id="more-trial-workers-than-gpus"),
    pytest.param(experiment(retrain_workers=9, use_gpu=True, workers_per_trial=2), HEAD_AND_GPUS,
                 "retrain.num_workers: got 9 Ray Train workers of 1 GPU each (resources.use_gpu); the cluster has at "
                 "most 8 GPUs (gpu_spot: 4 CPUs, 1 GPU, up to 8 nodes)", id="more-retrain-workers-than-gpus"),
    pytest.param(experiment(use_gpu=True, workers_per_trial=2, cpus_per_worker=8), HEAD_AND_GPUS,
                 "resources.cpus_per_worker: got 8; each Ray Train worker needs them with its GPU on one node, and "
                 "the cluster has at most 8 GPUs (gpu_spot: 4 CPUs, 1 GPU, up to 8 nodes)",
                 id="worker-bundle-fits-no-gpu-node"),
    pytest.param(experiment(use_gpu=True, cpus_per_trial=6), HEAD_AND_GPUS,
                 "resources.cpus_per_trial: got 6 with 1 GPU per trial; no GPU node offers both", id="trial-too-big"),
])
def test_impossible_gpu_requests_are_refused_naming_the_field_and_what_there_is(config, cluster, message):
    with pytest.raises(ConfigError) as error:
        check_gpu_requests(config, cluster)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_nothing_is_refused_without_use_gpu_or_when_node_types_may_be_missing():
    check_gpu_requests(experiment(retrain_workers=64), NO_GPU)  # CPU requests are checked elsewhere
    unknown = ClusterShape(NO_GPU.node_types, where="the cluster (its nodes now)", complete=False)
    check_gpu_requests(experiment(retrain_workers=8, use_gpu=True, workers_per_trial=4), unknown)


def test_bf16_is_refused_on_a_gpu_without_it_and_left_to_trial_start_where_the_gpu_is_not_here():
    bf16 = ResourcesConfig(use_gpu=True, precision="bf16")
    with pytest.raises(ConfigError, match=r"resources.precision: got 'bf16'; this machine's GPU has no bf16 .*"
                                          r"allowed here: fp32"):
        check_precision(bf16, cuda_available=True, bf16_supported=False)
    assert check_precision(bf16, cuda_available=True, bf16_supported=True) is None
    assert "checked when each trial starts" in check_precision(bf16, cuda_available=False, bf16_supported=None)
    assert check_precision(ResourcesConfig(use_gpu=True), cuda_available=True, bf16_supported=False) is None
    assert check_precision(ResourcesConfig(precision="bf16"), cuda_available=False, bf16_supported=None) is None


def test_num_gpus_is_a_count_of_zero_or_more():
    assert ResourcesConfig(num_gpus=0).num_gpus == 0
    with pytest.raises(ConfigError, match=r"resources.num_gpus: got -1; allowed range is \[0, inf\]"):
        ResourcesConfig(num_gpus=-1)
