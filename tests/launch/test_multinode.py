"""Searches on a simulated three-node cluster (`ray.cluster_utils.Cluster`, every node on 127.0.0.1).

1. Trials spread over the nodes, and a local storage path is refused on a multi-node cluster unless it is
   declared shared.
2. A node holding a Ray Train worker of a running trial is removed without warning: the worker group restarts
   (on a replacement node, as an autoscaler would start one) from the trial's last epoch checkpoint, and the
   search completes.

Each runs in a subprocess: this pytest process may already hold a Ray of its own (the ``ray_session`` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]

COMMON = r"""
import glob, json, os, sys, threading, time
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
from pathlib import Path
import ray
from ray.cluster_utils import Cluster

from pf_ray.candidate import search_space
from pf_ray.checkpoint import save_checkpoint
from pf_ray.config import ExperimentConfig, from_dict
from pf_ray.data import load_data
from pf_ray.errors import ConfigError
from pf_ray.launch.cluster import check_storage
from pf_ray.launch.search import run_search
from pf_ray.models import build_model
from pf_ray.spec import RunSpec

out = Path(sys.argv[1])
# A lost node is noticed within about 3 s (the defaults take 30 s or more).
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": {
    "health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)

def experiment(**overrides):
    spec = {"model": {"name": "resnet20"}, "dataset": {"name": "synthetic"},
            "learner": {"name": "channel_pruning", "options": {"round_to": 4, "num_batches": 2}},
            "search": {"algorithm": "random", "num_trials": 3, "validation_subset": 64, "budget": "macs",
                       "fine_tune": {"epochs": 2, "batch_size": 64, "train_subset": 128}},
            "storage": {"path": str(out / "runs"), "shared": True}}
    for key, value in overrides.items():
        section, field = key.split(".")
        spec.setdefault(section, {})[field] = value
    return from_dict(ExperimentConfig, spec)

config = experiment()
data = load_data(config.dataset)
model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
baseline = save_checkpoint(out / "baseline.pt", model, model_config=config.model, input_shape=data.input_shape,
                           num_classes=data.num_classes)
space = search_space(RunSpec.resolve(config), model, data.input_shape)

def actor_nodes(class_name):
    from ray._private.state import actors  # the GCS's actor table (no dashboard needed)
    return sorted({a["Address"]["NodeID"] for a in actors().values() if a["ActorClassName"] == class_name})
"""

SPREAD = COMMON + r"""
refused = None
try:
    check_storage(experiment(**{"storage.shared": False}))
except ConfigError as error:
    refused = str(error)
seen, done = set(), threading.Event()
def watch():  # which nodes host the trials' actors while the search runs
    while not done.wait(0.3):
        seen.update(actor_nodes("ImplicitFunc"))
threading.Thread(target=watch, daemon=True).start()
trials = run_search(RunSpec.resolve(config), space, baseline, out / "runs" / "spread", log=lambda line: None)
done.set()
print(json.dumps({"refused": refused, "trial_nodes": sorted(seen), "nodes": len(ray.nodes()),
                  "errors": [t["error"] for t in trials], "epochs": [t["epoch"] for t in trials]}), flush=True)
ray.shutdown()
cluster.shutdown()
"""

NODE_LOSS = COMMON + r"""
# One trial fine-tuned by two Ray Train workers: its driver takes a quarter CPU of the head, so the two 1-CPU
# workers go to the two worker nodes.
config = experiment(**{"search.num_trials": 1, "resources.workers_per_trial": 2,
                       "search.fine_tune": {"epochs": 3, "batch_size": 64, "train_subset": 128}})
run_dir = out / "runs" / "loss"
# The search runs in a thread; the main thread removes the node (Ray adds a node only from the main thread).
found = {}
search = threading.Thread(target=lambda: found.update(trials=run_search(RunSpec.resolve(config), space, baseline,
                                                                        run_dir, log=lambda line: None)))
search.start()
removed = {}
deadline = time.monotonic() + 300
while search.is_alive() and time.monotonic() < deadline:
    checkpoints = glob.glob(str(run_dir / "search" / "*" / "train" / "*" / "checkpoint_*"))
    hosts = actor_nodes("RayTrainWorker")
    victims = [node for node in workers if node.node_id in hosts]
    if checkpoints and victims:  # an epoch is checkpointed and a worker runs on a node we may remove
        removed["node"] = victims[0].node_id
        removed["after_checkpoints"] = len(checkpoints)
        cluster.remove_node(victims[0], allow_graceful=False)
        cluster.add_node(num_cpus=1)  # the replacement an autoscaler would start
        break
    time.sleep(0.2)
search.join()
trials = found["trials"]
[trial] = trials
results = [json.loads(line) for line in
           (run_dir / "search" / trial["trial_id"] / "result.json").read_text().splitlines()]
print(json.dumps({"removed": removed, "error": trial["error"], "epochs": [r["epoch"] for r in results]}),
      flush=True)
ray.shutdown()
cluster.shutdown()
"""


def _run(script: str, tmp_path: Path) -> dict:
    # A Ray temp folder of its own: `Cluster` records its address in <temp>/ray_current_cluster, where another
    # `ray.init(address="auto")` on this machine would otherwise find it. Short: Unix socket paths are limited.
    ray_tmp = tempfile.mkdtemp(prefix="pfc", dir="/tmp")
    try:
        completed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True,
                                   text=True, timeout=600,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert completed.returncode == 0, completed.stderr[-4000:]
    # Ray's processes may print after the script's JSON line: take the script's own line.
    return json.loads(next(line for line in reversed(completed.stdout.splitlines()) if line.startswith('{"')))


def test_trials_spread_over_nodes_and_a_local_path_needs_to_be_shared(tmp_path):
    seen = _run(SPREAD, tmp_path)
    assert seen["refused"].startswith("storage.path: ") and "the Ray cluster has 3 nodes" in seen["refused"]
    assert seen["errors"] == [None, None, None] and all(1 <= epoch <= 2 for epoch in seen["epochs"])
    assert len(seen["trial_nodes"]) >= 2, f"every trial ran on one node: {seen}"


@pytest.mark.slow  # about 70 s: `make test-slow`
def test_a_lost_node_restarts_the_train_workers_from_the_last_checkpoint(tmp_path):
    seen = _run(NODE_LOSS, tmp_path)
    assert seen["removed"].get("node"), f"no worker node was removed: {seen}"
    assert seen["error"] is None
    # One result per epoch, in order: the restarted workers continued after the checkpointed epoch(s) instead
    # of starting the fine-tuning again (which would repeat epoch 1).
    assert seen["epochs"] == [1, 2, 3]
