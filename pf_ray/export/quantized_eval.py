"""The accuracy a model's INT8 artifact would have on a deployment target, with chosen layers kept in FP32: fast
enough to run in every trial of a joint pruning-and-precision search (no lowering, no file kept)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pf_ray.config import Precision, Runtime, TargetConfig
from pf_ray.errors import ExportError
from pf_ray.export.onnx import eval_on_cpu

EVAL_BATCH = 256  # images per forward pass when evaluating


def quantized_accuracy(model: nn.Module, input_shape: Sequence[int], target: TargetConfig, calibration: torch.Tensor,
                       images: torch.Tensor, labels: torch.Tensor, *, fp32_layers: Sequence[str] = ()) -> float:
    """Fraction of ``images`` (in [0, 1]) that the target's INT8 artifact of ``model`` classifies as ``labels``,
    with the ``fp32_layers`` (module names, e.g. "layer1.0.conv1") left in FP32.

    ONNX Runtime: the FP32 ONNX file and its INT8 QDQ twin are written in a temporary folder exactly as
    ``export_all`` writes them (``export_onnx`` + ``quantize_onnx_int8``) and the INT8 file is run by ONNX Runtime.
    ExecuTorch: the model is quantized by pt2e with XNNPACK's quantizer as ``export_pte`` does and the converted
    graph is run in torch: quantize/dequantize around float operators, the same ranges and int8 values as the
    program, without the ~10 s of lowering to XNNPACK (its integer kernels round differently in the last bit).
    An FP32 target has no INT8 artifact: its accuracy is the model's own, in torch, and ``fp32_layers`` is ignored.

    Args:
        model: the model to deploy (e.g. channel-pruned); its device and train/eval mode are left as they were.
        input_shape: one image's shape, e.g. (channels, height, width).
        target: the deployment target (runtime and precision).
        calibration: (N, C, H, W) images the activation ranges come from, like the export's (training images).
        images: (M, C, H, W) images to classify, normalised like the training data.
        labels: (M,) their class indices.
        fp32_layers: module names whose convolutions and linear layers stay FP32; a name covers its submodules.

    Raises:
        ExportError: ``images`` and ``labels`` disagree, or a name in ``fp32_layers`` is no layer of the model.
    """
    if images.ndim < 2 or len(images) == 0 or labels.shape != (len(images),):
        raise ExportError(f"images, labels: got shapes {tuple(images.shape)} and {tuple(labels.shape)}; expected a "
                          f"non-empty (M, C, H, W) batch and (M,) class indices")
    if target.precision is Precision.INT8 and (calibration.ndim < 2 or len(calibration) == 0
                                               or not calibration.is_floating_point()):
        raise ExportError(f"calibration: got a {calibration.dtype} tensor of shape {tuple(calibration.shape)}; "
                          "expected a non-empty float batch (N, C, H, W)")
    shape = tuple(input_shape)
    if target.precision is Precision.FP32:
        with eval_on_cpu(model) as cpu_model, torch.no_grad():
            logits = _batched(cpu_model, images)
    elif target.runtime is Runtime.EXECUTORCH:
        logits = _executorch_logits(model, shape, calibration, images, fp32_layers)
    else:
        logits = _onnxruntime_logits(model, shape, calibration, images, fp32_layers)
    return float((logits.argmax(dim=1) == labels.cpu()).float().mean())


def _onnxruntime_logits(model: nn.Module, input_shape: tuple[int, ...], calibration: torch.Tensor,
                        images: torch.Tensor, fp32_layers: Sequence[str]) -> torch.Tensor:
    from pf_ray.export.int8 import quantize_onnx_int8
    from pf_ray.export.onnx import export_onnx
    from pf_ray.export.verify import onnx_session

    with tempfile.TemporaryDirectory(prefix="pf_ray_quantized_eval_") as work:
        fp32_path = export_onnx(model, input_shape, Path(work) / "model.onnx")
        int8_path = quantize_onnx_int8(fp32_path, Path(work) / "model.int8.onnx", calibration,
                                       fp32_layers=fp32_layers)
        # As many threads as torch has in this process (a Ray trial's CPUs).
        session = onnx_session(int8_path, threads=torch.get_num_threads())
        input_name = session.get_inputs()[0].name
        inputs = images.detach().cpu().float().numpy()
        outputs = [session.run(None, {input_name: inputs[start : start + EVAL_BATCH]})[0]
                   for start in range(0, len(inputs), EVAL_BATCH)]
        del session  # closes the file before its folder goes
    return torch.from_numpy(np.concatenate(outputs))


def _executorch_logits(model: nn.Module, input_shape: tuple[int, ...], calibration: torch.Tensor,
                       images: torch.Tensor, fp32_layers: Sequence[str]) -> torch.Tensor:
    from pf_ray.export.executorch_pte import quantize_pt2e

    # A free batch dimension, so that calibration runs in one pass and evaluation in a few. The .pte exporter
    # calibrates its batch-1 program image by image, to the same ranges within about 1e-9 relative (measured on a
    # ResNet-20, 256 images) but about 3x slower (4.1 s against 1.5 s in batches of 32).
    example = (torch.zeros(2, *input_shape),)
    with eval_on_cpu(model) as cpu_model, torch.no_grad():
        graph = torch.export.export(cpu_model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
        converted = quantize_pt2e(graph.module(), calibration.detach().cpu().float(), len(calibration),
                                  label="  calibrate (pt2e)", fp32_layers=fp32_layers)
        return _batched(converted, images)


def _batched(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    inputs = images.detach().cpu().float()
    return torch.cat([model(inputs[start : start + EVAL_BATCH]) for start in range(0, len(inputs), EVAL_BATCH)])
