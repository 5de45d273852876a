"""What a learner is: a frozen config dataclass plus a class with four required hooks (``Learner``), registered by
name, and optionally the hooks of the smaller protocols below, which the code that can use them finds with
``isinstance``. A learner class defines no other public attribute (tests/learners/test_contract.py checks it),
so a misspelt hook is a test failure, not a hook silently never called.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from pf_ray.config import Budget, SearchConfig
from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError
from pf_ray.ops.latency_budget import LatencySource
from pf_ray.ops.safe_pruning import SkippedGroup
from pf_ray.packing import PackedTensor
from pf_ray.search_space import PerLayerSpace


@runtime_checkable
class Learner(Protocol):
    config: Any  # the learner's frozen config dataclass

    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        """Raise, before any data is read, what ``prepare`` would raise on this model (nothing to compress, a
        per-layer list of the wrong length): the run's preflight calls it so bad input fails before the run."""

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        """Compress ``model`` before fine-tuning (prune channels, insert masks or quantizers); may return a new
        module. It runs again when a Ray Train retrain restarts, before the checkpointed state is loaded."""

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimiser step of fine-tuning (e.g. update masks); usually nothing."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Called after fine-tuning; returns a plain model to evaluate and export (masks folded in, weights on
        their quantization grid), which ONNX export and ``load_checkpoint`` rebuild (the zoo's layers, resized, or
        the learner's ``rebuild_finalized``)."""


@runtime_checkable
class SearchesPerLayer(Protocol):
    """A learner whose config has one value per layer (or channel group) that a search can fill."""

    searched_field: str  # the config's tuple field the values go into, e.g. "layer_keep_ratios"

    def search_space(self, model: nn.Module, input_shape: tuple[int, int, int], search: SearchConfig,
                     latency: LatencySource | None = None) -> PerLayerSpace | None:
        """What the searchers search on ``model`` (box, budget, layer features), or None when the config gives
        the values itself (modes uniform and list). ``latency``: asked for the deployment target's latency
        table and reference when ``search.budget`` is latency; a learner whose values do not move latency on a CPU
        runtime refuses that budget (ConfigError)."""


@runtime_checkable
class BudgetsLatency(Protocol):
    """A learner whose searched values move latency on a CPU runtime (channel counts do; sparsity and sub-8-bit
    weights do not): ``search.budget: auto`` budgets its search in measured latency on the target."""

    def budgets_latency(self) -> bool:
        """Whether this configuration searches values that a latency budget can bound (e.g. mode auto)."""


@runtime_checkable
class ProposesStart(Protocol):
    """A learner with a fast heuristic allocation under its budget, which every searcher proposes right after the
    uniform candidate (so a search never ends worse than that heuristic)."""

    def starting_proposal(self, model: nn.Module, data: DataBundle, space: PerLayerSpace) -> tuple[float, ...]:
        """One value per layer of ``space``, within its box and its budget."""


@runtime_checkable
class CountsSteps(Protocol):
    def set_total_steps(self, total_steps: int) -> None:
        """Told the run's optimiser steps before training (``train.fit``'s ``on_start``), for schedules that span
        the run (weight sparsification's)."""


@runtime_checkable
class PacksWeights(Protocol):
    def packed(self, model: nn.Module) -> dict[str, PackedTensor]:
        """The compact encoding of the weights it compresses, for the finalized model (``.pfpack``: the stored
        size)."""


@runtime_checkable
class WritesInt8Files(Protocol):
    def int8_artifacts(self, model: nn.Module, data: DataBundle, out_dir: str | Path, stem: str) -> dict[str, Path]:
        """Deployable INT8 files of its own for the finalized model (native_int8's ExecuTorch program and QDQ
        ONNX), by format name."""


@runtime_checkable
class KeepsFp32Layers(Protocol):
    def fp32_layers(self) -> tuple[str, ...]:
        """Layers (module names of the finalized model, e.g. "layer1.0.conv1") that its model's INT8 exports keep
        in FP32: the INT8 ONNX, ``.ort`` and ``.pte`` files that ``export_all`` writes (joint pruning and
        precision). The manifest records them."""


@runtime_checkable
class SkipsUnsafeParts(Protocol):
    def skipped_groups(self) -> tuple[SkippedGroup, ...]:
        """What ``check`` found unsafe to compress on the model and leaves alone, with the reason (e.g. channel
        groups whose pruning breaks the model: ``ops.safe_pruning``), for the log, results.json and the report."""

    def checked_config(self) -> Any:
        """Its config with the parts ``skipped_groups`` names left out, for every trial and the retrain: they see
        the same model, and need not test it again."""


@runtime_checkable
class ScoresInt8(Protocol):
    def scores_int8(self) -> bool:
        """True where its trials are scored on the accuracy of the deployment target's INT8 artifact, not the
        PyTorch model's (a search that decides which layers stay FP32: what an FP32 layer buys is INT8 accuracy)."""


@runtime_checkable
class RebuildsFinalized(Protocol):
    def rebuild_finalized(self, model: nn.Module, state_dict: dict[str, torch.Tensor],
                          input_shape: tuple[int, int, int]) -> nn.Module:
        """For a learner whose finalized layers are not the zoo's (uniform_quantization's frozen quantized
        layers): turn a freshly built zoo model into that structure so the finalized state dict loads;
        ``load_checkpoint`` calls it for checkpoints naming the learner, so export and verify need no data."""


OPTIONAL_HOOKS = (SearchesPerLayer, BudgetsLatency, ProposesStart, CountsSteps, PacksWeights, WritesInt8Files,
                  KeepsFp32Layers, SkipsUnsafeParts, ScoresInt8, RebuildsFinalized)


class PerLayerMode(enum.StrEnum):
    """Where a learner's per-layer values come from (PocketFlow's modes). Weight sparsification adds one of its
    own (``SparsityMode.HEURISTIC``)."""

    UNIFORM = "uniform"  # one setting for every layer
    LIST = "list"  # given one per layer
    AUTO = "auto"  # the search fills them (uniform until it has)


def check_per_layer_mode(mode: str, field: str, values: Sequence[Any], *, file_field: str | None = None,
                         file: str | None = None) -> None:
    """The checks every per-layer config shares: the per-layer ``values`` (its ``field``) come only with a mode that
    reads them (list, auto), and mode list has them, or a ``file`` (the config's ``file_field``) to read them from."""
    if mode not in (PerLayerMode.LIST, PerLayerMode.AUTO) and values:
        raise ConfigError(f"{field}: got {len(values)} values with mode {str(mode)!r}, which derives them from one "
                          f"setting; use mode 'list' (or 'auto') for per-layer values")
    if mode == PerLayerMode.LIST and not values and file is None:
        where = f"{field} or {file_field}" if file_field else field
        raise ConfigError(f"mode: got 'list' without {field}; set {where} (one value per layer)")
    if file is not None:
        if mode != PerLayerMode.LIST:
            raise ConfigError(f"{file_field}: got {file!r} with mode {str(mode)!r}; a file is read in mode 'list' only")
        if values:
            raise ConfigError(f"{file_field}: given together with {field}; give one of them")


def refuse_latency_budget(search: SearchConfig, learner: str, why: str) -> None:
    """A learner whose per-layer values do not move latency on a CPU runtime keeps its own budget: ConfigError
    when ``search.budget`` is latency, saying why."""
    if search.budget is Budget.LATENCY:
        raise ConfigError(f"search.budget: got 'latency'; {learner} cannot be budgeted in latency: {why}")
