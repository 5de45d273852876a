"""The Ray requests of a GPU run fit the node types of every cluster config in clusters/: the retrain's and the
baseline's bundles, the trials' Ray Train workers (pf_ray/launch/resources.py).

Before, on clusters/aws.yaml each retrain worker asked for the head's 8 CPUs and a GPU, which no g5.xlarge
(4 vCPUs, 1 GPU) offers: the retrain would have waited for ever.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pf_ray.config import ExperimentConfig, load_experiment
from pf_ray.launch.cluster import node_types_from_launcher
from pf_ray.launch.resources import ClusterShape, NodeType, check_gpu_requests, ray_requests

CLUSTERS = Path(__file__).resolve().parents[2] / "clusters"
# What `ray up` fills in on AWS from the EC2 API (the YAML leaves resources empty); from AWS's instance type pages.
EC2_INSTANCE_TYPES = {"m5.2xlarge": {"CPU": 8}, "g5.xlarge": {"CPU": 4, "GPU": 1}}


def launcher_shape(name: str) -> ClusterShape:
    """A cluster-launcher YAML's node types, resources filled in as ``ray up`` does for the head's bootstrap file."""
    launcher = yaml.safe_load((CLUSTERS / name).read_text())
    for node_type in launcher["available_node_types"].values():
        instance = node_type["node_config"].get("InstanceType")
        if instance is not None:  # AWS: detected from the instance type
            node_type["resources"] = {**EC2_INSTANCE_TYPES[instance], **(node_type.get("resources") or {})}
    return ClusterShape(node_types_from_launcher(launcher), where=name)


def _kuberay_group(name: str, group: dict[str, Any], max_count: int) -> NodeType:
    """A KubeRay group as Ray sees it: rayStartParams num-cpus / num-gpus, else the container's requests."""
    params = group.get("rayStartParams") or {}
    requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    cpus = float(params.get("num-cpus", requests.get("cpu", 0)))
    gpus = float(params.get("num-gpus", requests.get("nvidia.com/gpu", 0)))
    return NodeType(name, cpus=cpus, gpus=gpus, max_count=max_count)


def kuberay_shape(name: str) -> ClusterShape:
    docs = [doc for doc in yaml.safe_load_all((CLUSTERS / name).read_text()) if doc]
    ray_object = next(doc for doc in docs if doc.get("kind") in ("RayCluster", "RayJob"))
    spec = ray_object["spec"]["rayClusterSpec"] if ray_object["kind"] == "RayJob" else ray_object["spec"]
    types = [_kuberay_group("head", spec["headGroupSpec"], 1)]
    types += [_kuberay_group(group["groupName"], group, int(group["maxReplicas"]))
              for group in spec["workerGroupSpecs"]]
    return ClusterShape(tuple(types), where=name)


SHAPES = {
    "aws.yaml": lambda: launcher_shape("aws.yaml"),
    "gcp.yaml": lambda: launcher_shape("gcp.yaml"),
    "kuberay/raycluster.yaml": lambda: kuberay_shape("kuberay/raycluster.yaml"),
    "kuberay/rayjob.yaml": lambda: kuberay_shape("kuberay/rayjob.yaml"),
}
# Every GPU cluster config is covered (fake_multinode.yaml is the CPU-only local autoscaling test's).
assert sorted(SHAPES) == sorted(str(path.relative_to(CLUSTERS)) for path in CLUSTERS.rglob("*.yaml")
                                if path.name != "fake_multinode.yaml")


def documented_command(name: str) -> ExperimentConfig:
    """The experiment the YAML's own header submits (`pf-ray compress ... --set ...`), retrain on all 8 GPUs."""
    overrides = re.findall(r"--set\s+([\w.]+=[^\s\\]+)", (CLUSTERS / name).read_text())
    assert "resources.use_gpu=true" in overrides, overrides
    return load_experiment(None, [*overrides, "retrain.num_workers=8"])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_gpu_request_of_the_documented_run_fits_a_gpu_node_type(name):
    shape = SHAPES[name]()
    assert shape.gpu_types, f"{name}: no GPU node type"
    config = documented_command(name)
    check_gpu_requests(config, shape)  # nothing refused
    requests = ray_requests(config, shape)
    bundles = {"retrain worker": requests.retrain_workers[0], "baseline": requests.baseline,
               "trial worker": requests.trial_workers[0]}
    for what, bundle in bundles.items():
        assert bundle["GPU"] == 1.0, (name, what, bundle)
        fits = [node.name for node in shape.gpu_types if bundle["CPU"] <= node.cpus and bundle["GPU"] <= node.gpus]
        assert fits == [node.name for node in shape.gpu_types], f"{name}: the {what} {bundle} fits only {fits}"


@pytest.mark.parametrize(("name", "cpus_per_worker"), [("aws.yaml", 4), ("gcp.yaml", 8),
                                                       ("kuberay/raycluster.yaml", 8), ("kuberay/rayjob.yaml", 8)])
def test_retrain_workers_take_the_gpu_nodes_cpus_not_the_heads(name, cpus_per_worker):
    shape = SHAPES[name]()
    requests = ray_requests(documented_command(name), shape)
    assert requests.retrain_cpus_per_worker == cpus_per_worker
    head = shape.node_types[0]
    before = {"CPU": head.cpus, "GPU": 1.0}  # what the retrain asked for before: the head's CPU count
    fits_before = any(before["CPU"] <= node.cpus for node in shape.gpu_types)
    assert fits_before == (name != "aws.yaml")  # the review's finding: only aws.yaml's retrain could never start


def test_aws_types_are_read_as_ray_up_fills_them_in():
    shape = launcher_shape("aws.yaml")
    assert shape.node_types == (NodeType("head", cpus=8), NodeType("gpu_spot", cpus=4, gpus=1, max_count=8))
    assert shape.max_gpus == 8
