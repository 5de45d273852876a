"""A run's specification, resolved once: the experiment plus its learner's typed config, travelling as one object.

``ExperimentConfig`` keeps ``learner.options`` as the user wrote them (a mapping: which fields are valid depends
on the learner). ``RunSpec.resolve`` parses them once, strictly, into the learner's own frozen config; from then
on the spec goes everywhere whole (trials, Ray Train workers, the retrain, checkpoints), as a Python object or,
where a file needs one, through ``to_dict`` / ``from_dict``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pf_ray.config import Budget, ExperimentConfig, load_experiment
from pf_ray.errors import ConfigError
from pf_ray.learners import Learner, build_learner, learner_config_class
from pf_ray.learners.base import BudgetsLatency
from pf_ray.strict import from_dict, to_dict


@dataclass(frozen=True)
class RunSpec:
    experiment: ExperimentConfig
    learner_config: Any  # the learner's frozen config; a candidate's has its per-layer values filled in

    @classmethod
    def resolve(cls, experiment: ExperimentConfig) -> RunSpec:
        """Parse ``experiment.learner.options`` with the learner's config class (ConfigError names
        ``learner.options.<field>``), and make ``search.budget: auto`` concrete for that learner."""
        learner_config = parse_learner_config(experiment.learner.name, experiment.learner.options,
                                              path="learner.options")
        learner = build_learner(experiment.learner.name, learner_config)
        search = experiment.search.resolved(isinstance(learner, BudgetsLatency) and learner.budgets_latency())
        return cls(replace(experiment, search=search), learner_config)

    @property
    def learner_name(self) -> str:
        return self.experiment.learner.name

    def build_learner(self) -> Learner:
        return build_learner(self.learner_name, self.learner_config)

    def with_learner_config(self, learner_config: Any) -> RunSpec:
        return replace(self, learner_config=learner_config)

    def per_target(self) -> list[tuple[float | None, RunSpec]]:
        """One spec per search of the run: each target speed-up of a latency budget (a Pareto set has several),
        or the spec itself (None) with a MACs budget."""
        search = self.experiment.search
        if search.budget is not Budget.LATENCY:
            return [(None, self)]
        return [(speedup, replace(self, experiment=replace(self.experiment, search=search.for_speedup(speedup))))
                for speedup in search.speedups]

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": to_dict(self.experiment), "learner_config": to_dict(self.learner_config)}

    @classmethod
    def from_dict(cls, data: Any) -> RunSpec:
        if not isinstance(data, dict) or set(data) != {"experiment", "learner_config"}:
            raise ConfigError(f"run spec: got {type(data).__name__}; expected a mapping with the keys experiment "
                              "and learner_config")
        experiment = from_dict(ExperimentConfig, data["experiment"])
        return cls(experiment, parse_learner_config(experiment.learner.name, data["learner_config"],
                                                    path="learner_config"))


def parse_learner_config(name: str, options: Any, *, path: str) -> Any:
    """Learner ``name``'s typed config from a mapping (strict: errors name ``path.<field>``)."""
    return from_dict(learner_config_class(name), options, path=path)


def load_spec(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> RunSpec:
    """``load_experiment`` (defaults, YAML file, ``--set`` overrides) with the learner's options resolved."""
    return RunSpec.resolve(load_experiment(path, overrides))
