"""Deployable artifacts: FP32 ONNX, INT8 QDQ ONNX, both again in ONNX Runtime Mobile's ``.ort`` format,
ExecuTorch ``.pte`` programs (FP32 and INT8, XNNPACK; optional extra), a manifest, and their verification on
each file's own runtime.

Every format is registered in ``EXPORTERS`` under its ``ExportConfig.formats`` name. An exporter is called as
``exporter(model, data, config, out_dir, stem, artifacts, fp32_layers=...)``, where ``artifacts`` holds the files
already written by this ``export_all`` call (the INT8 exporter quantizes the FP32 file instead of exporting it
again) and ``fp32_layers`` names the layers the INT8 formats keep in FP32 (the FP32 formats ignore it).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from pf_ray.config import ExportConfig
from pf_ray.data import DataBundle
from pf_ray.export.executorch_pte import export_pte
from pf_ray.export.int8 import CalibrationMethod, quantize_onnx_int8
from pf_ray.export.onnx import export_onnx
from pf_ray.export.ort_format import convert_to_ort
from pf_ray.export.quantized_eval import quantized_accuracy
from pf_ray.export.verify import (
    ArtifactReport,
    agreement,
    dataset_inputs,
    measure_latency,
    onnx_session,
    runtime_accuracy,
    torch_latency,
    verify_artifact,
)
from pf_ray.registry import EXPORTERS

__all__ = [
    "QUANTIZED_FORMATS",
    "ArtifactReport",
    "CalibrationMethod",
    "agreement",
    "convert_to_ort",
    "export_pte",
    "export_all",
    "export_onnx",
    "measure_latency",
    "onnx_session",
    "quantize_onnx_int8",
    "quantized_accuracy",
    "runtime_accuracy",
    "torch_latency",
    "verify_artifact",
]


# The formats export_all quantizes itself, whose files keep the fp32_layers in FP32.
QUANTIZED_FORMATS = frozenset({"onnx_int8", "ort_int8", "pte_int8"})


def export_all(
    model: nn.Module, data: DataBundle, config: ExportConfig, out_dir: str | Path, *, stem: str,
    fp32_layers: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``<stem>.onnx`` and every other format in ``config.formats`` into ``out_dir``.

    The FP32 file is always written: it is the deployable baseline and the INT8 file is derived from it.
    ``fp32_layers``: module names (``model.named_modules()``, e.g. "layer1.0.conv1") whose convolutions and linear
    layers the INT8 formats (``QUANTIZED_FORMATS``) keep in FP32.

    Returns:
        format name -> file, e.g. {"onnx": out/model.onnx, "onnx_int8": out/model.int8.onnx}.

    Raises:
        ExportError: a format cannot be written, or a name in ``fp32_layers`` is no layer of the model. A folder
            this call created is removed again (a model the exporter cannot handle leaves nothing behind); files
            already in an existing folder stay.
    """
    out_dir = Path(out_dir)
    # the outermost folder this call creates (None: out_dir exists already)
    created = next((folder for folder in [*reversed(out_dir.parents), out_dir] if not folder.exists()), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, Path] = {}
    try:
        for format_name in ("onnx", *(f for f in config.formats if f != "onnx")):
            exporter = EXPORTERS.get(format_name)  # ConfigError listing the known formats
            artifacts[format_name] = exporter(model, data, config, out_dir, stem, artifacts,
                                              fp32_layers=tuple(fp32_layers))
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return artifacts


@EXPORTERS.register("onnx", suffix=".onnx")
def _export_fp32(
    model: nn.Module,
    data: DataBundle,
    config: ExportConfig,
    out_dir: Path,
    stem: str,
    artifacts: dict[str, Path],
    *,
    fp32_layers: tuple[str, ...],
) -> Path:
    return export_onnx(model, data.input_shape, out_dir / f"{stem}.onnx", opset=config.opset)


@EXPORTERS.register("onnx_int8", suffix=".int8.onnx")
def _export_int8(
    model: nn.Module,
    data: DataBundle,
    config: ExportConfig,
    out_dir: Path,
    stem: str,
    artifacts: dict[str, Path],
    *,
    fp32_layers: tuple[str, ...],
) -> Path:
    # Calibrate on the first training images: fixed, so two exports of one model give the same file.
    calibration = dataset_inputs(data.train, limit=config.calibration_samples)
    int8_path = out_dir / f"{stem}.int8.onnx"
    if "onnx" in artifacts:
        return quantize_onnx_int8(artifacts["onnx"], int8_path, calibration, fp32_layers=fp32_layers)
    with tempfile.TemporaryDirectory(prefix="pf_ray_export_") as work:
        fp32_path = export_onnx(model, data.input_shape, Path(work) / f"{stem}.onnx", opset=config.opset)
        return quantize_onnx_int8(fp32_path, int8_path, calibration, fp32_layers=fp32_layers)


@EXPORTERS.register("ort", suffix=".ort")
def _export_ort(
    model: nn.Module,
    data: DataBundle,
    config: ExportConfig,
    out_dir: Path,
    stem: str,
    artifacts: dict[str, Path],
    *,
    fp32_layers: tuple[str, ...],
) -> Path:
    return convert_to_ort(artifacts["onnx"], out_dir / f"{stem}.ort")  # export_all writes the FP32 file first


@EXPORTERS.register("ort_int8", suffix=".int8.ort")
def _export_ort_int8(
    model: nn.Module,
    data: DataBundle,
    config: ExportConfig,
    out_dir: Path,
    stem: str,
    artifacts: dict[str, Path],
    *,
    fp32_layers: tuple[str, ...],
) -> Path:
    if "onnx_int8" in artifacts:
        return convert_to_ort(artifacts["onnx_int8"], out_dir / f"{stem}.int8.ort")
    with tempfile.TemporaryDirectory(prefix="pf_ray_export_") as work:
        int8_path = _export_int8(model, data, config, Path(work), stem, artifacts, fp32_layers=fp32_layers)
        return convert_to_ort(int8_path, out_dir / f"{stem}.int8.ort")


@EXPORTERS.register("pte", suffix=".pte")
def _export_pte(
    model: nn.Module,
    data: DataBundle,
    config: ExportConfig,
    out_dir: Path,
    stem: str,
    artifacts: dict[str, Path],
    *,
    fp32_layers: tuple[str, ...],
) -> Path:
    return export_pte(model, data.input_shape, out_dir / f"{stem}.pte")


@EXPORTERS.register("pte_int8", suffix=".int8.pte")
def _export_pte_int8(
    model: nn.Module,
    data: DataBundle,
    config: ExportConfig,
    out_dir: Path,
    stem: str,
    artifacts: dict[str, Path],
    *,
    fp32_layers: tuple[str, ...],
) -> Path:
    calibration = dataset_inputs(data.train, limit=config.calibration_samples)  # the same images as ONNX INT8
    return export_pte(model, data.input_shape, out_dir / f"{stem}.int8.pte", calibration=calibration,
                      fp32_layers=fp32_layers)
