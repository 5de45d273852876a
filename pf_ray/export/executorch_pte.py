"""ExecuTorch programs (``.pte``) with the XNNPACK delegate: what an Android/iOS app built on PyTorch runs.

FP32: ``torch.export`` -> ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` -> ``.pte``.
INT8: the same after PyTorch 2 export quantization (pt2e) with XNNPACK's quantizer: int8 weights per output
channel, int8 activations calibrated on training images (post-training; a learner that trains with fake
quantization hands over an already-quantized graph instead: ``export_quantized_pte``). ``xnnpack_quantizer`` is
the one quantizer setup that both use; it can leave chosen conv/linear layers in FP32 (``fp32_layers``).

The program has a fixed batch of 1 (phones infer one image at a time). ``PteSession`` runs a ``.pte`` through
ExecuTorch's own runtime with the small part of ONNX Runtime's session interface that verification uses; a
batch of N images runs as N calls. ExecuTorch is an optional extra (``pip install 'pf-ray[executorch]'``);
without it the formats ``pte`` / ``pte_int8`` are refused when the config is read.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pf_ray.errors import ExportError
from pf_ray.export.onnx import eval_on_cpu
from pf_ray.files import atomic_write
from pf_ray.progress import ProgressBar

PTE_BATCH = 1
INSTALL_HINT = "pip install 'pf-ray[executorch]' (ExecuTorch 1.5)"


def executorch_available() -> bool:
    return importlib.util.find_spec("executorch") is not None


def _require_executorch() -> None:
    if not executorch_available():
        raise ExportError(f"the .pte formats need ExecuTorch, which is not installed: {INSTALL_HINT}")


def export_pte(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *,
               calibration: torch.Tensor | None = None, batch_size: int = PTE_BATCH,
               fp32_layers: Sequence[str] = ()) -> Path:
    """Write ``model`` as an XNNPACK-delegated ExecuTorch program; INT8 when ``calibration`` images are given.

    ``batch_size`` fixes the program's batch (1 for phones; a larger one to measure throughput). ``fp32_layers``:
    module names whose convolutions and linear layers an INT8 program keeps in FP32 (see ``xnnpack_quantizer``);
    an FP32 program has nothing to keep."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    example = (torch.zeros(batch_size, *input_shape),)
    with eval_on_cpu(model) as cpu_model, torch.no_grad():
        try:
            graph = torch.export.export(cpu_model, example)
            if calibration is not None:
                graph = torch.export.export(
                    quantize_pt2e(graph.module(), calibration, batch_size, label=f"  calibrate {path.name}",
                                  fp32_layers=fp32_layers), example)
            program = to_edge_transform_and_lower(graph, partitioner=[XnnpackPartitioner()]).to_executorch()
        except ExportError:  # a name in fp32_layers that is no layer: the caller's mistake, not ExecuTorch's
            raise
        except Exception as error:  # torch.export / ExecuTorch raise many types; all mean "cannot lower this"
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"ExecuTorch cannot lower {type(model).__name__} to {path.name}: {first}") from error
    return atomic_write(path, program.buffer)  # appears only when complete


def export_quantized_pte(graph_module: torch.fx.GraphModule, input_shape: tuple[int, ...], path: str | Path, *,
                         batch_size: int = PTE_BATCH) -> Path:
    """Write an already-quantized graph (``convert_pt2e``'s output: quantize/dequantize around int8 weights)
    as an XNNPACK-delegated program, re-exported with a fixed batch of ``batch_size``.

    The graph is neither calibrated nor put in eval mode here (pt2e graphs refuse ``.eval()``): whoever
    converted it chose its ranges, e.g. a learner after quantization-aware training."""
    _require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    example = (torch.zeros(batch_size, *input_shape),)
    with torch.no_grad():
        try:
            graph = torch.export.export(graph_module, example)
            program = to_edge_transform_and_lower(graph, partitioner=[XnnpackPartitioner()]).to_executorch()
        except Exception as error:  # torch.export / ExecuTorch raise many types; all mean "cannot lower this"
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"ExecuTorch cannot lower the quantized graph to {path.name}: {first}") from error
    return atomic_write(path, program.buffer)  # appears only when complete


def xnnpack_quantizer(*, is_qat: bool = False, per_channel: bool = True, fp32_layers: Sequence[str] = ()) -> Any:
    """XNNPACK's pt2e quantizer: int8 activations per tensor (asymmetric, ranges from observers), int8 weights
    symmetric in [-127, 127] per output channel (or per tensor). ``is_qat``: fake quantizers that train
    (moving-average ranges, straight-through rounding) instead of post-training observers.

    ``fp32_layers``: module names (``model.named_modules()``, e.g. "layer1.0.conv1"; a name covers its
    submodules) whose operators are left unannotated, so their weights stay float and XNNPACK runs them in FP32.
    Their input is still rounded to int8 where the operator producing it is quantized (its output is): the weights
    and the arithmetic are FP32. Names are not checked here (the quantizer has no graph yet): ``quantize_pt2e``
    checks them."""
    _require_executorch()
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantizer import get_module_name_filter

    if isinstance(fp32_layers, str):  # one name would otherwise be taken as its characters
        raise ExportError(f"fp32_layers: got the string {fp32_layers!r}; expected a sequence of module names")
    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=is_qat))
    if fp32_layers:
        # Not set_module_name(name, None): ExecuTorch 1.5 asserts that its config is not None. The filter function
        # applies to every pattern, and a pattern (conv + relu, say) is skipped when any of its nodes is filtered.
        in_fp32 = [get_module_name_filter(name) for name in fp32_layers]
        quantizer.set_filter_function(lambda node: not any(belongs(node) for belongs in in_fp32))
    return quantizer


def quantize_pt2e(graph_module: torch.fx.GraphModule, calibration: torch.Tensor, batch_size: int, *,
                  label: str, fp32_layers: Sequence[str] = ()) -> torch.fx.GraphModule:
    """pt2e post-training quantization for XNNPACK: symmetric int8, weights per output channel, calibrated on
    ``calibration`` in chunks of ``batch_size`` (the graph's batch where it is fixed; a last, short chunk repeats
    its images); the ``fp32_layers`` stay FP32 (see ``xnnpack_quantizer``).

    Returns ``convert_pt2e``'s graph: quantize/dequantize around int8 weights and activations, which runs in torch
    as simulated INT8 (``quantized_accuracy``) or is re-exported and lowered (``export_pte``).

    Raises:
        ExportError: a name in ``fp32_layers`` that owns no convolution or linear layer of the graph.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    _check_fp32_layers(graph_module, fp32_layers)
    prepared = prepare_pt2e(graph_module, xnnpack_quantizer(per_channel=True, fp32_layers=fp32_layers))
    with ProgressBar(label, -(-len(calibration) // batch_size), unit="batches") as bar:
        for start in range(0, len(calibration), batch_size):
            chunk = calibration[start : start + batch_size]
            if len(chunk) < batch_size:  # a last, short chunk: repeat its images up to the batch
                chunk = chunk.repeat(-(-batch_size // len(chunk)), 1, 1, 1)[:batch_size]
            prepared(chunk)
            bar.update()
    return convert_pt2e(prepared)


def _check_fp32_layers(graph_module: torch.fx.GraphModule, fp32_layers: Sequence[str]) -> None:
    """ExportError for a name that is no convolution or linear layer of the exported graph, nor contains one
    (a typo, or a BatchNorm that folds into its convolution): it would silently be quantized."""
    weighted = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
    layers = []  # the innermost module of each convolution / linear node, in graph order
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op == "call_function" and node.target in weighted and stack:
            path, _ = list(stack.values())[-1]
            layers.append(path.removeprefix("L['self']."))
    layers = list(dict.fromkeys(layers))  # a module called twice is one layer
    for name in fp32_layers:
        if not any(layer == name or layer.startswith(f"{name}.") for layer in layers):
            known = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
            raise ExportError(f"fp32_layers: {name!r} is no convolution or linear layer of the model, nor contains "
                              f"one; its layers are: {known or 'none'}")


@dataclass(frozen=True)
class _Input:
    name: str
    shape: list[Any]


class PteSession:
    """A ``.pte`` run by ExecuTorch's runtime, looking enough like an ONNX Runtime session for verification."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        _require_executorch()
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"artifact {str(path)!r} does not exist")
        with open(path, "rb") as file:
            head = file.read(8)
        # A program is a flatbuffer with file identifier "ET<version>" at byte 4. Checked before the runtime is
        # loaded: given anything else, ExecuTorch's C++ loader logs to stderr before it fails.
        if head[4:6] != b"ET":
            raise ExportError(f"{str(path)!r} is not an ExecuTorch program (no 'ET' file identifier at byte 4)")
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime

        _unsafe_reset_threadpool(threads)  # XNNPACK's pool is process-wide: set it for this measurement
        try:
            self._method = Runtime.get().load_program(path).load_method("forward")
        except Exception as error:
            raise ExportError(f"ExecuTorch cannot load {str(path)!r}: {error}") from error
        meta = self._method.metadata
        shapes = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        outputs = [list(meta.output_tensor_meta(i).sizes()) for i in range(meta.num_outputs())]
        self._batch = shapes[0][0]  # the program's fixed batch
        self._inputs = [_Input("input", [*shape]) for shape in shapes]
        self._outputs = [_Input("logits", [*shape]) for shape in outputs]

    def get_inputs(self) -> list[_Input]:
        return self._inputs

    def get_outputs(self) -> list[_Input]:
        return self._outputs

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Outputs for a batch of any size: the fixed-batch program is called once per chunk of its batch size
        (a last, shorter chunk is padded with zeros and the padding's outputs dropped)."""
        (inputs,) = feed.values()
        tensor = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
        outputs = []
        for start in range(0, len(tensor), self._batch):
            chunk = tensor[start : start + self._batch]
            padded = torch.cat([chunk, chunk.new_zeros(self._batch - len(chunk), *chunk.shape[1:])])
            outputs.append(self._method.execute([padded])[0][: len(chunk)])
        return [torch.cat(outputs).numpy()]
