"""Shared fixtures. Ray tests share one local Ray (on 127.0.0.1, no dashboard, no auth token file)."""

from __future__ import annotations

import os

import pytest

# Before Ray is imported anywhere: keep every Ray address on loopback, and don't write ~/.ray/auth_token.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray for the whole test session, with 4 logical CPUs so nested Train workers fit."""
    import ray

    # address "local": a Ray of the tests' own, never another cluster running on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _feature_cache(tmp_path_factory):
    """LASSO's feature cache (pf_ray.ops.feature_cache) in a folder of the session's own, never ~/.cache; set in
    the environment, so the runs the tests start in subprocesses use it too."""
    previous = os.environ.get("PF_RAY_FEATURE_CACHE")
    os.environ["PF_RAY_FEATURE_CACHE"] = str(tmp_path_factory.mktemp("feature_cache"))
    yield
    if previous is None:
        os.environ.pop("PF_RAY_FEATURE_CACHE", None)
    else:
        os.environ["PF_RAY_FEATURE_CACHE"] = previous


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Two cores are shared by pytest, Ray workers and trials: one intra-op thread each avoids oversubscription
    (seen: a convolution 14x slower with two threads under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread_again():
    """An in-process `pf-ray compress` sets its own thread count (resources.num_cpus): back to one after every test,
    so the fixtures and tests that follow compute as they do alone (seen: a module fixture trained with 4 threads
    after the 2-worker end-to-end test changed an exact-tie count in tests/learners/test_native_int8.py)."""
    yield
    import torch

    torch.set_num_threads(1)
