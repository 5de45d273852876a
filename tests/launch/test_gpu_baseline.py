"""With ``resources.use_gpu`` the baseline trains in a Ray task holding a GPU (so on a GPU node, not the CPU head)
and comes back as the same checkpoint a driver-trained baseline is; without, it trains on the driver as before.

The GPUs are fake (``resources.num_gpus`` on a CPU-only machine): the task is given ``device="cpu"``, which only
tests do. It runs in a subprocess, since the tests' shared Ray (conftest ``ray_session``) has no GPU resource;
the same subprocess checks the GPU requests and the trial slots against that live Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import torch
from pf_ray.checkpoint import load_checkpoint
from pf_ray.config import load_experiment
from pf_ray.data import load_data
from pf_ray.errors import ConfigError
from pf_ray.launch.baseline import train_baseline
from pf_ray.launch.cluster import live_nodes, start_ray
from pf_ray.launch.resources import check_gpu_requests

root = sys.argv[1]
common = ["dataset.name=digits", "model.name=resnet20", "baseline.train.epochs=1", "baseline.train.train_subset=256",
          "resources.num_cpus=2", "seed=3"]
on_gpu = load_experiment(None, [*common, f"storage.path={root}/gpu", "resources.use_gpu=true", "resources.num_gpus=1"])
on_driver = load_experiment(None, [*common, f"storage.path={root}/cpu"])
torch.set_num_threads(2)
start_ray(on_gpu, log=print)  # the local Ray with the fake GPU resources.num_gpus asks for
import ray

out = {"cluster_gpus": ray.cluster_resources().get("GPU", 0)}
# Against the live local Ray: 2 Ray Train workers of 1 GPU each cannot run on its 1 GPU; 1 worker can.
try:
    check_gpu_requests(load_experiment(None, [*common, "resources.use_gpu=true",
                                              "resources.workers_per_trial=2"]), live_nodes())
except ConfigError as error:
    out["refused"] = str(error)
check_gpu_requests(on_gpu, live_nodes())
# Live trial slots with the default readers: 2 CPUs, 1 GPU, half a GPU and half a CPU per trial: 2 at a time.
from ray.tune.search import Searcher
from search_algs.concurrency import ClusterConcurrency
out["slots"] = ClusterConcurrency(Searcher(metric="score", mode="max"), cpus_per_trial=0.5,
                                  gpus_per_trial=0.5).max_concurrent

data = load_data(on_gpu.dataset, seed=on_gpu.seed)
lines = []
gpu_path = train_baseline(on_gpu, data, log=lines.append, device="cpu")
cpu_lines = []
cpu_path = train_baseline(on_driver, data, log=cpu_lines.append)
ray.shutdown()

def described(path):
    model, info = load_checkpoint(path, expect_input_shape=data.input_shape, expect_num_classes=data.num_classes)
    state = model.state_dict()
    return {"model": str(info.model), "metrics": sorted(info.metrics),
            "state": {k: list(v.shape) for k, v in state.items()},
            "devices": sorted({str(v.device) for v in state.values()})}, state

gpu, gpu_state = described(gpu_path)
cpu, cpu_state = described(cpu_path)
out.update(lines=lines, cpu_lines=cpu_lines, gpu=gpu, cpu=cpu,
           max_difference=max((gpu_state[k].float() - cpu_state[k].float()).abs().max().item() for k in gpu_state))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.ray
@pytest.mark.slow  # 17 s: a Ray of its own with a fake GPU, in a subprocess
def test_use_gpu_trains_the_baseline_in_a_gpu_task_with_the_same_checkpoint(tmp_path):
    # Ray refuses more GPUs than CUDA_VISIBLE_DEVICES lists: fake ones need it unset.
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["cluster_gpus"] == 1  # start_ray passed resources.num_gpus to the local Ray
    assert out["slots"] == 2  # floor(1 GPU / 0.5), though the CPUs would hold 4
    assert out["refused"].startswith("resources.workers_per_trial: got 2 Ray Train workers of 1 GPU each; the "
                                     "cluster (its nodes now) has at most 1 GPU")
    lines = out["lines"]
    assert lines[0] == "baseline: training as a Ray task on a GPU node (1 GPU, 2 CPU(s), device cpu)", lines
    assert any(line.startswith("baseline: in a Ray task on node ") and "GPU(s) [0]" in line for line in lines), lines
    assert lines[-1].startswith("baseline: validation accuracy ") and lines[-1].endswith(".pt"), lines
    assert not any("Ray task" in line for line in out["cpu_lines"]), out["cpu_lines"]  # no use_gpu: the driver
    assert out["gpu"] == out["cpu"]  # the same checkpoint format, model, metrics and tensors (on the CPU)
    assert out["gpu"]["devices"] == ["cpu"]
    assert out["max_difference"] < 1e-4  # same seed, same device, same threads: the same training


def test_without_ray_use_gpu_trains_here_and_on_the_cpu_when_cuda_is_absent(tmp_path, monkeypatch):
    """`pf-ray train` (no Ray) with use_gpu: the baseline trains in this process, on the CPU here (no CUDA)."""
    import torch

    import pf_ray.launch.baseline as baseline
    from pf_ray.config import load_experiment
    from pf_ray.data import load_data

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(baseline, "_running_ray", lambda: None)
    config = load_experiment(None, ["dataset.name=digits", "baseline.train.epochs=1", "baseline.train.train_subset=64",
                                    f"storage.path={tmp_path}", "resources.use_gpu=true", "resources.num_cpus=1"])
    lines: list[str] = []
    path = baseline.train_baseline(config, load_data(config.dataset, seed=config.seed), log=lines.append)
    assert path.is_file()
    assert "no Ray is running and CUDA is not available here: training on the CPU" in lines[0], lines
    assert not any("Ray task" in line for line in lines), lines
