"""How many trials run at once: as many as the cluster holds *now*, re-read whenever Tune asks for a trial.

Tune's ``max_concurrent_trials`` is fixed when the search starts. On an autoscaling cluster that starts small,
that would keep the search at its first size for ever; on one that loses a node, it would queue trials for
resources that are gone. ``ClusterConcurrency`` wraps the searcher like Tune's ``ConcurrencyLimiter`` (whose
bookkeeping of live trials, saved and restored with the experiment, it reuses) and re-derives the cap from
the cluster's CPUs before every suggestion.
"""

from __future__ import annotations

from collections.abc import Callable

from ray.tune.search import ConcurrencyLimiter, Searcher


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


class ClusterConcurrency(ConcurrencyLimiter):
    """At most ``floor(cluster CPUs / cpus_per_trial)`` live trials (at least 1), re-derived on each suggestion.

    Args:
        searcher: the searcher to wrap.
        cpus_per_trial: the CPUs one trial really occupies (its driver plus its Ray Train workers).
        cluster_cpus: reads the cluster's CPUs (a parameter for tests; the live cluster by default).
    """

    def __init__(self, searcher: Searcher, cpus_per_trial: float,
                 cluster_cpus: Callable[[], float] = _cluster_cpus) -> None:
        if cpus_per_trial <= 0:
            raise ValueError(f"cpus_per_trial: got {cpus_per_trial}; expected > 0")
        self.cpus_per_trial = cpus_per_trial
        self.cluster_cpus = cluster_cpus
        super().__init__(searcher, max_concurrent=self._derive())

    def _derive(self) -> int:
        return max(1, int(self.cluster_cpus() // self.cpus_per_trial))

    def suggest(self, trial_id: str):
        self.max_concurrent = self._derive()  # a node that joined raises it; a lost one lowers it
        return super().suggest(trial_id)

    def get_state(self) -> dict:
        state = super().get_state()
        state.pop("cluster_cpus", None)  # a function: re-bound on restore, not saved
        return state
