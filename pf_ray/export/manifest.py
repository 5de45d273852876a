"""``manifest.json``: what an app developer needs to load each artifact without reading pf-ray's code.

For every file: its format and runtime, size, SHA-256, the input (name, dtype, layout, shape with a free batch
dimension) and output, the preprocessing the model expects (scale to [0, 1], then per-channel mean/std), and the
figures it was verified with on its runtime.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pf_ray.checkpoint import sha256_of
from pf_ray.data import DataBundle
from pf_ray.errors import ExportError
from pf_ray.files import atomic_write

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "pf-ray-manifest/1"

RUNTIMES = {
    "onnx": "ONNX Runtime (any platform), FP32",
    "onnx_int8": "ONNX Runtime (any platform), INT8 QDQ: int8 weights, uint8 activations",
    "ort": "ONNX Runtime Mobile (Android, iOS; also desktop ONNX Runtime), FP32",
    "ort_int8": "ONNX Runtime Mobile (Android, iOS; also desktop ONNX Runtime), INT8 QDQ",
    "pte": "ExecuTorch with the XNNPACK delegate, FP32, batch 1",
    "pte_int8": "ExecuTorch with the XNNPACK delegate, INT8 (int8 weights per channel, int8 activations), batch 1",
    "native_pte_int8": "ExecuTorch with the XNNPACK delegate, INT8 from native_int8's pt2e graph (PTQ or QAT), "
                       "batch 1",
    "native_onnx_int8": "ONNX Runtime (any platform), INT8 QDQ of native_int8's model (static quantization)",
    "pfpack": "pf-ray packed weights (sparse bitmask, k-bit integers or codebooks): pf_ray.export.packed.read_packed "
              "decodes them into the model's float state dict, which any runtime then executes",
}


def artifact_entry(path: Path, *, format_name: str, model: str, verified: dict[str, Any] | None = None,
                   fp32_layers: Sequence[str] = ()) -> dict:
    """One manifest row; input and output names are read from the file itself. ``fp32_layers``: the layers an
    INT8 file keeps in FP32 (module names), recorded as ``"fp32_layers"`` when there are any."""
    from pf_ray.export.verify import open_session

    entry = {
        "file": path.name,
        "model": model,
        "format": format_name,
        "runtime": RUNTIMES.get(format_name, format_name),
        "size_bytes": path.stat().st_size,
        "sha256": sha256_of(path),
        "input": None,  # a .pfpack holds weights, not a graph: it has no input or output of its own
        "output": None,
        "verified": dict(verified or {}),
    }
    if fp32_layers:
        entry["fp32_layers"] = list(fp32_layers)
    if format_name != "pfpack":
        session = open_session(path, threads=1)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        entry["input"] = {"name": inputs[0].name, "dtype": "float32", "layout": "NCHW",
                          "shape": [_dimension(d) for d in inputs[0].shape]}
        entry["output"] = {"name": outputs[0].name, "dtype": "float32", "meaning": "class logits (argmax = class)",
                           "shape": [_dimension(d) for d in outputs[0].shape]}
    return entry


def _dimension(value: Any) -> int | str:
    return value if isinstance(value, int) else "batch"  # a symbolic (free) dimension


def preprocessing(data: DataBundle, dataset_name: str) -> dict[str, Any]:
    channels, height, width = data.input_shape
    return {
        "dataset": dataset_name,
        "image": f"{width}x{height} pixels, {channels} channel(s) (1 = grayscale, 3 = RGB)",
        "steps": ["pixels as float32 divided by 255 (range [0, 1])",
                  "per channel: (value - mean[c]) / std[c]"],
        "mean": [round(v, 6) for v in data.mean],
        "std": [round(v, 6) for v in data.std],
        "num_classes": data.num_classes,
    }


def write_manifest(out_dir: str | Path, entries: list[dict[str, Any]], *, preprocessing_info: dict[str, Any]) -> Path:
    """Write ``out_dir/manifest.json`` atomically."""
    out_dir = Path(out_dir)
    manifest = {"format": MANIFEST_FORMAT, "preprocessing": preprocessing_info, "artifacts": entries}
    path = out_dir / MANIFEST_FILE
    return atomic_write(path, json.dumps(manifest, indent=2) + "\n")


def check_manifest(path: str | Path) -> list[str]:
    """The files whose size or SHA-256 no longer match the manifest (an empty list: all intact)."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"manifest {str(path)!r} cannot be read: {error}") from None
    problems = []
    for entry in manifest.get("artifacts", []):
        file = path.parent / entry["file"]
        if not file.is_file():
            problems.append(f"{entry['file']}: missing")
        elif file.stat().st_size != entry["size_bytes"] or sha256_of(file) != entry["sha256"]:
            problems.append(f"{entry['file']}: changed since the manifest was written")
    return problems
