"""The learners, one module each; importing this package imports every module beside ``base`` and so registers
each learner in ``LEARNERS`` (a new learner is its module, its trainable and its tests: nothing to list here)."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from pf_ray.learners.base import Learner
from pf_ray.registry import LEARNERS

__all__ = ["Learner", "build_learner", "learner_config_class"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def learner_config_class(name: str) -> type:
    return LEARNERS.entry(name).meta["config"]


def build_learner(name: str, config: Any) -> Learner:
    """The registered learner ``name`` built from its typed config."""
    return LEARNERS.get(name)(config)
