"""One Ray Tune trainable per learner: ``trainables/<learner>.py`` defines the function ``<learner>``.

The shared parts: ``trial`` (a trial: in its own process, or a Ray Train run inside it), ``train_loop`` (the Ray
Train run of one candidate, also the final retrain's) and ``progress_relay`` (rank 0's progress to the driver).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pf_ray.errors import ConfigError


def get_trainable(learner_name: str) -> Callable[..., None]:
    """The trainable of learner ``learner_name``: the function of that name in ``trainables.<learner_name>``."""
    module_name = f"trainables.{learner_name}"
    if not learner_name.isidentifier():
        raise ConfigError(f"learner {learner_name!r} has no trainable: not a module name")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:  # the module exists, but something it imports does not
            raise
        raise ConfigError(f"learner {learner_name!r} has no trainable: there is no trainables/{learner_name}.py"
                          ) from None
    trainable = getattr(module, learner_name, None)
    if not callable(trainable):
        raise ConfigError(f"learner {learner_name!r} has no trainable: trainables/{learner_name}.py defines no "
                          f"function {learner_name}()")
    return trainable
