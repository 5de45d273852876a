"""ONNX Runtime's mobile format (``.ort``): the file ONNX Runtime Mobile loads on Android and iOS.

Made with onnxruntime's own converter (``onnxruntime.tools.convert_onnx_models_to_ort``), graph optimisations
fixed at conversion time for an ARM target (the x86-only NCHWc layout transform is left out), so the phone does no
graph rewriting at load time. The same file loads in desktop ONNX Runtime, which is how it is verified here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pf_ray.errors import ExportError

TARGET_PLATFORM = "arm"  # what the converter optimises for: "arm" (phones) or "amd64"


def convert_to_ort(onnx_path: str | Path, ort_path: str | Path, *, target_platform: str = TARGET_PLATFORM) -> Path:
    """Convert ``onnx_path`` to ``ort_path`` (written atomically; the converter's chatter is silenced)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    onnx_path, ort_path = Path(onnx_path), Path(ort_path)
    if not onnx_path.is_file():
        raise ExportError(f"cannot convert {str(onnx_path)!r} to the ORT format: the file does not exist")
    ort_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pf_ray_ort_", dir=ort_path.parent) as work:
        source = Path(work) / "model.onnx"
        shutil.copyfile(onnx_path, source)  # a copy: the converter resolves links and names files after them
        converter_log = logging.getLogger("ort_format_model.utils")
        level = converter_log.level
        converter_log.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()) as chatter:
                convert_onnx_models_to_ort(source, Path(work) / "out", target_platform=target_platform,
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as error:  # the converter raises plain RuntimeError/ValueError/onnxruntime errors
            raise ExportError(f"ONNX Runtime's converter failed on {onnx_path.name}: {error}") from error
        finally:
            converter_log.setLevel(level)
        converted = Path(work) / "out" / "model.ort"
        if not converted.is_file():
            last = chatter.getvalue().strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"ONNX Runtime's converter wrote no .ort file for {onnx_path.name}: {last[0]}")
        os.replace(converted, ort_path)
    return ort_path
