"""INT8 artifacts with chosen layers kept in FP32 (joint pruning and precision): module names -> ONNX nodes, the
excluded layers' weights float in the QDQ ONNX file and the pt2e graph, the simulated INT8 accuracy a search uses,
and ``export_all`` / the manifest honouring a learner's ``fp32_layers``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pf_ray.config import ExperimentConfig, ExportConfig, Precision, Runtime, TargetConfig, executorch_installed
from pf_ray.errors import ExportError
from pf_ray.export import export_all, export_onnx, onnx_session, quantize_onnx_int8, quantized_accuracy
from pf_ray.export.int8 import layer_nodes
from pf_ray.export.pipeline import LearnerModel, export_and_verify
from pf_ray.latency.measure import export_artifact
from pf_ray.learners.base import KeepsFp32Layers
from tests.tiny import tiny_cnn, tiny_data, tiny_resnet20

SHAPE = (1, 8, 8)  # tiny_cnn's input
needs_executorch = pytest.mark.skipif(not executorch_installed(), reason="ExecuTorch (optional extra) not installed")


class _Nested(nn.Module):
    """The naming cases: an iterated ModuleList, a Sequential inside a block, a linear on the last axis (MatMul)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
                                     nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())])
        self.mix = nn.Linear(8, 8)  # over the width: MatMul + Add, not Gemm
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.mix(x))


def _weighted_layers(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d | nn.Linear)}


def _weight_producers(path) -> dict[str, str]:
    """Conv/Gemm/MatMul node name -> what feeds its weight: "DequantizeLinear" (INT8) or "initializer" (FP32)."""
    graph = onnx.load(str(path)).graph
    producer = {output: node.op_type for node in graph.node for output in node.output}
    return {node.name: producer.get(node.input[1], "initializer") for node in graph.node
            if node.op_type in ("Conv", "Gemm", "MatMul")}


@pytest.mark.parametrize(("build", "shape"), [(tiny_resnet20, (1, 16, 16)), (_Nested, SHAPE), (tiny_cnn, SHAPE)])
def test_every_conv_and_linear_is_found_by_its_module_name(build, shape, tmp_path) -> None:
    """Each of the model's convolutions and linear layers owns exactly one node, named as the exporter names it."""
    model = build()
    layers = layer_nodes(onnx.load(str(export_onnx(model, shape, tmp_path / "m.onnx"))))
    assert set(layers) == _weighted_layers(model)
    assert all(len(nodes) == 1 for nodes in layers.values())
    if build is tiny_resnet20:
        assert layers["layer1.0.conv1"] == ["/layer1/layer1.0/conv1/Conv"]
        assert layers["layer2.0.shortcut.0"] == ["/layer2/layer2.0/shortcut/shortcut.0/Conv"]
    if build is _Nested:
        assert layers == {"blocks.0.0": ["/blocks.0/blocks.0.0/Conv"], "blocks.1.0": ["/blocks.1/blocks.1.0/Conv"],
                          "mix": ["/mix/MatMul"], "head.1": ["/head/head.1/Gemm"]}


def test_onnx_int8_keeps_the_fp32_layers_float_and_still_matches(tmp_path) -> None:
    """The excluded conv ("3") and linear ("9") take float weights (no DequantizeLinear), the others int8 ones; the
    outputs stay close to FP32's."""
    model = tiny_cnn().eval()
    calibration = torch.randn(32, *SHAPE, generator=torch.Generator().manual_seed(1))
    fp32_path = export_onnx(model, SHAPE, tmp_path / "m.onnx")
    int8_path = quantize_onnx_int8(fp32_path, tmp_path / "m.int8.onnx", calibration, fp32_layers=["3", "9"])
    assert _weight_producers(int8_path) == {"/0/Conv": "DequantizeLinear", "/3/Conv": "initializer",
                                            "/5/Conv": "DequantizeLinear", "/9/Gemm": "initializer",
                                            "/11/Gemm": "DequantizeLinear"}
    with torch.no_grad():
        expected = model(calibration).numpy()
    (got,) = onnx_session(int8_path).run(None, {"input": calibration.numpy()})
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_onnx_runtime_does_not_quantize_the_fp32_layers_back_when_it_loads_the_file(tmp_path, monkeypatch) -> None:
    """ONNX Runtime's WeightBiasQuantization optimizer (on by default) would quantize an excluded conv fed by a
    DequantizeLinear to INT8 per tensor at session load; the file keeps it float: a default session computes exactly
    what a session without that optimizer does. Without the per-axis input (``_keep_float`` skipped) it does not."""
    import onnxruntime as ort

    import pf_ray.export.int8 as int8

    model = tiny_resnet20().eval()
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():  # trained-like batch norms: each folded conv gets a bias of its own (untrained
        if isinstance(module, nn.BatchNorm2d):  # ones fold to equal zero biases, which the exporter shares)
            module.running_mean.normal_(0, 0.1, generator=generator)
            module.bias.data.normal_(0, 0.1, generator=generator)
    calibration = torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(1))
    fp32_path = export_onnx(model, SHAPE, tmp_path / "m.onnx")

    def outputs(path, **options):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"], **options)
        return session.run(None, {session.get_inputs()[0].name: calibration.numpy()})[0]

    def gap(path):
        return np.abs(outputs(path) - outputs(path, disabled_optimizers=["WeightBiasQuantization"])).max()

    layers = ["layer1.1.conv2", "layer2.0.conv2", "layer3.2.conv1", "fc"]
    kept = int8.quantize_onnx_int8(fp32_path, tmp_path / "kept.int8.onnx", calibration, fp32_layers=layers)
    assert gap(kept) == 0.0
    monkeypatch.setattr(int8, "_keep_float", lambda path, excluded: None)
    plain = int8.quantize_onnx_int8(fp32_path, tmp_path / "plain.int8.onnx", calibration, fp32_layers=layers)
    assert gap(plain) > 0.0  # the optimizer re-quantized the excluded convs


def test_an_fp32_layer_gets_its_own_float_bias_where_equal_tensors_were_shared(tmp_path, monkeypatch) -> None:
    """An untrained model's folded biases are equal zeros, stored once for many convs after ONNX Runtime's
    pre-processing; the quantizer quantizes that tensor for its INT8 users, and the excluded conv must not read it
    through a DequantizeLinear (without the copy, ``_unshare_parameters`` skipped, it does)."""
    import pf_ray.export.int8 as int8

    fp32_path = export_onnx(tiny_resnet20().eval(), SHAPE, tmp_path / "m.onnx")

    def bias_producer(path) -> str:
        graph = onnx.load(str(path)).graph
        initializers = {tensor.name: tensor for tensor in graph.initializer}
        conv = next(node for node in graph.node if node.name == "/layer2/layer2.0/conv2/Conv")
        if conv.input[2] in initializers:
            return onnx.TensorProto.DataType.Name(initializers[conv.input[2]].data_type)
        return next(node.op_type for node in graph.node if conv.input[2] in node.output)

    calibration = torch.randn(8, *SHAPE)
    kept = int8.quantize_onnx_int8(fp32_path, tmp_path / "kept.int8.onnx", calibration, fp32_layers=["layer2.0.conv2"])
    assert bias_producer(kept) == "FLOAT"
    monkeypatch.setattr(int8, "_unshare_parameters", lambda source, excluded, out_path: source)
    shared = int8.quantize_onnx_int8(fp32_path, tmp_path / "shared.int8.onnx", calibration,
                                     fp32_layers=["layer2.0.conv2"])
    assert bias_producer(shared) == "DequantizeLinear"


@pytest.mark.parametrize(("name", "why"), [("1", "a BatchNorm, folded into conv 0"), ("12", "no such module")])
def test_a_name_that_matches_no_node_raises_and_writes_nothing(name, why, tmp_path) -> None:
    fp32_path = export_onnx(tiny_cnn(), SHAPE, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=rf"fp32_layers: '{name}' matches no Conv/Gemm/MatMul node of m\.onnx; "
                                          r"its layers are: 0, 3, 5, 9, 11"):
        quantize_onnx_int8(fp32_path, tmp_path / "m.int8.onnx", torch.randn(4, *SHAPE), fp32_layers=[name])
    assert not (tmp_path / "m.int8.onnx").exists()
    with pytest.raises(ExportError, match="expected a sequence of module names"):
        quantize_onnx_int8(fp32_path, tmp_path / "m.int8.onnx", torch.randn(4, *SHAPE), fp32_layers="3")


def test_export_artifact_passes_fp32_layers_to_the_int8_onnx_file(tmp_path) -> None:
    """The latency table's exporter; a block name ("blocks.1") covers its layers."""
    path = export_artifact(_Nested(), SHAPE, TargetConfig(), tmp_path, fp32_layers=["blocks.1", "mix"])
    assert _weight_producers(path) == {"/blocks.0/blocks.0.0/Conv": "DequantizeLinear",
                                       "/blocks.1/blocks.1.0/Conv": "initializer", "/mix/MatMul": "initializer",
                                       "/head/head.1/Gemm": "DequantizeLinear"}


@needs_executorch
def test_pt2e_keeps_the_fp32_layers_float() -> None:
    """In the converted graph the excluded conv's weight is a plain float attribute, the others are dequantized
    from int8; a name that owns no conv or linear (a folded BatchNorm) raises."""
    from pf_ray.export.executorch_pte import quantize_pt2e

    model = tiny_cnn().eval()
    calibration = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    graph = torch.export.export(model, (torch.zeros(1, *SHAPE),)).module()
    converted = quantize_pt2e(graph, calibration, 1, label="calibrate", fp32_layers=["3"])
    weights = {list(node.meta["nn_module_stack"].values())[-1][0]: node.args[1] for node in converted.graph.nodes
               if node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)}
    assert weights["3"].op == "get_attr"
    assert all("dequantize_per_channel" in str(weights[name].target) for name in ("0", "5", "9", "11"))
    with pytest.raises(ExportError, match=r"fp32_layers: '1' is no convolution or linear layer of the model, nor "
                                          r"contains one; its layers are: 0, 3, 5, 9, 11"):
        quantize_pt2e(torch.export.export(model, (torch.zeros(1, *SHAPE),)).module(), calibration, 1,
                      label="calibrate", fp32_layers=["1"])


@needs_executorch
def test_the_int8_program_with_fp32_layers_runs_close_to_the_model(tmp_path) -> None:
    """The latency table's exporter, lowered to XNNPACK (mixed int8 and float operators) and run on ExecuTorch."""
    from pf_ray.export.executorch_pte import PteSession

    model = tiny_cnn().eval()
    calibration = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    path = export_artifact(model, SHAPE, TargetConfig(runtime=Runtime.EXECUTORCH), tmp_path,
                           calibration=calibration, fp32_layers=["3", "9"])
    (got,) = PteSession(path).run(None, {"input": calibration.numpy()})
    with torch.no_grad():
        expected = model(calibration).numpy()
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("runtime", [Runtime.ONNXRUNTIME,
                                     pytest.param(Runtime.EXECUTORCH, marks=needs_executorch)])
def test_quantized_accuracy_with_every_layer_fp32_is_the_models(runtime) -> None:
    """Labels are the FP32 model's own predictions (its accuracy: 1). INT8 stays near it; with every conv and linear
    in FP32 only activations are rounded, so it is closer still; an FP32 target is the model's accuracy exactly."""
    model = tiny_cnn().eval()
    generator = torch.Generator().manual_seed(2)
    calibration, images = torch.randn(32, *SHAPE, generator=generator), torch.randn(300, *SHAPE, generator=generator)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    target = TargetConfig(runtime=runtime, precision=Precision.INT8)
    int8 = quantized_accuracy(model, SHAPE, target, calibration, images, labels)
    all_fp32 = quantized_accuracy(model, SHAPE, target, calibration, images, labels,
                                  fp32_layers=sorted(_weighted_layers(model)))
    assert 0.8 <= int8 <= all_fp32 and all_fp32 >= 0.95
    fp32_target = TargetConfig(runtime=runtime, precision=Precision.FP32)
    assert quantized_accuracy(model, SHAPE, fp32_target, calibration, images, labels, fp32_layers=["3"]) == 1.0
    with pytest.raises(ExportError, match=r"images, labels: got shapes \(300, 1, 8, 8\) and \(299,\)"):
        quantized_accuracy(model, SHAPE, target, calibration, images, labels[1:])


class _KeepsConv3:
    """A stand-in learner with only the hook the pipeline asks of it."""

    def fp32_layers(self) -> tuple[str, ...]:
        return ("3",)


def test_export_and_verify_keeps_the_learners_fp32_layers_and_the_manifest_lists_them(tmp_path) -> None:
    learner = _KeepsConv3()
    assert isinstance(learner, KeepsFp32Layers)
    data = tiny_data(SHAPE)
    config = ExperimentConfig(export=ExportConfig(formats=("onnx", "onnx_int8", "ort_int8"), calibration_samples=16,
                                                  latency_repeats=1, max_accuracy_drop=None))
    export_and_verify({"baseline": tiny_cnn(), "compressed": tiny_cnn()}, data, config, tmp_path,
                      log=lambda line: None, learner_model=LearnerModel("compressed", learner))
    assert _weight_producers(tmp_path / "compressed.int8.onnx")["/3/Conv"] == "initializer"
    assert _weight_producers(tmp_path / "baseline.int8.onnx")["/3/Conv"] == "DequantizeLinear"
    entries = {e["file"]: e for e in json.loads((tmp_path / "manifest.json").read_text())["artifacts"]}
    assert entries["compressed.int8.onnx"]["fp32_layers"] == ["3"]
    assert entries["compressed.int8.ort"]["fp32_layers"] == ["3"]
    assert "fp32_layers" not in entries["compressed.onnx"] and "fp32_layers" not in entries["baseline.int8.onnx"]


@needs_executorch
def test_export_all_threads_fp32_layers_to_the_int8_program(tmp_path) -> None:
    """The names reach the .pte exporter's pt2e quantization: a wrong one fails there, with its own message, before
    any lowering (a right one lowers as in the test above), and the folder export_all made is gone again."""
    with pytest.raises(ExportError, match="'7' is no convolution or linear layer of the model"):
        export_all(tiny_cnn(), tiny_data(SHAPE), ExportConfig(formats=("pte_int8",), calibration_samples=4),
                   tmp_path / "out", stem="m", fp32_layers=["7"])
    assert not (tmp_path / "out").exists()
