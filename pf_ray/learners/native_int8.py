"""The framework's own INT8 path: PyTorch 2 export quantization (pt2e) for ExecuTorch's XNNPACK backend
(PocketFlow's UniformQuantTFLearner, which wrapped TensorFlow's quantization-aware-training rewriter and was its only
path to integer kernels; Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018).

8 bits everywhere, chosen by the runtime's own quantizer (``pf_ray.export.executorch_pte.xnnpack_quantizer``):
int8 activations per tensor, int8 weights symmetric in [-127, 127] per output channel, every conv and linear layer
quantized (first and last included, as TensorFlow's rewriter did). Nothing per layer is searched.

Methods:

- ``qat`` (the default, PocketFlow's): ``prepare`` captures the model with ``torch.export`` (batch dimension
  dynamic, so training at batch 128 and evaluating at any size both work), inserts XNNPACK's fake quantizers with
  ``prepare_qat_pt2e`` (batch norm simulated as folded into the quantized weights), warms their ranges up on
  ``calibration_batches`` training batches and hands the graph, wrapped in ``QatGraph``, to the shared training
  loop. Measured on ResNet-20 at batch 128, 1x28x28, one core: a QAT step costs 1.23x a float step (1.00 s
  against 0.81 s); ``prepare`` adds about 7 s once. That is not "much slower", so QAT stays the default.
- ``ptq``: ``prepare`` returns the float model unchanged (fine-tuning is plain float training) and the
  activations are calibrated on ``calibration_batches`` training batches when the INT8 files are written.

``finalize`` always returns the float architecture the learner was given (its state dict is what pf-ray
checkpoints store and ``load_checkpoint`` rebuilds, and the legacy ONNX exporter cannot export a pt2e QAT graph:
``aten::fused_moving_avg_obs_fake_quant`` has no ONNX symbolic), with the trained weights (QAT: mapped back from
the graph's parameters, which keep the model's names) snapped onto the symmetric int8 grid, scale = max|w| / 127
per output channel. That grid is the one XNNPACK uses after folding batch norm into the convolution: scaling a
channel by gamma / sigma scales its max|w| alike, so the folded weight has the same codes (mirrored where the
factor is negative). The finalized model therefore computes with the INT8 model's weights and float activations;
the deployable INT8 models come from ``int8_artifacts``: ``<stem>.native.int8.pte`` (the converted pt2e graph,
lowered with the XNNPACK partitioner) and ``<stem>.native.int8.onnx`` (ONNX Runtime static QDQ of the finalized
model's FP32 ONNX). ``packed`` stores every conv/linear weight as 8-bit codes plus one scale per output channel.

Costs and limits of QAT: ``convert_pt2e`` of the trained graph (for ``int8_artifacts``) traces about 100
batch-norm folding patterns, ~30 s on one core whatever the model, twice that where CUDA is available. The graph
has no ``nn.Conv2d`` modules left, so ``pf_ray.metrics.layer_table`` finds no layer in it (MACs read 0: take them
from the float model, which the INT8 one matches). It was tested on the CPU only.

ExecuTorch (with torchao) is an optional extra; ``check`` refuses this learner without it.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pf_ray.config import check_choice, check_range
from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError, DataError, ModelError
from pf_ray.export import executorch_pte
from pf_ray.export.int8 import quantize_onnx_int8
from pf_ray.export.onnx import eval_on_cpu, export_onnx
from pf_ray.packing import PackedTensor
from pf_ray.registry import LEARNERS
from pf_ray.train import make_loader

METHODS = ("ptq", "qat")
CALIBRATION_BATCH_SIZE = 64  # images per calibration batch (QAT warm-up, PTQ calibration, ONNX Runtime's too)
WEIGHT_BITS = 8
WEIGHT_QMAX = 127  # XNNPACK's symmetric weight range is [-127, 127]: -128 is left out so that -w is representable
ZERO_POINT = 128  # codes are stored unsigned: code = q + 128 in [1, 255]
PTE_SUFFIX = ".native.int8.pte"  # artifact_format reads it as pte_int8
ONNX_SUFFIX = ".native.int8.onnx"  # ... and this as onnx_int8
QUANTIZED_LAYERS = (nn.Conv2d, nn.Linear)

__all__ = ["NativeInt8", "NativeInt8Config", "QatGraph", "snap_to_int8_", "symmetric_int8"]


@dataclass(frozen=True)
class NativeInt8Config:
    method: str = "qat"  # "qat": fine-tune through XNNPACK's fake quantizers; "ptq": fine-tune float, calibrate
    calibration_batches: int = 4  # training batches (of 64) for the QAT ranges' warm-up or the PTQ calibration
    per_channel: bool = True  # weights: one scale per output channel (False: one per layer)
    seed: int = 0  # which calibration batches

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_range("calibration_batches", self.calibration_batches, low=1)


# --------------------------------------------------------------------------------------------------------------
# The weight grid (pure functions)


def symmetric_int8(weight: torch.Tensor, *, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``weight``: (q, scale) with ``weight ~ q * scale``.

    q: int64, shaped like ``weight``, in [-127, 127]; scale: (out_channels,) float32, max|w| / 127 of each output
    channel (axis 0), or (1,) for the whole tensor. A channel of zeros gets scale 1 (its codes are 0 whatever the
    scale). Rounding is half to even, so every weight is within scale / 2 of its level."""
    values = weight.detach().float()
    rows = values.reshape(values.shape[0], -1) if per_channel else values.reshape(1, -1)
    scale = rows.abs().amax(dim=1) / WEIGHT_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(rows / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
    return codes.to(torch.int64).reshape(values.shape), scale


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers whose weights are stored as int8, each once, in ``named_modules`` order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QUANTIZED_LAYERS)]


@torch.no_grad()
def snap_to_int8_(model: nn.Module, *, per_channel: bool = True) -> nn.Module:
    """Replace every conv/linear weight by its nearest point of the symmetric int8 grid (in place)."""
    for _, layer in quantized_layers(model):
        codes, scale = symmetric_int8(layer.weight, per_channel=per_channel)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.copy_(codes.to(torch.float32) * scale.reshape(shape))
    return model


# --------------------------------------------------------------------------------------------------------------
# The QAT graph as a trainable module


class QatGraph(nn.Module):
    """A pt2e QAT graph (``prepare_qat_pt2e``'s output) that trains and evaluates like an eager module.

    A pt2e graph refuses ``train()`` / ``eval()``: batch norm and dropout are baked into it as traced. Here
    ``train(mode)`` rewrites them with torchao's ``move_exported_model_to_train`` / ``_to_eval`` (about 0.6 s on
    one core, so only when the form changes), and turns the range observers on for training and off for
    evaluation: evaluating (the validation accuracy after every epoch) never moves a quantization range, and an
    evaluated model is exactly the fake-quantized model that ``convert_pt2e`` turns into integers.

    The state dict is the graph's, keyed ``graph.<name>``: the model's own parameter and buffer names, plus the
    fake quantizers' (``graph.activation_post_process_<i>.*``). Training mode is tracked here, not on the graph:
    torchao records it in a graph attribute that ``copy.deepcopy`` drops."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph
        self._graph_training = True  # the form batch norm / dropout have in the graph: exported in training

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training != self._graph_training:  # the flag was set directly (pf_ray.metrics.layer_table does)
            self.train(self.training)
        return self.graph(inputs)

    def train(self, mode: bool = True) -> QatGraph:
        from torchao.quantization.pt2e import (
            disable_observer,
            enable_observer,
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        if mode != self._graph_training:
            (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
            self._graph_training = mode
        self.graph.apply(enable_observer if mode else disable_observer)
        self.training = mode  # not the children's: the graph's own train()/eval() raise by design
        return self

    @torch.no_grad()
    def observe(self, images: torch.Tensor) -> None:
        """Warm the ranges up: run ``images`` (in batches of 64) with batch norm on its running statistics (so they
        do not move) and the observers on; the module is left in training mode."""
        from torchao.quantization.pt2e import enable_observer

        self.train(False)
        self.graph.apply(enable_observer)
        device = next(self.parameters()).device
        for chunk in images.split(CALIBRATION_BATCH_SIZE):
            self.graph(chunk.to(device))
        self.train(True)


# --------------------------------------------------------------------------------------------------------------
# The learner


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
        if not quantized_layers(model):
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
        was_training = model.training
        model.train()  # batch norm captured as in training: what the QAT conv-bn rewrite matches
        try:
            graph = torch.export.export(model, (images[:2].to(device),), dynamic_shapes=_DYNAMIC_BATCH).module()
        except Exception as error:  # torch.export raises many types; all mean "cannot capture this model"
            raise ModelError(f"native_int8: torch.export cannot capture {type(model).__name__} with a dynamic batch "
                             f"dimension: {_first_line(error)}") from error
        finally:
            model.train(was_training)
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
        missing = [f"{name}.weight" for name, _ in quantized_layers(float_model) if f"{name}.weight" not in trained]
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
        for name, layer in quantized_layers(model):
            codes, scale = symmetric_int8(layer.weight, per_channel=self.config.per_channel)
            packed[f"{name}.weight"] = PackedTensor.integer(
                codes + ZERO_POINT, WEIGHT_BITS, scale, torch.full_like(scale, ZERO_POINT, dtype=torch.int32))
        return packed

    # ---- the INT8 files

    def quantized_graph(self, model: nn.Module, data: DataBundle) -> torch.fx.GraphModule:
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
                trained = copy.deepcopy(self._trained).cpu()
                trained.eval()
                self._converted = convert_pt2e(trained.graph)
            return self._converted
        images = calibration_images(data, self.config.calibration_batches, seed=self.config.seed)
        with eval_on_cpu(model) as cpu_model, torch.no_grad():
            try:
                graph = torch.export.export(cpu_model, (images[:2],), dynamic_shapes=_DYNAMIC_BATCH).module()
            except Exception as error:
                raise ModelError(f"native_int8: torch.export cannot capture {type(model).__name__} with a dynamic "
                                 f"batch dimension: {_first_line(error)}") from error
            prepared = prepare_pt2e(graph, executorch_pte.xnnpack_quantizer(per_channel=self.config.per_channel))
            for chunk in images.split(CALIBRATION_BATCH_SIZE):
                prepared(chunk)
            return convert_pt2e(prepared)

    def int8_artifacts(self, model: nn.Module, data: DataBundle, out_dir: str | Path, stem: str) -> dict[str, Path]:
        """Write the learner's own deployable INT8 models for the finalized ``model``:

        - ``pte_int8``: ``<stem>.native.int8.pte``, ``quantized_graph`` lowered with the XNNPACK partitioner at
          batch 1 (as ``export_pte``); it runs on ExecuTorch (``PteSession``).
        - ``onnx_int8``: ``<stem>.native.int8.onnx``, ONNX Runtime's static QDQ quantization of the model's FP32
          ONNX, calibrated on the same training images (its weights are already on the int8 grid, so only the
          activation ranges are ONNX Runtime's own).
        """
        out_dir = Path(out_dir)
        pte = executorch_pte.export_quantized_pte(self.quantized_graph(model, data), data.input_shape,
                                                  out_dir / f"{stem}{PTE_SUFFIX}")
        images = calibration_images(data, self.config.calibration_batches, seed=self.config.seed)
        with tempfile.TemporaryDirectory(prefix="pf_ray_native_int8_") as work:
            fp32 = export_onnx(model, data.input_shape, Path(work) / f"{stem}.onnx")
            onnx_int8 = quantize_onnx_int8(fp32, out_dir / f"{stem}{ONNX_SUFFIX}", images,
                                           batch_size=CALIBRATION_BATCH_SIZE)
        return {"pte_int8": pte, "onnx_int8": onnx_int8}

    # ---- per-layer search: none (8 bits everywhere)

    def search_space(self, model: nn.Module, input_shape: tuple[int, int, int]) -> Any:
        return None

    def project(self, model: nn.Module, input_shape: tuple[int, int, int],
                values: Sequence[float]) -> tuple[float, ...]:
        return tuple(float(value) for value in values)


_DYNAMIC_BATCH = ({0: torch.export.Dim("batch")},)  # pt2e graphs would otherwise keep the example's batch size


def calibration_images(data: DataBundle, num_batches: int, *, seed: int = 0) -> torch.Tensor:
    """The first ``num_batches`` shuffled training batches of 64 (seeded: the same images every call), on the
    CPU: (N, C, H, W) float."""
    loader = make_loader(data.train, CALIBRATION_BATCH_SIZE, shuffle=True, seed=seed)
    batches = [inputs for inputs, _ in islice(loader, num_batches)]
    if not batches:
        raise DataError(f"native_int8: the training set of {data.name!r} is empty; nothing to calibrate on")
    return torch.cat(batches).float().cpu()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
