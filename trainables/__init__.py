"""One Ray Tune trainable per learner, by the learner's name."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pf_ray.errors import ConfigError

NAMES = ("channel_pruning", "discrimination_aware_pruning", "full_precision", "native_int8",
         "nonuniform_quantization", "uniform_quantization", "weight_sparsification")


def get_trainable(learner_name: str) -> Callable:
    if learner_name not in NAMES:
        raise ConfigError(f"learner {learner_name!r} has no trainable; known: {', '.join(NAMES)}")
    return getattr(importlib.import_module(f"trainables.{learner_name}"), learner_name)
