"""Export a PyTorch model to an FP32 ONNX file with a dynamic batch dimension."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from pf_ray.errors import ExportError
from pf_ray.files import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: str | Path, *, opset: int = 17) -> Path:
    """Write ``model`` (in eval mode, on the CPU) as ONNX with input ``"input"`` and output ``"logits"``.

    The batch dimension is dynamic; the file is checked with ``onnx.checker`` and appears only when complete,
    so a failed export leaves no file behind (and an existing file at ``path`` untouched).

    Args:
        model: the model; its device and train/eval mode are left as they were.
        input_shape: one example's shape, e.g. (channels, height, width).
        path: the ``.onnx`` file to write.
        opset: the ONNX opset to target.

    Raises:
        ExportError: the exporter rejects the model (e.g. an operator ONNX has no equivalent for) or the
            exported graph fails the checker.
    """
    shape = _check_shape(input_shape)
    path = Path(path)
    # Batch 2, not 1: the tracer could otherwise fold size-1 dimensions (squeeze, broadcasting) into
    # constants that break other batch sizes.
    example = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0))
    with eval_on_cpu(model) as cpu_model, atomic_path(path) as tmp_path:
        try:
            with warnings.catch_warnings():
                # The legacy exporter announces its deprecation on every call; TracerWarnings stay visible.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                # The legacy TorchScript exporter, not the dynamo one: it needs no onnxscript, supports every
                # opset in ExportConfig's range (dynamo insists on >= 18, our default is 17), folds BatchNorm
                # into the convolutions, and takes about a second on a ResNet-20.
                torch.onnx.export(
                    cpu_model,
                    (example,),
                    str(tmp_path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}},
                    do_constant_folding=True,
                )
        except Exception as error:  # the exporter raises many types (OnnxExporterError, RuntimeError, ...)
            raise ExportError(
                f"cannot export {type(model).__name__} to ONNX (opset {opset}, input shape {shape}): "
                f"{type(error).__name__}: {_first_line(error)}"
            ) from error
        check_onnx_file(tmp_path)
    return path


def check_onnx_file(path: Path) -> None:
    """Run ``onnx.checker`` (with shape inference) on a file; ExportError if it fails."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"{path.name} fails the ONNX checker: {_first_line(error)}") from error


@contextlib.contextmanager
def eval_on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """Yield ``model`` in eval mode on the CPU; the caller's model keeps its device and mode afterwards."""
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    if not on_cpu:
        # A copy, so that the caller's (e.g. GPU) model is not moved under its feet.
        yield copy.deepcopy(model).cpu().eval()
        return
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ExportError(
            f"input_shape: got {input_shape!r}; expected positive integers without the batch dimension, "
            "e.g. (1, 28, 28)"
        )
    return shape


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else repr(error)
