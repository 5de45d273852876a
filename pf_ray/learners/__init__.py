"""The learners, one module each; importing this package registers them all in ``LEARNERS``."""

from __future__ import annotations

from typing import Any

from pf_ray.learners import (  # noqa: F401  (registration)
    channel_pruning,
    discrimination_aware_pruning,
    full_precision,
    native_int8,
    nonuniform_quantization,
    uniform_quantization,
    weight_sparsification,
)
from pf_ray.learners.base import Learner
from pf_ray.registry import LEARNERS

__all__ = ["Learner", "build_learner", "learner_config_class"]


def learner_config_class(name: str) -> type:
    return LEARNERS.entry(name).meta["config"]


def build_learner(name: str, config: Any):
    """The registered learner ``name`` built from its typed config."""
    return LEARNERS.get(name)(config)
