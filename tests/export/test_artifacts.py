"""Deployable artifacts end to end without Ray: ORT-format conversion, ExecuTorch programs (where the optional
extra is installed), the manifest, the accuracy guard, and the ``pf-ray export`` / ``pf-ray verify`` commands, on
ResNet-20 briefly trained on scikit-learn's 8x8 digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pf_ray.checkpoint import save_checkpoint, sha256_of
from pf_ray.cli import EXIT_BAD_INPUT, EXIT_GUARD, main
from pf_ray.config import DatasetConfig, ModelConfig, TrainConfig, executorch_installed
from pf_ray.data import load_data
from pf_ray.errors import ExportError
from pf_ray.export import convert_to_ort, export_onnx, onnx_session
from pf_ray.export.manifest import check_manifest
from pf_ray.export.verify import accuracy_guard, artifact_format
from pf_ray.metrics import ACCURACY
from pf_ray.models import build_model
from pf_ray.strict import to_dict
from pf_ray.train import evaluate, fit

DATASET = DatasetConfig(name="digits")
FAST = ["--repeats", "3", "--batch-sizes", "1"]


@pytest.fixture(scope="module")
def data():
    return load_data(DATASET)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, float]:
    """A ResNet-20 trained for 3 short epochs (well above chance) and its checkpoint, recording its dataset."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet20"), in_channels=1, num_classes=data.num_classes)
    fit(model, data.train, TrainConfig(epochs=3, batch_size=64, learning_rate=0.05), seed=0)
    accuracy = evaluate(model, data.test)[ACCURACY]
    assert accuracy > 0.5  # the guard tests below need a model far above chance (0.1)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "digits.pt", model, model_config=ModelConfig(),
                           input_shape=data.input_shape, num_classes=data.num_classes,
                           extra={"dataset": to_dict(DATASET)})
    return path, accuracy


def test_ort_format_matches_the_onnx_file_and_is_named_by_its_format(data, trained, tmp_path) -> None:
    from pf_ray.checkpoint import load_checkpoint

    model, _ = load_checkpoint(trained[0])
    onnx_path = export_onnx(model, data.input_shape, tmp_path / "m.onnx")
    ort_path = convert_to_ort(onnx_path, tmp_path / "m.ort")
    assert artifact_format(ort_path) == "ort" and artifact_format(tmp_path / "m.int8.ort") == "ort_int8"
    assert ort_path.read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier, not an ONNX protobuf
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.ort"]  # no converter leftovers
    inputs = np.random.default_rng(0).standard_normal((4, *data.input_shape)).astype(np.float32)
    outputs = [onnx_session(p).run(None, {"input": inputs})[0] for p in (onnx_path, ort_path)]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)
    with pytest.raises(ExportError, match="does not exist"):
        convert_to_ort(tmp_path / "missing.onnx", tmp_path / "x.ort")


def test_accuracy_guard_names_the_artifact_and_the_loss() -> None:
    rows = [{"path": "a/good.onnx", "test_accuracy": 0.90, "torch_test_accuracy": 0.905},
            {"path": "a/bad.int8.onnx", "test_accuracy": 0.80, "torch_test_accuracy": 0.905}]
    failures = accuracy_guard(rows, 0.02)
    assert failures == ["bad.int8.onnx lost 10.50 pt of test accuracy on its runtime (80.00% vs 90.50% in "
                        "PyTorch); export.max_accuracy_drop allows 2.00 pt"]
    assert accuracy_guard(rows, 0.2) == [] and accuracy_guard(rows, None) == []


def test_export_command_writes_verified_artifacts_and_a_manifest_whose_hashes_match(data, trained, tmp_path,
                                                                                    capsys) -> None:
    checkpoint, torch_accuracy = trained
    out = tmp_path / "export"
    formats = ["onnx", "onnx_int8", "ort", "ort_int8"]  # ExecuTorch's: test_executorch_programs_...
    assert main(["export", str(checkpoint), "--out", str(out), "--json", "--calibration-samples", "64",
                 "--formats", *formats, *FAST]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["digits.int8.onnx", "digits.int8.ort", "digits.onnx",
                                                     "digits.ort", "manifest.json"]
    by_format = {row["format"]: row for row in rows}
    assert set(by_format) == set(formats)
    _check_rows(by_format, torch_accuracy)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preprocessing"]["dataset"] == "digits"
    assert manifest["preprocessing"]["mean"] == pytest.approx(list(data.mean), abs=1e-5)
    for entry in manifest["artifacts"]:
        file = out / entry["file"]
        assert entry["sha256"] == sha256_of(file) and entry["size_bytes"] == file.stat().st_size
        _check_entry(entry, out, data)
    assert check_manifest(out / "manifest.json") == []
    content = bytearray((out / "digits.ort").read_bytes())
    content[len(content) // 2] ^= 0xFF  # one flipped byte, same size
    (out / "digits.ort").write_bytes(bytes(content))
    assert check_manifest(out / "manifest.json") == ["digits.ort: changed since the manifest was written"]


def _check_rows(by_format: dict[str, dict], torch_accuracy: float) -> None:
    """FP32 files agree with PyTorch; INT8 accuracy is the runtime's own (its logits differ from PyTorch's)."""
    for fmt, row in by_format.items():
        assert row["torch_test_accuracy"] == pytest.approx(torch_accuracy)
        if "int8" in fmt:
            assert row["max_abs_diff"] > 1e-4 and row["test_accuracy"] > torch_accuracy - 0.05
        else:
            assert row["top1_agreement"] == 1.0 and row["max_abs_diff"] < 1e-3
            assert row["test_accuracy"] == pytest.approx(torch_accuracy)


def _check_entry(entry: dict, folder: Path, data) -> None:
    file = folder / entry["file"]
    assert entry["sha256"] == sha256_of(file) and entry["size_bytes"] == file.stat().st_size
    batch = 1 if entry["format"].startswith("pte") else "batch"  # ExecuTorch programs: a fixed batch of 1
    assert entry["input"] == {"name": "input", "dtype": "float32", "layout": "NCHW",
                              "shape": [batch, *data.input_shape]}
    assert entry["output"]["shape"] == [batch, data.num_classes]


# About 40 s on 2 idle cores: ExecuTorch's first lowering in a process dominates.
@pytest.mark.skipif(not executorch_installed(), reason="ExecuTorch (the optional extra) is not installed")
def test_executorch_programs_run_on_executorch_with_their_own_accuracy(data, trained, tmp_path, capsys) -> None:
    checkpoint, torch_accuracy = trained
    out = tmp_path / "pte"
    assert main(["export", str(checkpoint), "--out", str(out), "--json", "--calibration-samples", "32",
                 "--formats", "pte", "pte_int8", *FAST]) == 0
    by_format = {row["format"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(by_format) == {"onnx", "pte", "pte_int8"}  # the FP32 ONNX file is always written
    _check_rows(by_format, torch_accuracy)
    assert by_format["pte_int8"]["size_bytes"] < 0.5 * by_format["pte"]["size_bytes"]
    for entry in json.loads((out / "manifest.json").read_text())["artifacts"]:
        _check_entry(entry, out, data)
    assert main(["verify", str(out / "digits.int8.pte"), "--checkpoint", str(checkpoint), *FAST]) == 0
    assert "digits.int8.pte [pte_int8]: test accuracy" in capsys.readouterr().out


def _break_classifier(source: Path, target: Path) -> Path:
    """A copy of an FP32 ONNX model whose classifier bias favours class 0 by a wide margin."""
    model = onnx.load(str(source))
    gemm = next(node for node in reversed(model.graph.node) if node.op_type == "Gemm")
    bias = next(init for init in model.graph.initializer if init.name == gemm.input[2])
    values = numpy_helper.to_array(bias).copy()
    values[0] += 1000.0
    bias.CopyFrom(numpy_helper.from_array(values, bias.name))
    onnx.save(model, str(target))
    return target


def test_verify_command_measures_the_artifact_itself_and_the_guard_catches_a_broken_one(data, trained, tmp_path,
                                                                                       capsys) -> None:
    checkpoint, torch_accuracy = trained
    from pf_ray.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    good = export_onnx(model, data.input_shape, tmp_path / "good.onnx")
    assert main(["verify", str(good), "--checkpoint", str(checkpoint), "--json", *FAST]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["test_accuracy"] == pytest.approx(torch_accuracy) and row["top1_agreement"] == 1.0

    broken = _break_classifier(good, tmp_path / "broken.onnx")
    assert main(["verify", str(broken), "--checkpoint", str(checkpoint), *FAST]) == EXIT_GUARD
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    error = [line for line in lines if line.startswith("pf-ray:")]  # besides the progress bars
    assert len(error) == 1 and lines[-1] == error[0]
    assert error[0].startswith("pf-ray: accuracy guard: broken.onnx lost ")
    assert "  broken.onnx: test accuracy [####################] 100% 2/2 batches" in captured.err
    # The runtime's accuracy is measured, not copied from PyTorch: a model that always says 0 scores ~10%.
    class_zero = float((torch.stack([label for _, label in data.test]) == 0).float().mean())
    assert f"{100 * class_zero:.2f}% vs {100 * torch_accuracy:.2f}%" in error[0]

    # Without a checkpoint: accuracy and latency only (no parity, no guard); the dataset must then be named.
    assert main(["verify", str(broken), "--dataset", "digits", "--json", *FAST]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["top1_agreement"] is None and row["test_accuracy"] == pytest.approx(class_zero)
    assert main(["verify", str(broken), *FAST]) == EXIT_BAD_INPUT
    assert "--dataset: nothing records which dataset" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["verify", "missing.onnx"], "artifact: 'missing.onnx' does not exist"),
    (["export", "missing.pt"], "does not exist"),
])
def test_export_and_verify_reject_missing_files_in_one_line(argv, message, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert list(tmp_path.iterdir()) == []
