"""pf-ray's errors: one flat set. Each message names the field, the value received and what is allowed."""

from __future__ import annotations


class PfRayError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""


class ConfigError(PfRayError):
    """A configuration value is unknown, of the wrong type, out of range or inconsistent."""


class DataError(PfRayError):
    """A dataset cannot be found, read, or has the wrong shape."""


class ModelError(PfRayError):
    """A model cannot be built, loaded or handled (e.g. nothing prunable)."""


class CheckpointError(PfRayError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class ExportError(PfRayError):
    """An artifact cannot be exported or fails verification."""


class AccuracyGuardError(ExportError):
    """An artifact lost more test accuracy on its runtime than ``export.max_accuracy_drop`` allows (exit code 3:
    the input was fine, the product is not)."""


class EmulationError(PfRayError):
    """The emulated aarch64 environment cannot be built, or an artifact cannot be run in it."""


class SearchError(PfRayError):
    """The search could not produce a usable result (e.g. every trial failed)."""
