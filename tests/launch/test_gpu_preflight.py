"""GPU requests that could never be granted end ``pf-ray compress`` with one line and exit 2, before anything trains
or is written; ones that fit pass. A local Ray's GPUs are known before it starts (resources.num_gpus, else what
CUDA sees: none on these machines); a remote cluster's once connected (its autoscaler's node types)."""

from __future__ import annotations

import os

import pytest
import yaml

import pf_ray.launch.cluster as cluster
from pf_ray.cli import EXIT_BAD_INPUT, main
from pf_ray.config import load_experiment
from pf_ray.errors import ConfigError
from pf_ray.launch.preflight import preflight


def _overrides(tmp_path, *extra: str) -> list[str]:
    return [f"storage.path={tmp_path / 'runs'}", "dataset.name=digits", "resources.num_cpus=2", *extra]


def _compress(tmp_path, *extra: str) -> list[str]:
    argv = ["compress"]
    for override in _overrides(tmp_path, *extra):
        argv += ["--set", override]
    return argv


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(folder, name), root)
                  for folder, _, names in os.walk(root) for name in names)


@pytest.mark.parametrize(("overrides", "expected"), [
    pytest.param(("resources.use_gpu=true", "resources.num_gpus=0"),
                 "resources.use_gpu: got true; the local Ray (resources.num_gpus 0) has no GPU", id="num-gpus-0"),
    pytest.param(("resources.use_gpu=true",),
                 "resources.use_gpu: got true; the local Ray (GPUs detected by CUDA here) has no GPU",
                 id="none-detected"),
    pytest.param(("resources.use_gpu=true", "resources.num_gpus=1", "resources.workers_per_trial=2"),
                 "resources.workers_per_trial: got 2 Ray Train workers of 1 GPU each; the local Ray "
                 "(resources.num_gpus 1) has at most 1 GPU", id="more-trial-workers-than-gpus"),
    pytest.param(("resources.use_gpu=true", "resources.num_gpus=1", "retrain.num_workers=2"),
                 "retrain.num_workers: got 2 Ray Train workers of 1 GPU each (resources.use_gpu); the local Ray "
                 "(resources.num_gpus 1) has at most 1 GPU", id="more-retrain-workers-than-gpus"),
    pytest.param(("resources.use_gpu=true", "resources.num_gpus=1", "resources.cpus_per_trial=3"),
                 "resources.cpus_per_trial: got 3 with 1 GPU per trial; no GPU node offers both",
                 id="trial-cpus-beyond-the-gpu-node"),
])
def test_an_impossible_gpu_request_is_one_line_and_exit_2(tmp_path, capfd, overrides, expected):
    if "resources.num_gpus=0" not in overrides and "resources.num_gpus=1" not in overrides:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    code = main(_compress(tmp_path, *overrides))
    _, err = capfd.readouterr()
    assert code == EXIT_BAD_INPUT, err
    assert err.splitlines() == [f"pf-ray: error: {err.strip().removeprefix('pf-ray: error: ')}"], err
    assert expected in err, err
    assert _files(tmp_path) == []  # no run folder, no baseline


@pytest.mark.parametrize("overrides", [
    ("resources.use_gpu=true", "resources.num_gpus=1"),
    ("resources.use_gpu=true", "resources.num_gpus=1", "resources.gpus_per_trial=0.25", "resources.precision=bf16"),
    ("resources.use_gpu=true", "resources.num_gpus=2", "resources.num_cpus=4", "resources.workers_per_trial=2",
     "retrain.num_workers=2"),
])
def test_a_gpu_request_that_fits_passes_preflight(tmp_path, overrides):
    lines: list[str] = []
    prepared = preflight(load_experiment(None, _overrides(tmp_path, *overrides)), log=lines.append)
    assert prepared.config.resources.use_gpu
    if "resources.precision=bf16" in overrides:  # no CUDA here: the GPUs' bf16 is checked where they are
        assert any("bf16" in line and "checked when each trial starts" in line for line in lines), lines
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------------------
# A remote cluster (resources.ray_address): checked once connected, against its node types.

GPU_LESS_LAUNCHER = {"max_workers": 4, "head_node_type": "head", "available_node_types": {
    "head": {"resources": {"CPU": 8}}, "cpu_workers": {"resources": {"CPU": 16}, "max_workers": 4}}}
GPU_LAUNCHER = {"max_workers": 2, "head_node_type": "head", "available_node_types": {
    "head": {"resources": {"CPU": 8}}, "gpu": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 4}}}


def _remote(*extra: str):
    return load_experiment(None, ["resources.ray_address=auto", "resources.use_gpu=true", *extra])


@pytest.mark.ray
def test_a_remote_cluster_is_checked_against_the_launchers_node_types(ray_session, tmp_path, monkeypatch):
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    monkeypatch.setattr(cluster, "BOOTSTRAP_CONFIG", str(bootstrap))
    lines: list[str] = []
    bootstrap.write_text(yaml.safe_dump(GPU_LESS_LAUNCHER))
    with pytest.raises(ConfigError, match=r"resources.use_gpu: got true; the cluster \(the node types of .*\) has "
                                          r"no GPU"):
        cluster.check_cluster(_remote("resources.workers_per_trial=2"), log=lines.append)
    bootstrap.write_text(yaml.safe_dump(GPU_LAUNCHER))  # 2 GPU workers at most (the cluster's max_workers)
    cluster.check_cluster(_remote("resources.workers_per_trial=2", "retrain.num_workers=2"), log=lines.append)
    with pytest.raises(ConfigError, match=r"retrain.num_workers: got 3 .* has at most 2 GPUs \(gpu: 4 CPUs, 1 GPU, "
                                          r"up to 2 nodes\)"):
        cluster.check_cluster(_remote("resources.workers_per_trial=2", "retrain.num_workers=3"), log=lines.append)
    assert cluster.live_shape(_remote()).complete


@pytest.mark.ray
def test_a_remote_cluster_is_checked_against_its_autoscalers_reported_node_types(ray_session, monkeypatch):
    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    reported = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 8}, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, max_count=8)])
    monkeypatch.setattr(state, "get_cluster_config", lambda: reported)
    shape = cluster.live_shape(_remote())
    assert shape.max_gpus == 8 and [node.name for node in shape.gpu_types] == ["gpu"]
    cluster.check_cluster(_remote("resources.workers_per_trial=2", "retrain.num_workers=8"), log=print)
    with pytest.raises(ConfigError, match=r"resources.workers_per_trial: got 9 .* the cluster \(its autoscaler's "
                                          r"node types\) has at most 8 GPUs"):
        cluster.check_cluster(_remote("resources.workers_per_trial=9"), log=print)


@pytest.mark.ray
def test_a_remote_cluster_whose_node_types_are_unknown_is_not_refused(ray_session, tmp_path, monkeypatch):
    """The test Ray has no GPU, but an autoscaler that reports nothing might add GPU nodes: say so, refuse nothing."""
    monkeypatch.setattr(cluster, "BOOTSTRAP_CONFIG", str(tmp_path / "absent.yaml"))
    lines: list[str] = []
    cluster.check_cluster(_remote("resources.workers_per_trial=2"), log=lines.append)
    assert any("node types are unknown" in line and "not checked" in line for line in lines), lines


def test_resume_checks_the_gpus_of_the_local_ray_it_will_start(tmp_path):
    """A run started where there were GPUs, resumed on a machine without: refused before Ray starts."""
    from pf_ray.launch.resume import resume
    from pf_ray.storage import write_run_config
    from pf_ray.strict import to_dict

    config = load_experiment(None, _overrides(tmp_path, "resources.use_gpu=true", "resources.num_gpus=0"))
    run_dir = tmp_path / "runs" / "interrupted"
    run_dir.mkdir(parents=True)
    write_run_config(run_dir, to_dict(config))
    with pytest.raises(ConfigError, match=r"resources.use_gpu: got true; the local Ray \(resources.num_gpus 0\) has "
                                          r"no GPU"):
        resume(run_dir, log=lambda line: None)
