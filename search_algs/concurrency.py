"""How many trials run at once: as many as the cluster holds *now*, re-read whenever Tune asks for a trial.

Tune's ``max_concurrent_trials`` is fixed when the search starts. On an autoscaling cluster that starts small,
that would keep the search at its first size for ever; on one that loses a node, it would queue trials for
resources that are gone. ``ClusterConcurrency`` wraps the searcher like Tune's ``ConcurrencyLimiter`` (whose
bookkeeping of live trials, saved and restored with the experiment, it reuses) and re-derives the cap from
the cluster's CPUs, and GPUs when trials take them, before every suggestion.
"""

from __future__ import annotations

from collections.abc import Callable

from ray.tune.search import ConcurrencyLimiter, Searcher


def _cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


# floor() of a quotient in floating point: 1 / 0.1 is 10.000000000000002, 0.3 / 0.1 is 2.9999999999999996
_ROUNDING = 1e-9


class ClusterConcurrency(ConcurrencyLimiter):
    """At most ``floor(cluster CPUs / cpus_per_trial)`` live trials, and ``floor(cluster GPUs / gpus_per_trial)``
    when trials take GPUs (fractions: 0.25 GPU per trial on 2 GPUs is 8), at least 1 (a cluster scaling up from
    zero gets one trial, whose demand starts a node); re-derived on each suggestion. The same rule as
    ``pf_ray.launch.resources.trial_slots``, which sizes the search up front.

    Args:
        searcher: the searcher to wrap.
        cpus_per_trial: the CPUs one trial really occupies (its driver plus its Ray Train workers).
        gpus_per_trial: the GPUs one trial really occupies (its own share, or its Ray Train workers' 1 each).
        cluster_cpus, cluster_gpus: read the cluster's CPUs and GPUs (parameters for tests; the live cluster's by
            default).
    """

    def __init__(self, searcher: Searcher, cpus_per_trial: float, gpus_per_trial: float = 0.0,
                 cluster_cpus: Callable[[], float] = _cluster_cpus,
                 cluster_gpus: Callable[[], float] = _cluster_gpus) -> None:
        if cpus_per_trial <= 0:
            raise ValueError(f"cpus_per_trial: got {cpus_per_trial}; expected > 0")
        if gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial: got {gpus_per_trial}; expected >= 0")
        self.cpus_per_trial = cpus_per_trial
        self.gpus_per_trial = gpus_per_trial
        self.cluster_cpus = cluster_cpus
        self.cluster_gpus = cluster_gpus
        super().__init__(searcher, max_concurrent=self._derive())

    def _derive(self) -> int:
        slots = int(self.cluster_cpus() / self.cpus_per_trial + _ROUNDING)
        if self.gpus_per_trial > 0:
            slots = min(slots, int(self.cluster_gpus() / self.gpus_per_trial + _ROUNDING))
        return max(1, slots)

    def suggest(self, trial_id: str):
        self.max_concurrent = self._derive()  # a node that joined raises it; a lost one lowers it
        return super().suggest(trial_id)

    def get_state(self) -> dict:
        state = super().get_state()
        state.pop("cluster_cpus", None)  # functions: re-bound on restore, not saved
        state.pop("cluster_gpus", None)
        return state
