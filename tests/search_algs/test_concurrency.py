"""ClusterConcurrency: the cap on live trials follows the cluster's CPUs as nodes join and leave."""

from __future__ import annotations

import pickle

import pytest
from ray.tune.search import Searcher

from search_algs.concurrency import ClusterConcurrency


class Always(Searcher):
    """Suggests the same point for every trial and records what it is told."""

    def __init__(self) -> None:
        super().__init__(metric="score", mode="max")
        self.completed: list[str] = []

    def suggest(self, trial_id: str) -> dict:
        return {"x": 1.0}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.completed.append(trial_id)


def test_the_cap_follows_the_cluster_cpus() -> None:
    cpus = [2.0]
    limiter = ClusterConcurrency(Always(), cpus_per_trial=1.0, cluster_cpus=lambda: cpus[0])
    assert [limiter.suggest(t) for t in ("a", "b", "c")] == [{"x": 1.0}, {"x": 1.0}, None]  # 2 CPUs: 2 live
    cpus[0] = 4.5  # a node joined: two more fit (4.5 // 1)
    assert [limiter.suggest(t) for t in ("c", "d", "e")] == [{"x": 1.0}, {"x": 1.0}, None]
    limiter.on_trial_complete("a", {"score": 1.0})
    assert limiter.searcher.completed == ["a"] and limiter.suggest("e") == {"x": 1.0}
    cpus[0] = 1.0  # a node was lost: no new trial until the live ones drop below one
    assert limiter.suggest("f") is None and limiter.max_concurrent == 1


def test_a_trial_bigger_than_the_cluster_still_gets_one_slot() -> None:
    limiter = ClusterConcurrency(Always(), cpus_per_trial=2.25, cluster_cpus=lambda: 2.0)
    assert limiter.max_concurrent == 1 and limiter.suggest("a") == {"x": 1.0} and limiter.suggest("b") is None


def test_state_round_trip_keeps_live_trials_but_not_the_cpu_reader() -> None:
    limiter = ClusterConcurrency(Always(), cpus_per_trial=1.0, cluster_cpus=lambda: 3.0)
    limiter.suggest("a")
    state = limiter.get_state()
    assert "cluster_cpus" not in state and state["live_trials"] == {"a"}
    restored = ClusterConcurrency(Always(), cpus_per_trial=1.0, cluster_cpus=lambda: 3.0)
    restored.set_state(pickle.loads(pickle.dumps(state)))
    assert restored.live_trials == {"a"} and restored.suggest("b") == {"x": 1.0}


def test_cpus_per_trial_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cpus_per_trial: got 0"):
        ClusterConcurrency(Always(), cpus_per_trial=0, cluster_cpus=lambda: 2.0)


def test_with_gpus_the_cap_is_also_gpus_over_gpus_per_trial() -> None:
    """Fractional GPUs: 0.25 GPU per trial on 1 GPU is 4 live trials however many CPUs; a GPU node that joins
    raises it; no GPU yet (an autoscaler starting from zero) still leaves one slot, whose trial starts a node."""
    gpus = [1.0]
    limiter = ClusterConcurrency(Always(), cpus_per_trial=1.0, gpus_per_trial=0.25, cluster_cpus=lambda: 16.0,
                                 cluster_gpus=lambda: gpus[0])
    assert [limiter.suggest(t) is not None for t in "abcde"] == [True, True, True, True, False]
    gpus[0] = 2.0
    assert limiter.suggest("e") is not None and limiter.max_concurrent == 8
    gpus[0] = 0.0
    assert limiter.suggest("f") is None and limiter.max_concurrent == 1
    assert "cluster_gpus" not in limiter.get_state()


def test_the_cap_is_the_rule_that_sizes_the_search_up_front() -> None:
    from pf_ray.launch.resources import trial_slots

    for cpus, gpus, per_cpu, per_gpu in [(16, 1, 1, 0.1), (16, 0.3, 1, 0.1), (4, 8, 1, 0.5), (40, 8, 2.25, 2),
                                         (7, 0, 1, 0), (2, 0, 2.25, 0)]:
        limiter = ClusterConcurrency(Always(), cpus_per_trial=per_cpu, gpus_per_trial=per_gpu,
                                     cluster_cpus=lambda c=cpus: c, cluster_gpus=lambda g=gpus: g)
        assert limiter.max_concurrent == trial_slots(cpus, gpus, per_cpu, per_gpu), (cpus, gpus, per_cpu, per_gpu)
