"""`ray job submit` end to end: a head of the test's own (token auth on, everything on 127.0.0.1) runs a small
`pf-ray compress` submitted with `--working-dir`; and the Jobs API refuses a request without the token.

The head is a `ray start --head --block` subprocess in a session of its own, stopped by signals to its pid and
process group: never `ray stop`, which would stop every Ray of the user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

# The quickstart, shrunk to the tiny synthetic set so it runs in about a minute.
QUICKSTART = {
    "dataset": {"name": "synthetic"},
    "baseline": {"train": {"epochs": 1, "train_subset": None}},
    "learner": {"name": "channel_pruning", "options": {"round_to": 4, "num_batches": 2}},
    "search": {"num_trials": 2, "fine_tune": {"epochs": 1, "train_subset": 128}, "validation_subset": 64,
               "budget": "macs"},  # the default's latency table is measured in tests/launch/test_target.py
    "retrain": {"train": {"epochs": 1, "train_subset": None}},
    "export": {"calibration_samples": 32, "latency_repeats": 10, "formats": ["onnx"]},
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, token: str | None) -> int:
    """The HTTP status of a GET (with the token as a bearer header, if given)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def head():
    """A one-node cluster with the dashboard (and so the Jobs API) on 127.0.0.1, token authentication on; one for
    the module (a head takes 15-30 s to start and to stop on this machine)."""
    if shutil.which("ray") is None:
        pytest.skip("the `ray` command is not on PATH")
    port, dashboard_port = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="pfj", dir="/tmp")  # Unix socket paths must stay short
    token = uuid.uuid4().hex
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    process = subprocess.Popen(
        ["setsid", "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
         # The job agent's own port: the default (52365) is taken by any other Ray on this machine (the test
         # session's own, for one), and then the head has "No available agent to submit job".
         f"--dashboard-agent-listen-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                if _get(f"{address}/api/version", token) == 200:
                    break
            assert process.poll() is None, "the head exited while starting"
            assert time.monotonic() < deadline, "the dashboard did not come up in 120 s"
            time.sleep(1)
        yield address, token, env
    finally:
        process.send_signal(signal.SIGTERM)  # `ray start --block` stops the head's processes on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # this cluster's own process group, nothing else
        process.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_jobs_api_refuses_requests_without_the_token(head):
    address, token, _ = head
    assert _get(f"{address}/api/jobs/", token) == 200
    assert _get(f"{address}/api/jobs/", None) in (401, 403)
    assert _get(f"{address}/api/jobs/", "not-the-token") in (401, 403)


@pytest.mark.slow  # 34 s; the head, its token and the jobs API stay in the default run (the test above)
def test_ray_job_submit_runs_the_quickstart(head, tmp_path):
    address, _, env = head
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    (working_dir / "quickstart.yaml").write_text(yaml.safe_dump(QUICKSTART))
    runs = tmp_path / "runs"
    command = ["ray", "job", "submit", f"--address={address}", f"--working-dir={working_dir}", "--",
               "pf-ray", "compress", "quickstart.yaml", "--set", "resources.ray_address=auto",
               "--set", f"storage.path={runs}", "--set", "storage.name=quick"]
    for _ in range(30):  # the Jobs API answers before the head's job agent is up: "No available agent", retry
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            break
        time.sleep(2)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    assert "succeeded" in submit.stdout  # `ray job submit` follows the logs, then reports the job's status
    assert "ray: 2 CPUs" in submit.stdout  # the job joined the head's cluster, not a Ray of its own
    results = json.loads((runs / "quick" / "results.json").read_text())
    assert len(results["search"]["trials"]) == 2 and results["artifacts"]
    assert (runs / "quick" / "artifacts" / "compressed.onnx").is_file()
    assert Path(results["artifacts"][0]["path"]).parent == runs / "quick" / "artifacts"
