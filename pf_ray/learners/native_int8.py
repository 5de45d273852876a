"""The framework's own INT8 path: PyTorch 2 export quantization (pt2e) for ExecuTorch's XNNPACK backend (PocketFlow's
UniformQuantTFLearner; Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018).

The two methods, what ``finalize`` returns and the costs of QAT: docs/design.md, "Native INT8".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError, DataError, ModelError
from pf_ray.export import executorch_pte
from pf_ray.export.native_int8 import write_native_int8
from pf_ray.export.onnx import eval_on_cpu
from pf_ray.ops.int8 import (
    WEIGHT_BITS,
    ZERO_POINT,
    QatGraph,
    capture_dynamic_batch,
    int8_layers,
    move_graph_,
    snap_to_int8_,
    symmetric_int8,
)
from pf_ray.packing import PackedTensor
from pf_ray.registry import LEARNERS
from pf_ray.strict import check_choice, check_range
from pf_ray.train import take_batches

METHODS = ("ptq", "qat")
CALIBRATION_BATCH_SIZE = 64  # images per calibration batch (QAT warm-up, PTQ calibration, ONNX Runtime's too)

__all__ = ["NativeInt8", "NativeInt8Config"]


@dataclass(frozen=True)
class NativeInt8Config:
    method: str = "qat"  # "qat": fine-tune through XNNPACK's fake quantizers; "ptq": fine-tune float, calibrate
    calibration_batches: int = 4  # training batches (of 64) for the QAT ranges' warm-up or the PTQ calibration
    per_channel: bool = True  # weights: one scale per output channel (False: one per layer)
    seed: int = 0  # which calibration batches

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_range("calibration_batches", self.calibration_batches, low=1)


@LEARNERS.register("native_int8", config=NativeInt8Config)
class NativeInt8:
    """QAT: a fake-quantized pt2e graph from ``prepare``; PTQ: the float model, calibrated in ``int8_artifacts``."""

    def __init__(self, config: NativeInt8Config) -> None:
        self.config = config
        self._float_model: nn.Module | None = None  # QAT: the architecture the trained weights are mapped back to
        self._trained: QatGraph | None = None  # QAT: the graph as the last finalize saw it
        self._converted: torch.fx.GraphModule | None = None  # QAT: _trained converted (once: it is slow)
        self._finalized: nn.Module | None = None  # the model that finalize returned last (its INT8 twin above)

    # ---- checks

    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        if not executorch_pte.executorch_available():
            raise ConfigError(f"learner native_int8: needs ExecuTorch (with torchao), which is not installed: "
                              f"{executorch_pte.INSTALL_HINT}")
        if not int8_layers(model):
            raise ModelError(f"native_int8: the model ({type(model).__name__}) has no conv/linear layer to quantize")

    # ---- the learner's hooks

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        """PTQ: ``model`` itself. QAT: ``model`` captured by ``torch.export`` and prepared with XNNPACK's QAT
        quantizer, its ranges warmed up on ``calibration_batches`` training batches, as a ``QatGraph``."""
        self.check(model, data.input_shape)
        if self.config.method == "ptq":
            return model
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        self._float_model = copy.deepcopy(model).cpu()
        images = calibration_images(data, self.config.calibration_batches, seed=self.config.seed)
        device = next(model.parameters()).device
        # Captured on the CPU (batch norm as in training: what the QAT conv-bn rewrite matches), then moved to the
        # training device with torch.export's device pass: .to() would leave device arguments baked into it.
        graph = capture_dynamic_batch(copy.deepcopy(self._float_model).train(), images[:2], device=device)
        qat = QatGraph(prepare_qat_pt2e(graph, executorch_pte.xnnpack_quantizer(
            is_qat=True, per_channel=self.config.per_channel)))
        qat.observe(images)
        return qat

    def on_step(self, model: nn.Module, step: int) -> None:
        pass  # the fake quantizers re-quantize weights every forward and move their ranges in it: nothing to do

    def finalize(self, model: nn.Module) -> nn.Module:
        """The float architecture with the trained weights on the int8 grid (QAT: a new module built from the
        graph's parameters and batch-norm statistics; PTQ: ``model`` itself, changed in place)."""
        self._trained = self._converted = None
        if isinstance(model, QatGraph):
            self._trained = copy.deepcopy(model)
            model = self._float_from(model)
        snap_to_int8_(model, per_channel=self.config.per_channel)
        self._finalized = model
        return model

    def _float_from(self, qat: QatGraph) -> nn.Module:
        if self._float_model is None:
            raise ModelError("native_int8: finalize got a QAT graph that this learner did not prepare")
        trained = qat.graph.state_dict()
        float_model = copy.deepcopy(self._float_model)
        wanted = float_model.state_dict()
        missing = [f"{name}.weight" for name, _ in int8_layers(float_model) if f"{name}.weight" not in trained]
        if missing:
            raise ModelError(f"native_int8: the QAT graph has no parameter for {', '.join(missing[:3])}: "
                             "torch.export renamed or dropped it")
        # A parameter the forward never used is not in the graph: it keeps its (untrained) value.
        float_model.load_state_dict({key: trained[key] for key in wanted if key in trained}, strict=False)
        return float_model.to(next(qat.parameters()).device)

    def packed(self, model: nn.Module) -> dict[str, PackedTensor]:
        """Every conv/linear weight of the finalized model as 8-bit codes q + 128, zero point 128 and one scale
        per output channel (or per layer): (code - 128) * scale gives the weight back within scale / 2, exactly
        (to float rounding) for a finalized model, whose weights are on that grid."""
        packed = {}
        for name, layer in int8_layers(model):
            codes, scale = symmetric_int8(layer.weight, per_channel=self.config.per_channel)
            packed[f"{name}.weight"] = PackedTensor.integer(
                codes + ZERO_POINT, WEIGHT_BITS, scale, torch.full_like(scale, ZERO_POINT, dtype=torch.int32))
        return packed

    # ---- the INT8 files

    def _quantized_graph(self, model: nn.Module, data: DataBundle) -> torch.fx.GraphModule:
        """``model``'s converted pt2e graph (quantize/dequantize around int8 weights, on the CPU).

        QAT, for the model that ``finalize`` returned last: ``convert_pt2e`` of the trained graph, with the ranges
        learnt in training (slow: torchao traces about 100 batch-norm folding patterns, ~30 s on one core, twice
        that where CUDA is available; done once per ``finalize``, the same graph is returned after that).
        Otherwise (PTQ, or a model rebuilt from a checkpoint in another process): ``model`` exported, observed on
        ``calibration_batches`` training batches and converted (post-training calibration; for a QAT-trained
        model only the activation ranges are new, its weights are already on the grid)."""
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        if model is self._finalized and self._trained is not None:
            if self._converted is None:
                trained = copy.deepcopy(self._trained)
                move_graph_(trained.graph, "cpu")  # trained on a GPU: device arguments too, not only weights
                trained.eval()
                self._converted = convert_pt2e(trained.graph)
            return self._converted
        images = calibration_images(data, self.config.calibration_batches, seed=self.config.seed)
        with eval_on_cpu(model) as cpu_model, torch.no_grad():
            graph = capture_dynamic_batch(cpu_model, images[:2])
            prepared = prepare_pt2e(graph, executorch_pte.xnnpack_quantizer(per_channel=self.config.per_channel))
            for chunk in images.split(CALIBRATION_BATCH_SIZE):
                prepared(chunk)
            return convert_pt2e(prepared)

    def int8_artifacts(self, model: nn.Module, data: DataBundle, out_dir: str | Path, stem: str) -> dict[str, Path]:
        """Write the learner's own deployable INT8 models for the finalized ``model``:

        - ``pte_int8``: ``<stem>.native.int8.pte``, ``_quantized_graph`` lowered with the XNNPACK partitioner at
          batch 1 (as ``export_pte``); it runs on ExecuTorch (``PteSession``).
        - ``onnx_int8``: ``<stem>.native.int8.onnx``, ONNX Runtime's static QDQ quantization of the model's FP32
          ONNX, calibrated on the same training images (its weights are already on the int8 grid, so only the
          activation ranges are ONNX Runtime's own).
        """
        graph = self._quantized_graph(model, data)
        images = calibration_images(data, self.config.calibration_batches, seed=self.config.seed)
        return write_native_int8(graph, model, data.input_shape, images, out_dir, stem,
                                 batch_size=CALIBRATION_BATCH_SIZE)


def calibration_images(data: DataBundle, num_batches: int, *, seed: int = 0) -> torch.Tensor:
    """The first ``num_batches`` shuffled training batches of 64 (seeded: the same images every call), on the
    CPU: (N, C, H, W) float."""
    batches = [inputs for inputs, _ in take_batches(data.train, CALIBRATION_BATCH_SIZE, num_batches, seed=seed)]
    if not batches:
        raise DataError(f"native_int8: the training set of {data.name!r} is empty; nothing to calibrate on")
    return torch.cat(batches).float().cpu()
