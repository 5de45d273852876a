"""Export and verify a run's models: every configured format written, each file run on its own runtime, the
manifest, and the before/after table ``pf-ray compress`` prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pf_ray.config import ExperimentConfig, ExportConfig
from pf_ray.data import DataBundle
from pf_ray.export.onnx import eval_on_cpu
from pf_ray.learners import Learner
from pf_ray.learners.base import KeepsFp32Layers
from pf_ray.metrics import ACCURACY, model_stats
from pf_ray.strict import to_dict
from pf_ray.train import evaluate

Log = Callable[[str], None]
AARCH64 = "aarch64"  # an artifact row's ARM verifications (export.aarch64_cpus): one dict per emulated CPU


@dataclass(frozen=True)
class LearnerModel:
    """Which of the exported models a learner made (its stem, e.g. "compressed"), and that learner.

    Where the learner stores weights compactly (``learner.packed``: sparse, k-bit, codebooks) that model is also
    written as ``<stem>.pfpack``, the stored size, verified by decoding it; where it has its own INT8 files
    (``learner.int8_artifacts``: native_int8's ExecuTorch program and QDQ ONNX) they are written and verified on
    their runtimes too; where it keeps layers in FP32 (``learner.fp32_layers``), that model's INT8 files keep them
    and their manifest entries list them."""

    stem: str
    learner: Learner


def export_and_verify(models: dict[str, nn.Module], data: DataBundle, config: ExperimentConfig, artifacts_dir: Path,
                      *, log: Log = print, learner_model: LearnerModel | None = None) -> list[dict[str, Any]]:
    """Export each model (by stem) in every format of ``config.export``, verify each file on its runtime, write
    the manifest.

    Returns one row per artifact: the verification report plus the model's MACs, params and PyTorch accuracy.
    Calibration and verification draw progress bars on ``log``.
    """
    from pf_ray.export import QUANTIZED_FORMATS, export_all
    from pf_ray.export.manifest import artifact_entry, preprocessing, write_manifest
    from pf_ray.export.packed import pack_state_dict, write_packed
    from pf_ray.export.verify import verify_artifact, verify_packed
    from pf_ray.progress import progress_to

    learner = learner_model.learner if learner_model is not None else None
    rows, entries = [], []
    with progress_to(log):
        for stem, net in models.items():
            stats = model_stats(net, data.input_shape)
            torch_accuracy = evaluate(net, data.test)[ACCURACY]
            made_by_learner = learner_model is not None and stem == learner_model.stem
            # The layers a joint pruning-and-precision search left in FP32 (module names of this model).
            fp32_layers = learner.fp32_layers() if made_by_learner and isinstance(learner, KeepsFp32Layers) else ()
            paths = export_all(net, data, config.export, artifacts_dir, stem=stem, fp32_layers=fp32_layers)
            if made_by_learner and hasattr(learner, "int8_artifacts"):
                native = learner.int8_artifacts(net, data, artifacts_dir, stem)
                paths.update({f"native_{fmt}": path for fmt, path in native.items()})
            if made_by_learner and hasattr(learner, "packed"):
                paths["pfpack"] = artifacts_dir / f"{stem}.pfpack"
                sizes = write_packed(paths["pfpack"], pack_state_dict(net.state_dict(), learner.packed(net)),
                                     meta={"model": to_dict(config.model), "learner": config.learner.name})
                log(f"packed: {paths['pfpack'].name}: {sizes['file_bytes'] / 1024:.1f} KiB "
                    f"({sizes['dense_bytes'] / 1024:.1f} KiB as float32)")
            for fmt, path in paths.items():
                if fmt == "pfpack":
                    log(f"verify: {path.name} (pfpack) decoded into the model, on PyTorch")
                    report = verify_packed(path, model=net, data=data, reference_inputs=_reference_inputs(data))
                else:
                    log(f"verify: {path.name} ({fmt}) on "
                        f"{'ExecuTorch' if 'pte' in fmt else 'ONNX Runtime'}")
                    report = verify_artifact(path, model=net, data=data, threads=config.export.latency_threads,
                                             batch_sizes=config.export.latency_batch_sizes,
                                             repeats=config.export.latency_repeats,
                                             reference_inputs=_reference_inputs(data), format_name=fmt)
                row = {"model": stem, "format": fmt, "macs": stats.macs, "params": stats.params,
                       "torch_test_accuracy": torch_accuracy, **report.to_dict()}
                if config.export.aarch64_cpus and fmt != "pfpack":
                    row[AARCH64] = verify_on_arm(path, net, data, config.export, log=log)
                rows.append(row)
                entries.append(artifact_entry(path, format_name=fmt, model=stem, verified={
                    key: row[key] for key in ("test_accuracy", "torch_test_accuracy", "top1_agreement",
                                              "max_abs_diff", "latency", AARCH64) if key in row},
                    fp32_layers=fp32_layers if fmt in QUANTIZED_FORMATS else ()))
    manifest = write_manifest(artifacts_dir, entries, preprocessing_info=preprocessing(data, config.dataset.name))
    log(f"manifest: {manifest}")
    return rows


def verify_on_arm(path: Path, model: nn.Module, data: DataBundle, export: ExportConfig, *,
                  log: Log) -> list[dict[str, Any]]:
    """``path`` run on emulated aarch64 kernels (``pf_ray.aarch64``) on each of ``export.aarch64_cpus``, on the
    first ``export.aarch64_images`` test images: per CPU its accuracy, the x86 runtime's and PyTorch's on the same
    images, and top-1 agreement with both."""
    from pf_ray.aarch64 import verify_on_aarch64

    count = min(export.aarch64_images, len(data.test))
    images = torch.stack([data.test[i][0] for i in range(count)])
    labels = np.array([int(data.test[i][1]) for i in range(count)])
    with eval_on_cpu(model) as cpu_model, torch.no_grad():
        torch_logits = cpu_model(images).numpy()
    results = []
    for cpu in export.aarch64_cpus:
        report = verify_on_aarch64(path, images.numpy(), labels, cpu=cpu, torch_logits=torch_logits)
        log(f"verify: {path.name} on aarch64 ({cpu}), {count} test images: accuracy "
            f"{100 * report.test_accuracy:.2f}% (x86 {100 * report.x86_test_accuracy:.2f}%), top-1 agreement with "
            f"x86 {100 * report.top1_agreement_x86:.2f}%, with PyTorch {100 * report.top1_agreement_torch:.2f}%")
        results.append({key: value for key, value in report.to_dict().items() if key not in ("path", "format")})
    return results


def guard_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` (artifact reports) and, for each aarch64 verification they carry, its rows for the accuracy guard
    (``pf_ray.export.verify.accuracy_guard``): the ARM accuracy against PyTorch's and the x86 runtime's."""
    expanded = list(rows)
    for row in rows:
        for arm in row.get(AARCH64) or ():
            where = {"path": row["path"], "test_accuracy": arm["test_accuracy"], "arch": f"aarch64 ({arm['cpu']})",
                     "num_images": arm["num_images"]}
            expanded += [{**where, "reference_test_accuracy": arm["torch_test_accuracy"], "reference": "PyTorch"},
                         {**where, "reference_test_accuracy": arm["x86_test_accuracy"],
                          "reference": "the x86 runtime"}]
    return expanded


def _reference_inputs(data: DataBundle) -> torch.Tensor:
    count = min(256, len(data.test))
    return torch.stack([data.test[i][0] for i in range(count)])


def summary_table(results: dict[str, Any], config: ExperimentConfig) -> str:
    """The before/after table printed at the end of ``pf-ray compress``."""
    batch = config.export.latency_batch_sizes[0]
    rows = results["artifacts"]
    reference = next((r for r in rows if r["model"] == "baseline" and r["format"] == "onnx"), rows[0])
    base_latency = reference["latency"][str(batch)]["median_ms"]
    header = (f"| artifact | test accuracy | MACs | params | file size | latency b{batch} "
              f"({config.export.latency_threads} thread) | speed-up |")
    lines = ["", header, "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        latency = (row["latency"].get(str(batch)) or {}).get("median_ms")  # none for a .pfpack (storage only)
        timing = f"{latency:.3f} ms | {base_latency / latency:.2f}x" if latency else "- | -"
        lines.append(
            f"| {Path(row['path']).name} | {100 * row['test_accuracy']:.2f}% | {row['macs'] / 1e6:.2f}M | "
            f"{row['params'] / 1e3:.1f}k | {row['size_bytes'] / 1024:.0f} KiB | {timing} |")
    return "\n".join(lines) + "\n"
