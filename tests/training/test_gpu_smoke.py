"""bench/gpu_smoke.py runs on the CPU (``--cpu``: the same code path as on a GPU), so the script is ready whenever a
GPU machine is. Both tests are in the slow set: on the 2-core machines the few-steps one takes 30-70 s, the whole
``--quick`` run 3-5 minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_smoke(out: Path, *extra: str, timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--cpu", "--quick", "--out",
                           str(out), *extra], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.txt").read_text().splitlines()[-1].startswith("gpu_smoke: ")
    return summary


@pytest.mark.slow
def test_a_few_smoke_steps_pass_on_the_cpu(tmp_path):
    summary = run_smoke(tmp_path, "--only", "learner:channel_pruning_l1", "resume", "timing", timeout=300)
    steps = {s["step"]: s for s in summary["steps"]}
    assert set(steps) == {"preflight", "learner:channel_pruning_l1", "resume", "timing"}
    assert all(s["status"] == "passed" for s in steps.values()), steps
    assert steps["preflight"]["device"] == "cpu" and summary["counts"]["failed"] == 0
    learner = steps["learner:channel_pruning_l1"]
    assert learner["max_logit_difference"] == 0.0 and learner["reload_difference"] == 0.0  # same device: exact
    assert steps["resume"]["resumed_from_epoch"] == 1
    assert steps["timing"]["cpu_fp32_ms"] > 0 and steps["timing"]["cpu_bf16_ms"] > 0


@pytest.mark.slow
def test_every_smoke_step_passes_on_the_cpu(tmp_path):
    summary = run_smoke(tmp_path, timeout=1200)
    statuses = {s["step"]: s["status"] for s in summary["steps"]}
    assert statuses["compress"] == "skipped"  # --quick leaves Ray's run out
    assert {step for step, status in statuses.items() if status != "passed"} == {"compress"}, summary["steps"]
    assert {s for s in statuses if s.startswith("learner:")} == {
        "learner:channel_pruning_lasso", "learner:channel_pruning_l1", "learner:discrimination_aware_pruning",
        "learner:uniform_quantization_w8a8", "learner:nonuniform_quantization", "learner:weight_sparsification",
        "learner:native_int8_qat", "learner:full_precision"}
    ddp = next(s for s in summary["steps"] if s["step"] == "ddp")
    assert ddp["learners"] == ["nonuniform_quantization", "uniform_quantization_w8a8", "weight_sparsification"]


def test_the_smoke_scripts_training_parts_import_without_ray():
    """The GPU machines have no Ray: the learners, fit, the devices module and the script itself must import
    without it (Ray made unimportable in a fresh interpreter)."""
    code = ("import sys; sys.modules['ray'] = None\n"
            "import pf_ray.train, pf_ray.candidate, pf_ray.learners, pf_ray.devices, pf_ray.checkpoint\n"
            "sys.path.insert(0, 'bench'); import gpu_smoke\n"
            "assert 'ray' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
