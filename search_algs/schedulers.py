"""ASHA (Li et al., MLSys 2020) defaults: trials are compared per fine-tuning epoch."""

from __future__ import annotations

from pf_ray.metrics import EPOCH


def make_asha(*, max_epochs: int, grace_period: int, reduction_factor: int):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr=EPOCH, max_t=max_epochs, grace_period=min(grace_period, max_epochs),
                         reduction_factor=reduction_factor)
