"""INT8 ONNX by ONNX Runtime static quantization: QDQ format, per-channel weights (Jacob et al., CVPR 2018)."""

from __future__ import annotations

import enum
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime import quantization as ort_quantization
from onnxruntime.quantization.shape_inference import quant_pre_process

from pf_ray.errors import ExportError
from pf_ray.export.onnx import check_onnx_file
from pf_ray.files import atomic_path
from pf_ray.progress import ProgressBar

# Activations as unsigned 8-bit (QUInt8), weights as signed 8-bit per output channel (QInt8): "U8S8".
# Measured on this project's AMD EPYC (AVX2, no VNNI), ONNX Runtime 1.32, one thread, ResNet-20 on 1x28x28,
# median of 5 interleaved rounds of 100 runs:
#   batch 1:  FP32 0.79 ms | U8S8 0.53 ms (1.48x faster) | S8S8 1.14 ms (0.69x: slower than FP32)
#   batch 32: FP32 24.2 ms | U8S8 15.6 ms (1.55x faster) | S8S8 34.0 ms (0.71x)
# Without VNNI, ONNX Runtime's x86 integer kernels are built around u8 x s8 products (VPMADDUBSW); S8S8 takes
# a slower path. Output parity was alike (max |logit diff| vs FP32: U8S8 0.017, S8S8 0.015). reduce_range
# stays off: VPMADDUBSW can saturate on U8S8, but ONNX Runtime documents that as rarely costing accuracy;
# turn it on if an INT8 model loses accuracy that its FP32 twin keeps.
ACTIVATION_TYPE = ort_quantization.QuantType.QUInt8
WEIGHT_TYPE = ort_quantization.QuantType.QInt8
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")  # what a torch conv / linear becomes in ONNX (fp32_layers keeps them)


class CalibrationMethod(enum.StrEnum):
    """How activation ranges are taken from the calibration images."""

    MINMAX = "minmax"  # the observed minimum and maximum: the default, robust with a few hundred images
    PERCENTILE = "percentile"  # clip the histogram's tail at the 99.999th percentile (outlier activations)


_ORT_METHODS = {
    CalibrationMethod.MINMAX: ort_quantization.CalibrationMethod.MinMax,
    CalibrationMethod.PERCENTILE: ort_quantization.CalibrationMethod.Percentile,
}


def quantize_onnx_int8(
    fp32_path: str | Path,
    int8_path: str | Path,
    calibration: torch.Tensor,
    *,
    method: CalibrationMethod | str = CalibrationMethod.MINMAX,
    batch_size: int = 32,
    fp32_layers: Sequence[str] = (),
) -> Path:
    """Quantize an FP32 ONNX file to INT8 QDQ; activation ranges come from running ``calibration`` through it.

    Args:
        fp32_path: the FP32 model, e.g. from ``export_onnx``.
        int8_path: the file to write; it appears only when complete and checked.
        calibration: (N, C, H, W) float inputs, normalised like the training data (e.g. 256 training images).
        method: "minmax" or "percentile".
        batch_size: calibration images per ONNX Runtime run.
        fp32_layers: torch module names (``model.named_modules()`` of the exported model, e.g. "layer1.0.conv1",
            "fc") whose Conv / Gemm / MatMul nodes stay FP32; a name covers its submodules too ("layer1.0": both
            convolutions of that block). Found by ``layer_nodes`` from the node names of ``export_onnx``. Their
            weights and arithmetic stay float; their input is still rounded to uint8 where the node producing it
            is quantized.

    Raises:
        ExportError: bad calibration data, a name in ``fp32_layers`` that matches no node, or ONNX Runtime cannot
            quantize the model.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    try:
        method = CalibrationMethod(method)
    except ValueError:
        allowed = ", ".join(m.value for m in CalibrationMethod)
        raise ExportError(f"method: got {method!r}; allowed: {allowed}") from None
    if calibration.ndim < 2 or len(calibration) == 0 or not calibration.is_floating_point():
        raise ExportError(
            f"calibration: got a {calibration.dtype} tensor of shape {tuple(calibration.shape)}; "
            "expected a non-empty float batch (N, C, H, W)"
        )
    if not fp32_path.is_file():
        raise ExportError(f"fp32_path: {str(fp32_path)!r} does not exist")
    input_name = onnx.load(str(fp32_path), load_external_data=False).graph.input[0].name
    reader = _TensorReader(input_name, calibration.detach().cpu().float().numpy(), batch_size,
                           label=f"  calibrate {int8_path.name}")

    with tempfile.TemporaryDirectory(prefix="pf_ray_int8_") as work, atomic_path(int8_path) as tmp_path:
        source = _preprocess(fp32_path, Path(work) / "preprocessed.onnx")
        # Matched on the graph the quantizer is given: pre-processing could rename or fuse nodes.
        excluded = _nodes_to_exclude(onnx.load(str(source), load_external_data=False), fp32_layers, fp32_path.name)
        if excluded:
            source = _unshare_parameters(source, set(excluded), Path(work) / "unshared.onnx")
        try:
            ort_quantization.quantize_static(
                source,
                tmp_path,
                reader,
                nodes_to_exclude=excluded,
                quant_format=ort_quantization.QuantFormat.QDQ,
                per_channel=True,
                activation_type=ACTIVATION_TYPE,
                weight_type=WEIGHT_TYPE,
                calibrate_method=_ORT_METHODS[method],
            )
        except Exception as error:  # ONNX Runtime raises plain Exceptions, RuntimeErrors, ValueErrors, ...
            raise ExportError(
                f"ONNX Runtime cannot quantize {fp32_path.name} to INT8: {type(error).__name__}: {error}"
            ) from error
        if excluded:
            _keep_float(tmp_path, set(excluded))
        check_onnx_file(tmp_path)
    return int8_path


def _unshare_parameters(source: Path, excluded: set[str], out_path: Path) -> Path:
    """``source`` with each initializer that an excluded node shares with other nodes copied for that node.

    The exporter stores equal tensors once (an untrained model's folded biases are all zeros: one initializer for
    many convs). The quantizer then quantizes a shared bias for its INT8 users, and the excluded node would read the
    INT8 version through a DequantizeLinear: a bias in another layer's scale, and (not an initializer any more) no
    blocked NCHWc kernel in ONNX Runtime, which made an FP32 3x3 conv of ResNet-20 cost 54 us instead of 19 here."""
    model = onnx.load(str(source))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    changed = False
    for node in graph.node:
        if node.name not in excluded:
            continue
        for position, name in enumerate(node.input):
            if position > 0 and name in initializers and users[name] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(initializers[name])
                copy.name = f"{node.name}/{name}/fp32"
                graph.initializer.append(copy)
                node.input[position] = copy.name
                changed = True
    if not changed:
        return source
    onnx.save(model, str(out_path))
    return out_path


def _keep_float(path: Path, excluded: set[str]) -> None:
    """Keep the excluded Conv/Gemm nodes float when ONNX Runtime loads the file, not only in it.

    ONNX Runtime's ``WeightBiasQuantization`` optimizer (on by default) quantizes the float weight of any Conv,
    ConvTranspose or Gemm whose input comes from a DequantizeLinear with one scale, to INT8 *per tensor*, at session
    load: an excluded layer fed by a quantized one would run as INT8 after all (measured on ResNet-20 with two 3x3
    convs excluded: QLinearConv in the profile, with a coarser weight grid than the quantizer's per-channel one).
    The optimizer leaves a DequantizeLinear with per-axis scales alone, so each such node gets its own
    DequantizeLinear of the same tensor with its scale and zero point repeated per input channel (axis 1): the same
    numbers, the node float at run time (outputs identical to a session with that optimizer disabled)."""
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    nodes = []
    for node in graph.node:
        source = producers.get(node.input[0]) if node.input else None
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if (node.name in excluded and node.op_type in ("Conv", "Gemm") and source is not None
                and source.op_type == "DequantizeLinear" and len(source.input) == 3 and weight is not None
                and weight.data_type == onnx.TensorProto.FLOAT):
            channels = _input_channels(node, numpy_helper.to_array(weight).shape)
            scale, zero_point = (numpy_helper.to_array(initializers[name]) for name in source.input[1:])
            if scale.size == 1:
                names = [f"{node.name}/fp32_input_scale", f"{node.name}/fp32_input_zero_point"]
                for name, value in zip(names, (scale, zero_point), strict=True):
                    repeated = np.full(channels, value.item(), value.dtype)
                    graph.initializer.append(numpy_helper.from_array(repeated, name))
                output = f"{node.name}/fp32_input"
                nodes.append(onnx.helper.make_node("DequantizeLinear", [source.input[0], *names], [output],
                                                   name=f"{node.name}/fp32_input_dq", axis=1))
                node.input[0] = output
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


def _input_channels(node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> int:
    """The channels of a Conv's or Gemm's input (axis 1) from its weight's shape."""
    attributes = {attribute.name: attribute.i for attribute in node.attribute}
    if node.op_type == "Conv":
        return weight_shape[1] * attributes.get("group", 1)
    return weight_shape[1] if attributes.get("transB", 0) else weight_shape[0]  # Gemm: (K, N), or (N, K) transposed


def _preprocess(fp32_path: Path, out_path: Path) -> Path:
    """ONNX Runtime's recommended pre-processing: symbolic shape inference + graph optimisation.

    It gives the quantizer every tensor's shape (needed to pick per-channel axes); on ResNet-20 it changes
    latency by less than 1% (0.533 vs 0.536 ms at batch 1), since export already folds BatchNorm. A model it
    cannot process is quantized as exported.
    """
    try:
        quant_pre_process(str(fp32_path), str(out_path))
    except Exception as error:  # symbolic shape inference gives up on some exotic graphs
        warnings.warn(
            f"quant_pre_process failed on {fp32_path.name} ({type(error).__name__}: {error}); "
            "quantizing the model as exported",
            stacklevel=3,
        )
        return fp32_path
    return out_path


def layer_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Torch module name -> the names of the Conv / Gemm / MatMul nodes it became, from ``export_onnx``'s node
    names.

    The TorchScript exporter names a node after the modules called on the way to it, one ``/``-separated part per
    module, then the op: ``/layer1/layer1.0/conv1/Conv`` for ``layer1.0.conv1``, ``/fc/Gemm``. Each part is the
    module's qualified name from its last non-numeric atom on (torch.onnx's ``_unqualified_variable_name``: "conv1",
    "layer1.0", "shortcut.0"), so the qualified name is rebuilt by appending each part to its caller's name after
    the atoms they share ("layer1" + "layer1.0" -> "layer1.0"; "layer1.0" + "conv1" -> "layer1.0.conv1"). A
    container that is iterated rather than called (``nn.ModuleList``) leaves no part of its own, which this rule
    absorbs ("blocks.0" is a whole part); a plain container module whose child is called from outside it would
    not be (its name is missing from the chain).
    """
    layers: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS or not node.name.startswith("/"):
            continue
        *scopes, _op = node.name[1:].split("/")
        name: list[str] = []
        for part in scopes:
            atoms = part.split(".")
            shared = next((k for k in range(min(len(name), len(atoms) - 1), 0, -1) if name[-k:] == atoms[:k]), 0)
            name += atoms[shared:]
        if name:  # a node of the root module itself (a functional conv in forward) has no layer name
            layers.setdefault(".".join(name), []).append(node.name)
    return layers


def _nodes_to_exclude(model: onnx.ModelProto, fp32_layers: Sequence[str], file_name: str) -> list[str]:
    """The nodes of ``fp32_layers`` and their submodules; ExportError for a name that matches none."""
    if isinstance(fp32_layers, str):  # one name would otherwise be taken as its characters
        raise ExportError(f"fp32_layers: got the string {fp32_layers!r}; expected a sequence of module names")
    layers = layer_nodes(model)
    excluded: list[str] = []
    for layer in fp32_layers:
        nodes = [node for name, names in layers.items() if name == layer or name.startswith(f"{layer}.")
                 for node in names]
        if not nodes:
            known = ", ".join(list(layers)[:8]) + (", ..." if len(layers) > 8 else "")
            raise ExportError(f"fp32_layers: {layer!r} matches no Conv/Gemm/MatMul node of {file_name}; its layers "
                              f"are: {known or 'none'}")
        excluded += [node for node in nodes if node not in excluded]
    return excluded


class _TensorReader(ort_quantization.CalibrationDataReader):
    """Feeds a (N, C, H, W) array to ONNX Runtime's calibrator in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int, label: str) -> None:
        self.input_name = input_name
        self.images = np.ascontiguousarray(images, dtype=np.float32)
        self.batch_size = max(1, batch_size)
        self.position = 0
        self.bar = ProgressBar(label, -(-len(self.images) // self.batch_size), unit="batches")

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            self.bar.close()
            return None
        batch = self.images[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        self.bar.update()
        return {self.input_name: batch}

    def rewind(self) -> None:
        self.position = 0
