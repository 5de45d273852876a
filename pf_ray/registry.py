"""Registries by name: MODELS, DATASETS, LEARNERS, EXPORTERS.

An entry is any object (a factory function, a learner class) plus optional metadata, e.g.
``LEARNERS.register("channel_pruning", config=ChannelPruningConfig)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pf_ray.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """A name -> object table that says which names it knows when asked for one it does not."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, dict(meta))
            return obj

        return decorator

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


MODELS = Registry("model")
DATASETS = Registry("dataset")
LEARNERS = Registry("learner")
EXPORTERS = Registry("exporter")
