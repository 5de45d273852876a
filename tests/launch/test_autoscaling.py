"""Autoscaling end to end on a fake multi-node cluster (clusters/fake_multinode.yaml): 0 workers -> N -> 0.

The cluster is a `ray start --head --block` subprocess of its own on 127.0.0.1 (not this pytest process's Ray),
in a session of its own (setsid), stopped by signals to its pid and process group: never `ray stop`, which
would stop every Ray of the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

FAKE_CLUSTER_YAML = Path(__file__).resolve().parents[2] / "clusters" / "fake_multinode.yaml"
NUM_TRIALS = 4

# Run in a subprocess connected to the fake cluster. pf-ray's cluster pattern in small: each Tune trial (a
# driver) reserves a sliver of `pf_ray_driver`, which only the head offers, and runs its work as a task that needs
# `fake_worker`, which only the worker type offers, so the work is pending until workers start. Then it waits for
# the scale-down, and prints one JSON line: alive nodes at the start, the most seen, the count at the end, and
# where the trials and their tasks ran.
DRIVER_SCRIPT = """
import json, sys, threading, time
import ray
from ray import tune

address, storage, num_trials, scale_down_timeout_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)

def alive_nodes():
    return [node["NodeID"] for node in ray.nodes() if node["Alive"]]

start_nodes = alive_nodes()
most_alive, done = [len(start_nodes)], threading.Event()
def watch():
    while not done.wait(0.5):
        most_alive[0] = max(most_alive[0], len(alive_nodes()))
threading.Thread(target=watch, daemon=True).start()

@ray.remote(num_cpus=1, resources={"fake_worker": 1})
def work():
    time.sleep(2)
    return ray.get_runtime_context().get_node_id()

def trial(config):
    # "DEFAULT": outside the trial's placement group (as Ray Train's workers are), so it can go to a worker.
    task_node = ray.get(work.options(scheduling_strategy="DEFAULT").remote())
    tune.report({"driver_node": ray.get_runtime_context().get_node_id(), "task_node": task_node})

tuner = tune.Tuner(
    tune.with_resources(trial, {"cpu": 0.25, "pf_ray_driver": 0.001}),
    param_space={"i": tune.grid_search(list(range(num_trials)))},
    run_config=tune.RunConfig(storage_path=storage, name="autoscale", verbose=0),
)
results = tuner.fit()
done.set()
errors = [str(result.error)[-500:] for result in results if result.error is not None]
driver_nodes = sorted({result.metrics["driver_node"] for result in results if result.error is None})
task_nodes = sorted({result.metrics["task_node"] for result in results if result.error is None})

deadline = time.monotonic() + scale_down_timeout_s
while len(alive_nodes()) > 1 and time.monotonic() < deadline:
    time.sleep(1)
print(json.dumps({"start_nodes": start_nodes, "most_alive": most_alive[0], "end_alive": len(alive_nodes()),
                  "trials": len(results), "errors": errors, "driver_nodes": driver_nodes, "task_nodes": task_nodes}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow  # about 75 s: `make test-slow`
def test_workers_scale_up_from_zero_and_back_down(tmp_path):
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not on PATH")
    port = _free_port()
    config = yaml.safe_load(FAKE_CLUSTER_YAML.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config_path = tmp_path / "fake_multinode.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_resources = dict(config["available_node_types"][config["head_node_type"]]["resources"])
    head_cpus = head_resources.pop("CPU")

    # Unix socket paths must stay under ~107 characters: a short temp dir, not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="pfr", dir="/tmp")
    # Token authentication on, as on the real clusters: a throwaway token in the environment of the head (and so
    # of the autoscaler and the fake workers it starts) and of the driver; nothing is written to ~/.ray.
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    head = subprocess.Popen(
        ["setsid", "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--num-cpus={head_cpus}", f"--resources={json.dumps(head_resources)}", "--include-dashboard=false",
         f"--autoscaling-config={config_path}", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER_SCRIPT, f"127.0.0.1:{port}", str(tmp_path / "tune"), str(NUM_TRIALS), "60"],
            env=env, capture_output=True, text=True, timeout=150,
        )
        assert driver.returncode == 0, driver.stderr[-3000:]
        seen = json.loads(driver.stdout.strip().splitlines()[-1])
        assert seen["trials"] == NUM_TRIALS and not seen["errors"], seen["errors"]
        assert len(seen["start_nodes"]) == 1, f"workers before any demand (min_workers is 0): {seen}"
        head_node = seen["start_nodes"][0]
        assert seen["most_alive"] > 1, f"no worker node started: {seen}"
        assert seen["driver_nodes"] == [head_node], f"trial drivers ran off the head: {seen}"
        assert head_node not in seen["task_nodes"], f"work ran on the head: {seen}"
        assert seen["end_alive"] == 1, f"workers not removed after the idle timeout: {seen}"
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the head's processes on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        # Fake worker nodes still up (say, after a failed scale-down) are not the head's children and outlive it
        # (seen). setsid made the head's pid the id of a process group that holds only this cluster: end it all.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
