"""What every learner is: a frozen config dataclass plus a class with hooks (registered by name).

Four hooks are required. The optional ones are looked up with ``hasattr`` by the code that can use them:

- ``set_total_steps(total_steps)``: told the run's optimiser steps before training (``train.fit``'s
  ``on_start``), for schedules that span the run (weight sparsification's);
- ``searched_field``: the config field a per-layer search fills (one value per layer), reported with each trial;
- ``search_space(model, input_shape) -> PerLayerSpace | None`` and ``project(model, input_shape, values)``:
  what the searchers search (one value per layer in a box) and the nearest per-layer setting that meets the
  learner's budget (``pf_ray.candidate``; channel pruning's MACs budget is the experiment's
  ``search.target_macs_ratio`` and is built there);
- ``packed(model) -> dict[str, PackedTensor]``: the compact encoding of the weights it compresses, for the
  finalized model (``compressed.pfpack``: the stored size);
- ``int8_artifacts(model, data, out_dir, stem) -> dict[str, Path]``: deployable INT8 files of its own
  (native_int8's ExecuTorch program and QDQ ONNX);
- ``rebuild_finalized(model, state_dict, input_shape) -> nn.Module``: for a learner whose finalized layers are
  not the zoo's (uniform_quantization's frozen quantized layers), turn a freshly built zoo model into that
  structure so the finalized state dict loads; ``load_checkpoint`` calls it for checkpoints naming the learner
  (``compressed.pt``, the retrain's model), so ``pf-ray export``/``verify`` need no data.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from pf_ray.data import DataBundle


class Learner(Protocol):
    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        """Raise, before any data is read, what ``prepare`` would raise on this model (nothing to compress, a
        per-layer list of the wrong length): ``launch.prepare`` calls it so bad input fails before the run."""

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        """Compress ``model`` before fine-tuning (prune channels, insert masks or quantizers); may return a new
        module. It runs again when a Ray Train retrain restarts, before the checkpointed state is loaded."""

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimiser step of fine-tuning (e.g. update masks); usually nothing."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Called after fine-tuning; returns a plain model to evaluate and export (masks folded in, weights on
        their quantization grid), which ONNX export and ``load_checkpoint`` rebuild (the zoo's layers, resized, or
        the learner's ``rebuild_finalized``)."""
