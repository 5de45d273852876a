"""Export to FP32 / INT8 ONNX and verification on ONNX Runtime, with a tiny CNN on 1x8x8 inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pf_ray.config import ExportConfig
from pf_ray.data import DataBundle
from pf_ray.errors import ExportError
from pf_ray.export import (
    agreement,
    export_all,
    export_onnx,
    measure_latency,
    onnx_session,
    quantize_onnx_int8,
    runtime_accuracy,
    torch_latency,
    verify_artifact,
)
from pf_ray.export.verify import artifact_format
from pf_ray.registry import EXPORTERS

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


class TinyCNN(nn.Module):
    """About 10k weights (40 kB in FP32): enough for INT8's 4x smaller weights to outweigh its scales."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this forward cannot be traced")


class UsesFFT(nn.Module):
    """aten::fft_rfft has no ONNX equivalent in opset 17: the exporter rejects it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x, dim=-1).abs().flatten(1)


def blob_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise plus a bright 2x2 blob whose position (one of 10) is the label: easy to learn, wide margins."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    images = 0.3 * torch.randn(count, *INPUT_SHAPE, generator=generator)
    for i, label in enumerate(labels.tolist()):
        row, column = 2 * (label // 4), 2 * (label % 4)  # labels 0-9 on a 4-wide grid of 2x2 cells
        images[i, 0, row : row + 2, column : column + 2] += 2.0
    return images, labels


@pytest.fixture(scope="module")
def model() -> TinyCNN:
    """Trained for a few steps on blob images (under a second), so INT8 keeps most predictions."""
    torch.manual_seed(0)
    model = TinyCNN()
    images, labels = blob_images(512, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: a second thread only adds contention on a busy 2-core machine
    try:
        for step in range(40):
            batch = slice((step % 8) * 64, (step % 8 + 1) * 64)
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return blob_images(200, seed=1)[0]


@pytest.fixture(scope="module")
def known_labels(model: TinyCNN, images: torch.Tensor) -> torch.Tensor:
    """The model's own prediction for the first half of the images, a wrong class for the second half."""
    with torch.no_grad():
        predictions = model(images).argmax(dim=1)
    labels = predictions.clone()
    labels[100:] = (predictions[100:] + 1) % NUM_CLASSES
    return labels


@pytest.fixture(scope="module")
def fp32_path(model: TinyCNN, tmp_path_factory: pytest.TempPathFactory):
    return export_onnx(model, INPUT_SHAPE, tmp_path_factory.mktemp("fp32") / "tiny.onnx")


@pytest.fixture(scope="module")
def int8_path(fp32_path, images: torch.Tensor):
    return quantize_onnx_int8(fp32_path, fp32_path.with_name("tiny.int8.onnx"), images[:64])


def test_fp32_export_passes_checker_and_matches_pytorch(model, fp32_path, images, known_labels) -> None:
    onnx.checker.check_model(str(fp32_path), full_check=True)
    graph = onnx.load(str(fp32_path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert "BatchNormalization" not in {node.op_type for node in graph.node}  # folded by the exporter

    session = onnx_session(fp32_path)
    parity = agreement(model, session, images)
    assert parity["top1_agreement"] == 1.0
    assert parity["max_abs_diff"] < 1e-4

    # Half the labels are the model's predictions, half are wrong by construction: exactly 0.5.
    dataset = TensorDataset(images, known_labels)
    assert runtime_accuracy(session, dataset, batch_size=64) == 0.5
    with torch.no_grad():
        torch_accuracy = (model(images).argmax(1) == known_labels).float().mean().item()
    assert runtime_accuracy(session, dataset) == torch_accuracy


def test_dynamic_batch_dimension(model, fp32_path) -> None:
    session = onnx_session(fp32_path)
    for batch in (1, 5):
        inputs = torch.randn(batch, *INPUT_SHAPE)
        (logits,) = session.run(None, {"input": inputs.numpy()})
        assert logits.shape == (batch, NUM_CLASSES)
        with torch.no_grad():
            np.testing.assert_allclose(logits, model(inputs).numpy(), atol=1e-4)


def test_int8_is_smaller_and_its_accuracy_comes_from_running_it(
    model, fp32_path, int8_path, images, known_labels
) -> None:
    onnx.checker.check_model(str(int8_path), full_check=True)
    op_types = {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types
    assert int8_path.stat().st_size < 0.5 * fp32_path.stat().st_size

    session = onnx_session(int8_path)
    parity = agreement(model, session, images)
    assert parity["max_abs_diff"] > 1e-4  # not the FP32 graph: quantization error is there
    assert parity["top1_agreement"] >= 0.9  # but small

    accuracy = runtime_accuracy(session, TensorDataset(images, known_labels), batch_size=32)
    (logits,) = session.run(None, {"input": images.numpy()})
    assert accuracy == pytest.approx(float((logits.argmax(1) == known_labels.numpy()).mean()))
    # FP32 scores exactly 0.5 on these labels; each prediction INT8 changes moves the score by one example.
    assert abs(accuracy - 0.5) <= 1.0 - parity["top1_agreement"] + 1e-9


def test_latency_statistics(model, fp32_path) -> None:
    threads_before = torch.get_num_threads()
    for stats in (
        measure_latency(onnx_session(fp32_path), INPUT_SHAPE, batch_size=2, warmup=2, repeats=10),
        torch_latency(model, INPUT_SHAPE, batch_size=2, threads=1, warmup=2, repeats=10),
    ):
        assert set(stats) == {"median_ms", "p95_ms", "mean_ms"}
        assert all(value > 0 for value in stats.values())
        assert stats["p95_ms"] >= stats["median_ms"]
    assert torch.get_num_threads() == threads_before


@pytest.mark.parametrize("module", [Raises(), UsesFFT()], ids=["forward_raises", "unsupported_op"])
def test_failed_export_raises_and_writes_nothing(module, tmp_path) -> None:
    with pytest.raises(ExportError, match="cannot export"):
        export_onnx(module, INPUT_SHAPE, tmp_path / "new.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one

    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"previous artifact")
    with pytest.raises(ExportError):
        export_onnx(module, INPUT_SHAPE, existing)
    assert existing.read_bytes() == b"previous artifact"
    assert list(tmp_path.iterdir()) == [existing]


def test_export_leaves_model_mode_alone(tmp_path) -> None:
    model = TinyCNN().train()
    export_onnx(model, INPUT_SHAPE, tmp_path / "m.onnx")
    assert model.training


def test_bad_calibration_raises_and_writes_nothing(fp32_path, tmp_path) -> None:
    with pytest.raises(ExportError, match="calibration"):
        quantize_onnx_int8(fp32_path, tmp_path / "m.int8.onnx", torch.empty(0, *INPUT_SHAPE))
    assert list(tmp_path.iterdir()) == []


def test_export_all_and_verify_artifact(model, images, known_labels, tmp_path) -> None:
    dataset = TensorDataset(images, known_labels)
    data = DataBundle(
        name="synthetic",
        train=dataset,
        validation=dataset,
        test=dataset,
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        mean=(0.0,),
        std=(1.0,),
    )
    # ExecuTorch's formats are checked in test_artifacts.py (its first export in a process takes ~30 s).
    config = ExportConfig(formats=("onnx", "onnx_int8", "ort", "ort_int8"), calibration_samples=32,
                          latency_repeats=5)
    artifacts = export_all(model, data, config, tmp_path / "out", stem="tiny")
    assert {"onnx", "onnx_int8", "ort", "ort_int8"} <= set(EXPORTERS.names())
    assert {name: path.name for name, path in artifacts.items()} == {
        "onnx": "tiny.onnx",
        "onnx_int8": "tiny.int8.onnx",
        "ort": "tiny.ort",
        "ort_int8": "tiny.int8.ort",
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny.int8.onnx", "tiny.int8.ort", "tiny.onnx",
                                                                   "tiny.ort"]

    reports = {
        name: verify_artifact(
            path, model=model, data=data, threads=1, batch_sizes=(1, 4), repeats=5, reference_inputs=images[:50]
        )
        for name, path in artifacts.items()
    }
    assert {name: report.format for name, report in reports.items()} == {name: name for name in artifacts}
    fp32 = reports["onnx"]
    assert reports["ort"].test_accuracy == fp32.test_accuracy and reports["ort"].max_abs_diff < 1e-4
    assert reports["ort_int8"].test_accuracy == reports["onnx_int8"].test_accuracy
    assert fp32.test_accuracy == 0.5 and fp32.top1_agreement == 1.0 and fp32.max_abs_diff < 1e-4
    assert reports["onnx_int8"].size_bytes < fp32.size_bytes
    assert set(fp32.latency) == {1, 4}
    record = json.loads(json.dumps(fp32.to_dict()))
    assert record["latency"]["4"]["p95_ms"] >= record["latency"]["4"]["median_ms"] > 0

    # INT8 alone still works: it exports its own FP32 model to a temporary folder.
    only_int8 = export_all(
        model, data, ExportConfig(formats=("onnx_int8",), calibration_samples=32), tmp_path / "int8", stem="m"
    )
    assert only_int8["onnx_int8"].is_file()
    # The INT8 .ort alone quantizes in a temporary folder too: only the FP32 file (always written) and it remain.
    only_ort_int8 = export_all(
        model, data, ExportConfig(formats=("ort_int8",), calibration_samples=32), tmp_path / "ort8", stem="m"
    )
    assert sorted(p.name for p in (tmp_path / "ort8").iterdir()) == ["m.int8.ort", "m.onnx"]
    assert only_ort_int8["ort_int8"].is_file()


def test_artifact_format_from_file_name() -> None:
    assert artifact_format("a/model.int8.onnx") == "onnx_int8"
    assert artifact_format("model.onnx") == "onnx"
    assert artifact_format("model.int8.ort") == "ort_int8" and artifact_format("m.ort") == "ort"
    assert artifact_format("model.int8.pte") == "pte_int8" and artifact_format("m.pte") == "pte"
    with pytest.raises(ExportError, match="known endings"):
        artifact_format("model.tflite")
