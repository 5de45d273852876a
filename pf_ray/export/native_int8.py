"""The native INT8 path's own deployable files: its converted pt2e graph lowered for ExecuTorch (XNNPACK), and
ONNX Runtime's static QDQ quantization of the same finalized model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from pf_ray.export.executorch_pte import export_quantized_pte
from pf_ray.export.int8 import quantize_onnx_int8
from pf_ray.export.onnx import export_onnx

PTE_SUFFIX = ".native.int8.pte"  # artifact_format reads it as pte_int8
ONNX_SUFFIX = ".native.int8.onnx"  # ... and this as onnx_int8


def write_native_int8(graph: torch.fx.GraphModule, model: nn.Module, input_shape: tuple[int, int, int],
                      images: torch.Tensor, out_dir: str | Path, stem: str, *, batch_size: int) -> dict[str, Path]:
    """Write ``<stem>.native.int8.pte`` (``graph``, a converted pt2e graph, lowered at batch 1 as ``export_pte``
    does; it runs on ExecuTorch) and ``<stem>.native.int8.onnx`` (``model``'s FP32 ONNX quantized by ONNX Runtime,
    static QDQ, calibrated on ``images`` in batches of ``batch_size``). Returns them as ``pte_int8`` and
    ``onnx_int8``."""
    out_dir = Path(out_dir)
    pte = export_quantized_pte(graph, input_shape, out_dir / f"{stem}{PTE_SUFFIX}")
    with tempfile.TemporaryDirectory(prefix="pf_ray_native_int8_") as work:
        fp32 = export_onnx(model, input_shape, Path(work) / f"{stem}.onnx")
        onnx_int8 = quantize_onnx_int8(fp32, out_dir / f"{stem}{ONNX_SUFFIX}", images, batch_size=batch_size)
    return {"pte_int8": pte, "onnx_int8": onnx_int8}
