"""Artifacts verified on emulated aarch64 kernels (qemu-aarch64 + the ARM builds of ONNX Runtime and ExecuTorch):
INT8 ONNX, INT8 ``.ort`` and INT8 ``.pte`` of a ResNet-20 briefly trained on scikit-learn's 8x8 digits, on a CPU
without dot product (Cortex-A53) and one with it (Neoverse-N1), through the API and through ``pf-ray verify --arch
aarch64``; the accuracy guard on a mismatched artifact. The module is skipped, in one line saying why, where the
environment cannot be built (no network on first use); tests/export/test_aarch64_options.py runs without it. Small
on purpose: emulated INT8 runs about 80x slower than native, FP32 300-400x."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from pf_ray.aarch64 import CpuModel, ensure_environment, find_environment, verify_on_aarch64
from pf_ray.aarch64.environment import Aarch64Environment
from pf_ray.checkpoint import save_checkpoint
from pf_ray.cli import EXIT_GUARD, main
from pf_ray.config import DatasetConfig, ModelConfig, TrainConfig
from pf_ray.data import load_data
from pf_ray.errors import EmulationError
from pf_ray.export import convert_to_ort, export_onnx, export_pte, quantize_onnx_int8
from pf_ray.export.executorch_pte import executorch_available
from pf_ray.export.verify import dataset_inputs
from pf_ray.models import build_model
from pf_ray.strict import to_dict
from pf_ray.train import fit

DATASET = DatasetConfig(name="digits")
IMAGES = 256  # of digits' 360 test images


def _environment() -> Aarch64Environment:
    """The cached environment (``make aarch64``), else built now (about 15 s); at import, so that a machine where it
    cannot be built skips this module in one line."""
    try:
        return find_environment() or ensure_environment(log=None)
    except EmulationError as error:
        pytest.skip(f"no aarch64 environment (make aarch64 builds it): {error}", allow_module_level=True)


_ENVIRONMENT = _environment()


@pytest.fixture(scope="module")
def environment() -> Aarch64Environment:
    return _ENVIRONMENT


@pytest.fixture(scope="module")
def data():
    return load_data(DATASET)


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory) -> dict[str, Path]:
    """A ResNet-20 trained for 3 short epochs, its checkpoint, its INT8 ONNX and INT8 .ort files, and the INT8 ONNX
    file of another (untrained) ResNet-20."""
    folder = tmp_path_factory.mktemp("aarch64")
    calibration = dataset_inputs(data.train, limit=128)
    files = {}
    for name, epochs in (("digits", 3), ("other", 0)):
        torch.manual_seed(0 if epochs else 1)
        model = build_model(ModelConfig(name="resnet20"), in_channels=1, num_classes=data.num_classes)
        if epochs:
            fit(model, data.train, TrainConfig(epochs=epochs, batch_size=64, learning_rate=0.05), seed=0)
            files["checkpoint"] = save_checkpoint(folder / f"{name}.pt", model, model_config=ModelConfig(),
                                                  input_shape=data.input_shape, num_classes=data.num_classes,
                                                  extra={"dataset": to_dict(DATASET)})
        fp32 = export_onnx(model, data.input_shape, folder / f"{name}.onnx")
        files[f"{name}_int8"] = quantize_onnx_int8(fp32, folder / f"{name}.int8.onnx", calibration)
    files["ort_int8"] = convert_to_ort(files["digits_int8"], folder / "digits.int8.ort")
    return files


@pytest.fixture(scope="module")
def int8_pte(data, exported, tmp_path_factory) -> Path:
    """The trained model's INT8 ExecuTorch program (XNNPACK), calibrated on the images its INT8 ONNX file was."""
    from pf_ray.checkpoint import load_checkpoint

    model, _ = load_checkpoint(exported["checkpoint"])
    return export_pte(model, data.input_shape, tmp_path_factory.mktemp("pte") / "digits.int8.pte",
                      calibration=dataset_inputs(data.train, limit=128))


def _test_subset(data, count: int) -> tuple[np.ndarray, np.ndarray]:
    batches = list(DataLoader(Subset(data.test, range(count)), batch_size=count))
    return batches[0][0].numpy(), batches[0][1].numpy()


def test_int8_ort_on_a_dot_product_cpu_matches_x86(environment, data, exported) -> None:
    images, labels = _test_subset(data, IMAGES)
    report = verify_on_aarch64(exported["ort_int8"], images, labels, cpu=CpuModel.NEOVERSE_N1,
                               environment=environment, timeout_s=300)
    assert report.num_images == IMAGES and report.format == "ort_int8" and report.x86_test_accuracy > 0.5
    assert abs(report.test_accuracy - report.x86_test_accuracy) <= 0.005
    assert report.top1_agreement_x86 >= 0.99
    assert report.runtime["machine"] == "aarch64" and "asimddp" in report.runtime["cpu_features"]  # dot product


@pytest.mark.slow  # 13 s of .pte lowering: the default run keeps its 8 minutes (the ONNX and .ort tests stay in it)
@pytest.mark.skipif(not executorch_available(), reason="ExecuTorch is not installed: no .pte files, no runner")
@pytest.mark.parametrize("cpu", [CpuModel.CORTEX_A53, CpuModel.NEOVERSE_N1])
def test_int8_executorch_program_on_aarch64_matches_x86(environment, data, int8_pte, cpu) -> None:
    images, labels = _test_subset(data, IMAGES)
    report = verify_on_aarch64(int8_pte, images, labels, cpu=cpu, environment=environment, timeout_s=300)
    assert report.format == "pte_int8" and report.x86_test_accuracy > 0.5
    assert abs(report.test_accuracy - report.x86_test_accuracy) <= 0.005
    assert report.top1_agreement_x86 >= 0.99
    assert report.runtime["machine"] == "aarch64" and report.runtime["executorch"] == environment.executorch
    assert ("asimddp" in report.runtime["cpu_features"]) == (cpu == CpuModel.NEOVERSE_N1)


def test_verify_command_runs_the_int8_onnx_on_a_cpu_without_dot_product(environment, exported, capsys) -> None:
    assert main(["verify", str(exported["digits_int8"]), "--arch", "aarch64", "--cpu", "cortex-a53", "--subset",
                 str(IMAGES), "--checkpoint", str(exported["checkpoint"]), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["arch"], row["cpu"], row["format"], row["num_images"]) == ("aarch64", "cortex-a53", "onnx_int8",
                                                                           IMAGES)
    assert abs(row["test_accuracy"] - row["x86_test_accuracy"]) <= 0.005
    assert row["top1_agreement_x86"] >= 0.99 and row["top1_agreement_torch"] >= 0.95
    assert abs(row["test_accuracy"] - row["torch_test_accuracy"]) <= 0.02
    assert "asimddp" not in row["runtime"]["cpu_features"]  # Cortex-A53: Armv8.0, no dot product


def test_a_mismatched_artifact_fails_the_aarch64_guard(environment, exported, capsys) -> None:
    # Another model's weights, verified against the trained checkpoint: about 10% against about 95%.
    assert main(["verify", str(exported["other_int8"]), "--arch", "aarch64", "--subset", "64",
                 "--checkpoint", str(exported["checkpoint"])]) == EXIT_GUARD
    captured = capsys.readouterr()
    assert "other.int8.onnx [onnx_int8] on aarch64 (cortex-a53, emulated), 64 test images" in captured.out
    [error] = [line for line in captured.err.splitlines() if line.startswith("pf-ray:")]
    assert error.startswith("pf-ray: accuracy guard: other.int8.onnx lost ")
    assert "of test accuracy on aarch64 (cortex-a53): " in error and "with PyTorch on the same 64 test images" in error


def test_export_aarch64_cpus_verifies_every_artifact_and_the_report_and_guard_see_it(environment, data,
                                                                                    tmp_path) -> None:
    """``export.aarch64_cpus`` in the export pipeline (what ``pf-ray compress`` and ``pf-ray export`` run): each
    artifact's row and manifest entry carry its ARM verification per CPU, the report's artifact table gains the
    column, and a row that lost accuracy on ARM fails the guard naming the architecture."""
    from dataclasses import replace

    from pf_ray.config import ExperimentConfig, ExportConfig
    from pf_ray.export.pipeline import export_and_verify, guard_rows
    from pf_ray.export.verify import accuracy_guard
    from pf_ray.report import _artifact_table

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet20"), in_channels=1, num_classes=data.num_classes).eval()
    export = ExportConfig(formats=("onnx", "onnx_int8"), calibration_samples=32, latency_repeats=5,
                          aarch64_cpus=("cortex-a53",), aarch64_images=32)
    config = replace(ExperimentConfig(), dataset=DATASET, export=export)
    rows = export_and_verify({"m": model}, data, config, tmp_path, log=lambda line: None)
    assert [row["format"] for row in rows] == ["onnx", "onnx_int8"]
    for row in rows:
        [arm] = row["aarch64"]
        assert (arm["cpu"], arm["num_images"]) == ("cortex-a53", 32) and arm["top1_agreement_x86"] >= 0.97
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all(entry["verified"]["aarch64"][0]["cpu"] == "cortex-a53" for entry in manifest["artifacts"])
    headers, cells = _artifact_table(rows)
    assert "on aarch64" in headers and cells[1][headers.index("on aarch64")].startswith("cortex-a53 ")
    assert accuracy_guard(guard_rows(rows), 0.02) == []
    broken = [{**rows[1], "aarch64": [{**rows[1]["aarch64"][0], "test_accuracy": 0.0}]}]
    [torch_failure, x86_failure] = accuracy_guard(guard_rows(broken), 0.02)
    assert "m.int8.onnx lost" in torch_failure and "on aarch64 (cortex-a53)" in torch_failure
    assert "with the x86 runtime on the same 32 test images" in x86_failure
