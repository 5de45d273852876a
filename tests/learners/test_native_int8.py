"""native_int8: XNNPACK's pt2e quantizer, by post-training calibration or quantization-aware training."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError, ModelError
from pf_ray.export import executorch_pte
from pf_ray.export.onnx import export_onnx
from pf_ray.export.packed import pack_state_dict, read_packed, write_packed
from pf_ray.learners.base import SearchesPerLayer
from pf_ray.learners.native_int8 import NativeInt8, NativeInt8Config
from pf_ray.ops.int8 import QatGraph, symmetric_int8
from pf_ray.registry import LEARNERS
from pf_ray.strict import from_dict
from tests.tiny import train_two_steps

SHAPE = (1, 16, 16)
NUM_CLASSES = 4
# Top-1 agreement of an INT8 model with its float twin on the 64 held-out images. INT8 moves a logit by about a
# percent of its range, so only near-ties can flip: a trained model keeps nearly all (measured: 64/64 here), while
# a broken artifact (a wrong scale, a transposed weight) agrees by chance, ~1/4 with 4 classes. 0.9 lets a few
# near-ties flip and still fails any real breakage.
MIN_AGREEMENT = 0.9

needs_executorch = pytest.mark.skipif(not executorch_pte.executorch_available(),
                                      reason="ExecuTorch (the optional extra) is not installed")


class TwoConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _quadrants(n: int, seed: int) -> TensorDataset:
    """Class c: noise plus a bright quadrant c (a task the tiny net learns in a few dozen steps)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    images = 0.5 * torch.randn(n, *SHAPE, generator=generator)
    for index, label in enumerate(labels.tolist()):
        row, column = divmod(label, 2)
        images[index, 0, 8 * row : 8 * row + 8, 8 * column : 8 * column + 8] += 1.5
    return TensorDataset(images, labels)


@pytest.fixture(scope="module")
def data() -> DataBundle:
    held_out = _quadrants(64, seed=1)
    return DataBundle(name="quadrants", train=_quadrants(256, seed=0), validation=held_out, test=held_out,
                      input_shape=SHAPE, num_classes=NUM_CLASSES, mean=(0.0,), std=(1.0,))


@pytest.fixture(scope="module")
def trained(data) -> nn.Module:
    """The tiny net after 60 Adam steps: clear logit margins, so agreement with INT8 means something."""
    torch.manual_seed(0)
    model = TwoConvNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    inputs, labels = data.train.tensors
    for step in range(60):
        batch = slice(64 * (step % 4), 64 * (step % 4) + 64)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.test.tensors[0]).argmax(1) == data.test.tensors[1]).float().mean()
    assert accuracy >= 0.9  # the fixture itself: a model worth quantizing
    return model


def _sgd_steps(learner: NativeInt8, model: nn.Module, data: DataBundle) -> nn.Module:
    """The shared loop's contract: train mode, two SGD steps (on 32 images), on_step after each."""
    return train_two_steps(learner, model, data, images=32)


def _agreement(logits: np.ndarray, reference: torch.Tensor) -> float:
    return float((np.asarray(logits).argmax(1) == reference.argmax(1).numpy()).mean())


# --------------------------------------------------------------------------------------------------------------
# Config, packing, checks (no ExecuTorch needed; the INT8 grid itself: tests/ops/test_int8.py)


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "int4"}, r"learner\.options\.method: got 'int4'; allowed: ptq, qat"),
    ({"calibration_batches": 0}, r"learner\.options\.calibration_batches: got 0; allowed range is \[1, inf\]"),
    ({"per_chanel": True}, r"unknown field learner\.options\.per_chanel"),
])
def test_config_errors_name_the_field(options, message):
    config_class = LEARNERS.entry("native_int8").meta["config"]
    assert config_class is NativeInt8Config and NativeInt8Config().method == "qat"
    with pytest.raises(ConfigError, match=message):
        from_dict(config_class, options, path="learner.options")


def test_packed_weights_round_trip_within_half_a_step_at_a_quarter_of_fp32(tmp_path):
    torch.manual_seed(0)
    model = TwoConvNet()
    learner = NativeInt8(NativeInt8Config())
    packed = learner.packed(model)
    assert sorted(packed) == ["conv1.weight", "conv2.weight", "fc.weight"]
    for name, tensor in packed.items():
        weight = model.get_parameter(name).detach()
        scale = weight.reshape(len(weight), -1).abs().amax(dim=1) / 127  # (out_channels,)
        assert tensor.bits == 8 and tensor.arrays["zero_point"].tolist() == [128] * len(weight)
        error = (torch.from_numpy(tensor.decode()) - weight).abs().reshape(len(weight), -1)
        assert (error <= scale[:, None] / 2 + 1e-7).all()
        assert error.max() > 0  # a random weight is not on the grid: the bound is what is tested
    # conv2: 16 x 8 x 3 x 3 = 1152 codes of 1 byte + 16 scales and 16 zero points of 4 bytes = 1280 bytes,
    # against 4608 bytes of fp32 (0.28).
    assert packed["conv2.weight"].nbytes == 1152 + 16 * 4 + 16 * 4

    # The finalized model's weights are on the grid: the packed file reproduces it to float rounding.
    finalized = learner.finalize(model)
    finalized.eval()
    write_packed(tmp_path / "m.pfpack", pack_state_dict(finalized.state_dict(), learner.packed(finalized)))
    state, _ = read_packed(tmp_path / "m.pfpack")
    restored = copy.deepcopy(finalized)
    restored.load_state_dict(state, strict=False)
    inputs = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(restored(inputs), finalized(inputs), rtol=0, atol=1e-5)


def test_check_without_executorch_is_one_line_config_error(monkeypatch):
    monkeypatch.setattr(executorch_pte, "executorch_available", lambda: False)
    with pytest.raises(ConfigError) as caught:
        NativeInt8(NativeInt8Config(method="ptq")).check(TwoConvNet(), SHAPE)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("learner native_int8: needs ExecuTorch")
    assert executorch_pte.INSTALL_HINT in message


@needs_executorch
def test_check_needs_a_conv_or_linear_layer_and_nothing_is_searched():
    learner = NativeInt8(NativeInt8Config())
    with pytest.raises(ModelError, match="no conv/linear layer to quantize"):
        learner.check(nn.Sequential(nn.Flatten(), nn.ReLU()), SHAPE)
    assert not isinstance(learner, SearchesPerLayer)  # 8 bits everywhere: nothing to search


# --------------------------------------------------------------------------------------------------------------
# The two methods, end to end


@needs_executorch
def test_ptq_fine_tunes_float_and_writes_int8_files_that_agree_with_it(data, trained, tmp_path):
    learner = NativeInt8(NativeInt8Config(method="ptq", calibration_batches=2))
    model = copy.deepcopy(trained)
    assert learner.prepare(model, data) is model  # float fine-tuning: nothing inserted
    _sgd_steps(learner, model, data)
    finalized = learner.finalize(model)
    assert finalized is model
    for name in ("conv1", "conv2", "fc"):  # every weight on its channel's grid
        weight = finalized.get_submodule(name).weight.detach()
        codes, scale = symmetric_int8(weight)
        torch.testing.assert_close(codes * scale.reshape(-1, *[1] * (weight.dim() - 1)), weight, rtol=0, atol=0)
    export_onnx(finalized, SHAPE, tmp_path / "float.onnx")

    files = learner.int8_artifacts(finalized, data, tmp_path / "out", "m")
    assert files == {"pte_int8": tmp_path / "out" / "m.native.int8.pte",
                     "onnx_int8": tmp_path / "out" / "m.native.int8.onnx"}
    inputs = data.test.tensors[0]
    finalized.eval()
    with torch.no_grad():
        reference = finalized(inputs)
    pte = executorch_pte.PteSession(files["pte_int8"]).run(None, {"input": inputs.numpy()})[0]
    session = ort.InferenceSession(str(files["onnx_int8"]), providers=["CPUExecutionProvider"])
    onnx_int8 = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    assert _agreement(pte, reference) >= MIN_AGREEMENT and _agreement(onnx_int8, reference) >= MIN_AGREEMENT
    # Really INT8: the ONNX file carries QDQ pairs, and neither output is the float model's to the last digit.
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(files["onnx_int8"])).graph.node)
    assert not np.allclose(pte, reference.numpy(), atol=1e-6)


@needs_executorch
def test_qat_trains_a_fake_quantized_graph_and_finalizes_to_the_float_architecture(data, trained, tmp_path):
    learner = NativeInt8(NativeInt8Config(method="qat", calibration_batches=2))
    qat = learner.prepare(copy.deepcopy(trained), data)
    assert isinstance(qat, QatGraph)
    inputs = data.test.tensors[0]

    # On a copy (deepcopy keeps the graph's mode): evaluation has batch norm on running statistics (an image's
    # output does not depend on its batch), takes batch sizes other than the example's, and freezes the ranges
    # (observers off: a 10x wider input moves no scale).
    probe = copy.deepcopy(qat)
    scales = {k: v.clone() for k, v in probe.state_dict().items() if k.endswith(".scale")}
    assert len(scales) >= 6  # input, 2 conv weights, 2 activations, fc weight, output
    probe.eval()
    with torch.no_grad():
        torch.testing.assert_close(probe(inputs[:1])[0], probe(inputs[:5])[0])
        probe(10 * inputs)
    assert all(torch.equal(probe.state_dict()[k], v) for k, v in scales.items())
    # Training: batch statistics (the same image gives another output in another batch) and moving ranges. The
    # flag set directly, as pf_ray.metrics.layer_table restores it, is enough: forward brings the graph in line.
    probe.training = True
    with torch.no_grad():
        assert not torch.allclose(probe(inputs[:4])[0], probe(inputs[:8])[0])
        probe(10 * inputs)
    assert any(not torch.equal(probe.state_dict()[k], v) for k, v in scales.items())

    before = qat.graph.conv1.weight.detach().clone()
    _sgd_steps(learner, qat, data)
    trained_weight = qat.graph.conv1.weight.detach()
    assert not torch.equal(trained_weight, before)  # the steps reached the graph's parameters

    qat.eval()
    with torch.no_grad():
        fake_quantized = qat(inputs)
    finalized = learner.finalize(qat)
    assert type(finalized) is TwoConvNet and finalized.state_dict().keys() == trained.state_dict().keys()
    codes, scale = symmetric_int8(trained_weight)  # the trained weights, snapped
    torch.testing.assert_close(finalized.conv1.weight.detach(), codes * scale.reshape(-1, 1, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(finalized.bn2.running_var, qat.graph.bn2.running_var, rtol=0, atol=0)
    export_onnx(finalized, SHAPE, tmp_path / "finalized.onnx")
    finalized.eval()
    with torch.no_grad():
        assert _agreement(finalized(inputs).numpy(), fake_quantized) >= MIN_AGREEMENT


@pytest.mark.slow  # ~50 s on one core: convert_pt2e traces ~100 batch-norm folding patterns (~30 s of it)
@needs_executorch
def test_qat_int8_artifacts_come_from_the_trained_graph(data, trained, tmp_path):
    learner = NativeInt8(NativeInt8Config(method="qat", calibration_batches=2))
    qat = _sgd_steps(learner, learner.prepare(copy.deepcopy(trained), data), data)
    qat.eval()
    inputs = data.test.tensors[0]
    with torch.no_grad():
        fake_quantized = qat(inputs)
    finalized = learner.finalize(qat)
    # The converted graph is the trained one, ranges included: it computes what the fake quantizers did, up to
    # float rounding in the simulated batch-norm folding that flips a few ties (measured: 40% of the logits equal to
    # the last bit, the rest within 3 output steps). A model rebuilt from a checkpoint (not the object finalize
    # returned) is calibrated afresh instead: other activation ranges, so almost no logit is equal (measured 0.4%).
    with torch.no_grad():
        converted = learner._quantized_graph(finalized, data)(inputs)
        recalibrated = learner._quantized_graph(copy.deepcopy(finalized), data)(inputs)
    assert (converted == fake_quantized).float().mean() >= 0.2
    assert (recalibrated == fake_quantized).float().mean() <= 0.05
    for logits in (converted, recalibrated):
        assert _agreement(logits.numpy(), fake_quantized) >= MIN_AGREEMENT

    files = learner.int8_artifacts(finalized, data, tmp_path, "m")
    pte = executorch_pte.PteSession(files["pte_int8"]).run(None, {"input": inputs.numpy()})[0]
    session = ort.InferenceSession(str(files["onnx_int8"]), providers=["CPUExecutionProvider"])
    onnx_int8 = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    finalized.eval()
    with torch.no_grad():
        reference = finalized(inputs)
    assert _agreement(pte, reference) >= MIN_AGREEMENT and _agreement(onnx_int8, reference) >= MIN_AGREEMENT
