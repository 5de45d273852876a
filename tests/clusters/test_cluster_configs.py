"""The cluster configurations in clusters/ and the security rules they and the code must keep.

(a) every cluster-launcher YAML passes Ray's own validation; (b) the KubeRay manifests autoscale from zero with
autoscaler v2 and token auth; (c) no configuration opens Ray beyond loopback or turns token auth off; (d) every
``torch.load`` in the code refuses pickled objects (``weights_only=True``). See docs/security.md.
"""

from __future__ import annotations

import ast
import copy
import ipaddress
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
LAUNCHER_YAMLS = ("aws.yaml", "gcp.yaml")
FAKE_YAML = "fake_multinode.yaml"
KUBERAY_YAMLS = ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml")
SOURCE_DIRS = ("pf_ray", "trainables", "search_algs", "bench")

RAY_VERSION = "2.60.0"
DRIVER_RESOURCE = "pf_ray_driver"  # resources.driver_resource: only the head offers it
DASHBOARD_PORT = 8265
RAY_PODS = {"ray.io/is-ray-node": "yes"}  # KubeRay's label on every Ray pod
OPERATOR_PODS = {"app.kubernetes.io/name": "kuberay-operator"}  # the KubeRay operator's pods (Helm chart)
IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
IPV6_ANY = re.compile(r"(?<![\w:])::(?!\w)")  # "::" or "[::]", the IPv6 any-address (not "DPkg::Lock")


def _launcher(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _manifests(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((CLUSTERS / name).read_text()) if doc]


def _ray_object(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The one RayCluster or RayJob of a manifest file."""
    objects = [doc for doc in docs if doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")]
    assert len(objects) == 1, f"expected one RayCluster or RayJob, got {[doc['kind'] for doc in docs]}"
    return objects[0]


def _cluster_spec(ray_object: dict[str, Any]) -> dict[str, Any]:
    spec = ray_object["spec"]
    return spec["rayClusterSpec"] if ray_object["kind"] == "RayJob" else spec


def _containers(cluster_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster_spec["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def _start_commands(config: dict[str, Any], key: str) -> list[str]:
    """The commands of head_start_ray_commands / worker_start_ray_commands that start Ray."""
    return [command for command in config[key] if "ray start" in command]


def _strings(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every string in a parsed YAML document (comments are not values: they cannot bind anything)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*path, str(index)))
    elif isinstance(value, str):
        yield path, value


def _all_yaml_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(CLUSTERS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


# --------------------------------------------------------------------------------------------------------------
# (a) Cluster-launcher YAMLs: Ray's own validation, and the layout pf-ray relies on.


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_passes_ray_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before touching the cloud: merge the provider's defaults, then check ray-schema.json
    # (no unknown keys, types) and Ray's consistency rules (head type exists, min_workers within max_workers).
    config = _launcher(name)
    prepared = prepare_config(copy.deepcopy(config))
    assert validate_config(prepared) is None
    # the merge kept ours: provider, head type and every node type's resources and bounds
    assert prepared["provider"]["type"] == config["provider"]["type"]
    assert prepared["head_node_type"] == config["head_node_type"]
    for type_name, node in config["available_node_types"].items():
        merged = prepared["available_node_types"][type_name]
        assert merged["resources"] == node["resources"], type_name
        for bound in ("min_workers", "max_workers"):
            if bound in node:
                assert merged[bound] == node[bound], (type_name, bound)
    # and the validation can fail: the same file with an unknown key, or a head type that does not exist
    for broken in ({**config, "not_a_ray_field": 1}, {**config, "head_node_type": "no_such_type"}):
        with pytest.raises((ValueError, KeyError, jsonschema.ValidationError)):
            validate_config(prepare_config(copy.deepcopy(broken)))


def test_fake_multinode_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import validate_config

    config = _launcher(FAKE_YAML)
    assert config["provider"]["gcs_address"] == "127.0.0.1:GCS_PORT"  # the placeholder the tests fill in
    config["provider"]["gcs_address"] = "127.0.0.1:6379"
    # Not prepare_config: the 2.60 wheel does not ship the fake provider's defaults file, and the autoscaler
    # that `ray start --autoscaling-config` runs does not merge defaults either; the file is complete as it is.
    validate_config(config)


@pytest.mark.parametrize("name", LAUNCHER_YAMLS)
def test_launcher_yaml_layout(name):
    config = _launcher(name)
    assert config["provider"]["use_internal_ips"] is True
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"][DRIVER_RESOURCE] == 1000
    workers = {type_name: node for type_name, node in node_types.items() if type_name != config["head_node_type"]}
    assert workers, "no worker node type"
    for worker_name, worker in workers.items():
        assert DRIVER_RESOURCE not in worker["resources"], f"{worker_name}: drivers must stay on the head"
        assert worker["min_workers"] == 0 and worker["max_workers"] > 0, worker_name
        node_config = worker["node_config"]
        if config["provider"]["type"] == "aws":
            assert node_config["InstanceMarketOptions"]["MarketType"] == "spot", worker_name
        else:
            assert node_config["scheduling"]["preemptible"] is True, worker_name
    assert any(f'"ray[default,tune,train]=={RAY_VERSION}"' in command for command in config["setup_commands"])
    assert any("~/pf-ray" in command and "pip install" in command for command in config["setup_commands"])


def test_fake_multinode_yaml_follows_the_recipe():
    config = _launcher(FAKE_YAML)
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    for key in ("use_node_id_as_ip", "disable_node_updaters", "disable_launch_config_check"):
        assert provider[key] is True, key
    assert config["auth"]["ssh_user"]  # without it the fake launcher dies with KeyError 'auth'
    assert config["idle_timeout_minutes"] == 0.2
    assert config["available_node_types"][config["head_node_type"]]["resources"][DRIVER_RESOURCE] == 1000
    workers = [node for name, node in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(node["min_workers"] == 0 for node in workers)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands", "initialization_commands"):
        assert config[key] == [], key


# --------------------------------------------------------------------------------------------------------------
# (b) KubeRay manifests.


@pytest.mark.parametrize("name", KUBERAY_YAMLS)
def test_kuberay_manifest_autoscales_from_zero_with_v2_and_token_auth(name):
    ray_object = _ray_object(_manifests(name))
    spec = _cluster_spec(ray_object)
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    # KubeRay sets RAY_enable_autoscaler_v2 itself for version v2, and rejects a spec that also sets it.
    head_env = {env["name"] for container in spec["headGroupSpec"]["template"]["spec"]["containers"]
                for env in container.get("env", [])}
    assert "RAY_enable_autoscaler_v2" not in head_env
    assert spec["authOptions"]["mode"] == "token"

    head_params = spec["headGroupSpec"]["rayStartParams"]
    # KubeRay pastes rayStartParams into a shell command: the value is a shell-quoted JSON object.
    head_resources = json.loads(shlex.split(head_params["resources"])[0])
    assert head_resources == {DRIVER_RESOURCE: 1000}
    assert int(head_params["num-cpus"]) > 0
    gpu_groups = [group for group in spec["workerGroupSpecs"]
                  if group["minReplicas"] == 0 and group["maxReplicas"] > 0
                  and all("nvidia.com/gpu" in container["resources"]["limits"]
                          for container in group["template"]["spec"]["containers"])]
    assert gpu_groups, "no GPU worker group scaling from minReplicas 0"
    for container in _containers(spec):
        assert RAY_VERSION in container["image"], container["image"]


def test_rayjob_runs_pf_ray_on_the_cluster():
    job = _ray_object(_manifests("kuberay/rayjob.yaml"))
    assert job["kind"] == "RayJob"
    assert job["spec"]["submissionMode"] == "SidecarMode"  # submitted from the head pod: no submitter pod
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:2] == ["pf-ray", "compress"]
    settings = {entrypoint[i + 1] for i, word in enumerate(entrypoint) if word == "--set"}
    assert any(setting.startswith("storage.path=s3://") for setting in settings)
    assert {"resources.ray_address=auto", f"resources.driver_resource={DRIVER_RESOURCE}"} <= settings


# --------------------------------------------------------------------------------------------------------------
# (c) Security: loopback, token authentication.


def _dashboard_reachable_only_by_operator(docs: list[dict[str, Any]], head_labels: dict[str, str]) -> bool:
    """True if a NetworkPolicy in ``docs`` selects the head pods and lets only Ray pods of the namespace and the
    KubeRay operator (dashboard port only) in."""
    for policy in (doc for doc in docs if doc["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        policy_types = policy["spec"].get("policyTypes", ["Ingress"])
        if not selector or selector.items() - head_labels.items() or "Ingress" not in policy_types:
            continue
        operator_rules = 0
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            if not peers:  # a rule without `from` admits every source
                return False
            for peer in peers:
                if peer == {"podSelector": {"matchLabels": RAY_PODS}}:
                    continue
                only_dashboard = rule.get("ports") == [{"port": DASHBOARD_PORT, "protocol": "TCP"}]
                is_operator = set(peer) <= {"podSelector", "namespaceSelector"} and \
                    peer.get("podSelector") == {"matchLabels": OPERATOR_PODS}
                if not (is_operator and only_dashboard):
                    return False
                operator_rules += 1
        return operator_rules > 0
    return False


def test_every_head_serves_the_dashboard_on_loopback_only():
    heads = 0
    for name in LAUNCHER_YAMLS:
        commands = _start_commands(_launcher(name), "head_start_ray_commands")
        assert commands, f"{name}: no `ray start` among head_start_ray_commands"
        for command in commands:
            heads += 1
            assert "--dashboard-host=127.0.0.1" in command.split(), f"{name}: {command!r}"
    for name in KUBERAY_YAMLS:
        docs = _manifests(name)
        ray_object = _ray_object(docs)
        head = _cluster_spec(ray_object)["headGroupSpec"]
        host = head["rayStartParams"].get("dashboard-host")  # absent = KubeRay's default, 0.0.0.0
        heads += 1
        if host == "127.0.0.1":
            continue
        # The one exception: the KubeRay operator follows a RayJob through the dashboard's HTTP API from its own
        # pod. Allowed only behind a NetworkPolicy that admits nobody else to that port.
        head_labels = head["template"].get("metadata", {}).get("labels", {})
        assert ray_object["kind"] == "RayJob" and _dashboard_reachable_only_by_operator(docs, head_labels), \
            f"{name}: dashboard-host {host!r} without a NetworkPolicy limiting it to the KubeRay operator"
    assert heads == len(LAUNCHER_YAMLS) + len(KUBERAY_YAMLS)


def test_no_configuration_binds_ray_beyond_loopback():
    for path, doc in _all_yaml_documents():
        for where, text in _strings(doc):
            if where[-1:] == ("dashboard-host",):  # every head's dashboard-host is checked by the test above
                continue
            location = f"{path.relative_to(REPO)}: {'.'.join(where)} = {text!r}"
            assert not IPV6_ANY.search(text), location
            for address in IPV4.findall(text):
                assert ipaddress.ip_address(address).is_loopback, location


def test_token_authentication_is_on_in_every_real_cluster():
    for name in LAUNCHER_YAMLS:
        config = _launcher(name)
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            commands = _start_commands(config, key)
            assert commands, f"{name}: no `ray start` among {key}"
            for command in commands:
                assert re.search(r"(^|[\s;])RAY_AUTH_MODE=token\s+ray start\b", command), f"{name}: {command!r}"
        # The token made by `ray get-auth-token --generate`, copied to every node.
        assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for name in KUBERAY_YAMLS:
        assert _cluster_spec(_ray_object(_manifests(name)))["authOptions"]["mode"] == "token", name


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dicts(item)


def test_no_file_turns_token_authentication_off():
    # The fake multi-node YAML has no commands: its tests choose the mode of the processes they start.
    shell_form = re.compile(r"RAY_AUTH_MODE\s*=\s*[\"']?disabled", re.IGNORECASE)
    for path in sorted(p for p in CLUSTERS.rglob("*") if p.is_file()):
        assert not shell_form.search(path.read_text()), path
    for path, doc in _all_yaml_documents():
        for mapping in _dicts(doc):
            if mapping.get("name") == "RAY_AUTH_MODE":  # a container's env entry
                assert mapping.get("value") == "token", f"{path}: {mapping}"
            if "RAY_AUTH_MODE" in mapping:
                assert mapping["RAY_AUTH_MODE"] == "token", f"{path}: {mapping}"
            if "authOptions" in mapping:
                assert mapping["authOptions"].get("mode", "token") == "token", f"{path}: {mapping['authOptions']}"


# --------------------------------------------------------------------------------------------------------------
# (d) Checkpoints are loaded without unpickling objects.


def _torch_load_calls(tree: ast.AST) -> Iterator[ast.Call]:
    """Calls of torch.load, also through `from torch import load [as name]` or `import torch as alias`."""
    torch_names = {"torch"}
    load_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {alias.asname or alias.name for alias in node.names if alias.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            load_names |= {alias.asname or alias.name for alias in node.names if alias.name == "load"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name)
                and func.value.id in torch_names) or (isinstance(func, ast.Name) and func.id in load_names):
            yield node


def _passes_weights_only(call: ast.Call) -> bool:
    return any(keyword.arg == "weights_only" and isinstance(keyword.value, ast.Constant)
               and keyword.value.value is True for keyword in call.keywords)


def test_every_torch_load_passes_weights_only_true():
    calls, offenders = 0, []
    for directory in SOURCE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            for call in _torch_load_calls(ast.parse(path.read_text(), filename=str(path))):
                calls += 1
                if not _passes_weights_only(call):
                    offenders.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert calls > 0, "found no torch.load at all: is the search looking in the right places?"
    assert not offenders, f"torch.load without weights_only=True (would unpickle objects): {offenders}"


def test_the_source_check_sees_through_comments_and_aliases():
    """The AST check cannot be satisfied by a comment, and follows import aliases."""
    source = ("import torch as t\nfrom torch import load as grab\n"
              "t.load('a')  # weights_only=True\ngrab('b', weights_only=False)\nt.load('c', weights_only=True)\n")
    calls = list(_torch_load_calls(ast.parse(source)))
    assert [call.lineno for call in calls if not _passes_weights_only(call)] == [3, 4]
    assert len(calls) == 3
