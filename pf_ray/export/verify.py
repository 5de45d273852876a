"""Verify an exported artifact on its runtime: accuracy, output parity with PyTorch, latency and size."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pf_ray.data import DataBundle
from pf_ray.errors import ExportError
from pf_ray.export.onnx import eval_on_cpu
from pf_ray.export.packed import read_packed
from pf_ray.metrics import ACCURACY
from pf_ray.progress import ProgressBar
from pf_ray.train import evaluate

# Metric keys, the same in every report.
TOP1_AGREEMENT = "top1_agreement"
MAX_ABS_DIFF = "max_abs_diff"
MEDIAN_MS = "median_ms"
P95_MS = "p95_ms"
MEAN_MS = "mean_ms"

# Artifact formats by file-name ending (the longest ending first).
_FORMAT_SUFFIXES = ((".int8.onnx", "onnx_int8"), (".int8.ort", "ort_int8"), (".int8.pte", "pte_int8"),
                    (".onnx", "onnx"), (".ort", "ort"), (".pte", "pte"))


def onnx_session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads, run sequentially, all graph optimisations."""
    if threads < 1:
        raise ExportError(f"threads: got {threads}; expected at least 1")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types (Fail, InvalidGraph, NoSuchFile, ...)
        raise ExportError(f"ONNX Runtime cannot load {str(path)!r}: {error}") from error


def open_session(path: str | Path, threads: int = 1) -> Any:
    """The file's own runtime: ExecuTorch for ``.pte``, ONNX Runtime for ``.onnx`` and ``.ort``."""
    if Path(path).suffix == ".pte":
        from pf_ray.export.executorch_pte import PteSession

        return PteSession(path, threads=threads)
    return onnx_session(path, threads=threads)


def runtime_accuracy(session: ort.InferenceSession, dataset: Dataset, batch_size: int = 256, *,
                     label: str = "  test accuracy") -> float:
    """Top-1 accuracy of the model itself, run by its runtime over every (image, label) of ``dataset``.

    ``label`` names the progress bar (shown where ``pf_ray.progress.progress_to`` sends bars)."""
    correct = total = 0
    with ProgressBar(label, -(-len(dataset) // batch_size), unit="batches") as bar:
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            logits = _run(session, images)
            correct += int((logits.argmax(axis=1) == labels.numpy()).sum())
            total += len(labels)
            bar.update(note=f"accuracy {correct / total:.4f}")
    if total == 0:
        raise ExportError("runtime_accuracy: the dataset is empty")
    return correct / total


def agreement(model: nn.Module, session: ort.InferenceSession, inputs: torch.Tensor) -> dict[str, float]:
    """How closely the ONNX model's logits follow the PyTorch model's (eval mode) on ``inputs`` (N, C, H, W).

    Returns ``top1_agreement`` (fraction of inputs with the same argmax) and ``max_abs_diff`` (largest
    absolute difference of any logit).
    """
    if len(inputs) == 0:
        raise ExportError("agreement: got no inputs")
    torch_logits, onnx_logits = [], []
    with eval_on_cpu(model) as cpu_model, torch.inference_mode():
        for chunk in inputs.detach().cpu().float().split(256):  # bounds the memory of large input sets
            torch_logits.append(cpu_model(chunk).numpy())
            onnx_logits.append(_run(session, chunk))
    expected, actual = np.concatenate(torch_logits), np.concatenate(onnx_logits)
    if expected.shape != actual.shape:
        raise ExportError(f"agreement: PyTorch gives logits {expected.shape}, ONNX Runtime {actual.shape}")
    return {
        TOP1_AGREEMENT: float((expected.argmax(axis=1) == actual.argmax(axis=1)).mean()),
        MAX_ABS_DIFF: float(np.abs(expected - actual).max()),
    }


def measure_latency(
    session: ort.InferenceSession,
    input_shape: Sequence[int],
    batch_size: int = 1,
    *,
    warmup: int = 20,
    repeats: int = 200,
    label: str = "  latency",
) -> dict[str, float]:
    """Milliseconds per ``session.run`` on one fixed random batch: median, 95th percentile and mean.

    ``label`` names the progress bar over the warm-up and timed runs."""
    inputs = _fixed_batch(input_shape, batch_size)
    feed = {session.get_inputs()[0].name: inputs}
    return _time(lambda: session.run(None, feed), warmup=warmup, repeats=repeats, label=label)


def torch_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int = 1,
    *,
    warmup: int = 20,
    repeats: int = 200,
) -> dict[str, float]:
    """The same statistics as ``measure_latency`` for PyTorch eager (eval mode, CPU, ``threads`` threads)."""
    if threads < 1:
        raise ExportError(f"threads: got {threads}; expected at least 1")
    inputs = torch.from_numpy(_fixed_batch(input_shape, batch_size))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with eval_on_cpu(model) as cpu_model, torch.inference_mode():
            return _time(lambda: cpu_model(inputs), warmup=warmup, repeats=repeats, label="  PyTorch latency")
    finally:
        torch.set_num_threads(previous_threads)


@dataclass(frozen=True)
class ArtifactReport:
    """What one exported file is: its size and how it behaves on its runtime."""

    path: Path
    format: str  # an EXPORTERS name: "onnx", "onnx_int8", "ort", "ort_int8", "pte" or "pte_int8"
    size_bytes: int
    test_accuracy: float  # top-1 on the test set, computed by the runtime
    top1_agreement: float | None  # with the PyTorch model, on the reference inputs (None: no model given)
    max_abs_diff: float | None  # largest |logit difference| with the PyTorch model, on the reference inputs
    latency: dict[int, dict[str, float]] = field(default_factory=dict)  # batch size -> {median_ms, ...}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the path as a string, batch sizes as string keys (JSON objects have no integer keys)."""
        return {
            "path": str(self.path),
            "format": self.format,
            "size_bytes": self.size_bytes,
            "test_accuracy": self.test_accuracy,
            TOP1_AGREEMENT: self.top1_agreement,
            MAX_ABS_DIFF: self.max_abs_diff,
            "latency": {str(size): dict(stats) for size, stats in self.latency.items()},
        }


def verify_artifact(
    path: str | Path,
    *,
    model: nn.Module | None,
    data: DataBundle,
    threads: int = 1,
    batch_sizes: Sequence[int] = (1,),
    repeats: int = 200,
    reference_inputs: torch.Tensor | None = None,
    format_name: str | None = None,
) -> ArtifactReport:
    """Run an artifact on its own runtime: its test accuracy, parity with ``model``, latency, size.

    The numbers are reported, not judged: the caller decides what accuracy loss or slowdown is acceptable.

    Args:
        path: a ``.onnx``, ``.ort`` or ``.pte`` file (``.int8.`` before the suffix for INT8).
        model: the PyTorch model it was exported from (the reference for parity); None skips the parity check.
        data: test accuracy is measured on ``data.test``; latency on inputs of ``data.input_shape``.
        threads: ONNX Runtime intra-op threads.
        batch_sizes: latency is measured at each of these.
        repeats: timed runs per batch size (after 20 warm-up runs).
        reference_inputs: inputs for the parity check; None = the first 256 test images.
        format_name: an EXPORTERS name; None = from the file name.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"artifact {str(path)!r} does not exist")
    session = open_session(path, threads=threads)
    if model is None:
        parity = {TOP1_AGREEMENT: None, MAX_ABS_DIFF: None}
    else:
        if reference_inputs is None:
            reference_inputs = dataset_inputs(data.test, limit=256)
        parity = agreement(model, session, reference_inputs)
    return ArtifactReport(
        path=path,
        format=format_name or artifact_format(path),
        size_bytes=path.stat().st_size,
        test_accuracy=runtime_accuracy(session, data.test, label=f"  {path.name}: test accuracy"),
        top1_agreement=parity[TOP1_AGREEMENT],
        max_abs_diff=parity[MAX_ABS_DIFF],
        latency={size: measure_latency(session, data.input_shape, size, repeats=repeats,
                                       label=f"  {path.name}: latency b{size}")
                 for size in batch_sizes},
    )


def verify_packed(path: str | Path, *, model: torch.nn.Module, data: Any,
                  reference_inputs: torch.Tensor | None = None) -> ArtifactReport:
    """Decode a ``.pfpack`` into a copy of ``model`` and measure it as ``verify_artifact`` measures a runtime file:
    test accuracy (PyTorch, on the decoded weights), top-1 agreement and largest logit difference with ``model``,
    size on disk. No latency: a packed file is a storage format, decoded to dense weights before any runtime
    executes it (no runtime here has kernels for bit-packed codebooks or bitmask-sparse convolutions)."""
    path = Path(path)
    state, _ = read_packed(path)
    decoded = copy.deepcopy(model).cpu().eval()
    missing, unexpected = decoded.load_state_dict(state, strict=False)
    floating = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    if unexpected or floating & set(missing):
        raise ValueError(f"{path}: does not match the model (missing {sorted(floating & set(missing))[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    if reference_inputs is None:
        reference_inputs = dataset_inputs(data.test, limit=256)
    with torch.no_grad():
        reference = copy.deepcopy(model).cpu().eval()(reference_inputs)
        got = decoded(reference_inputs)
    return ArtifactReport(
        path=path, format="pfpack", size_bytes=path.stat().st_size,
        test_accuracy=evaluate(decoded, data.test)[ACCURACY],
        top1_agreement=float((got.argmax(1) == reference.argmax(1)).float().mean()),
        max_abs_diff=float((got - reference).abs().max()),
    )


def artifact_format(path: str | Path) -> str:
    """The EXPORTERS name of a file, from its name: ``x.int8.onnx`` -> "onnx_int8", ``x.ort`` -> "ort"."""
    name = Path(path).name
    for suffix, format_name in _FORMAT_SUFFIXES:
        if name.endswith(suffix):
            return format_name
    endings = ", ".join(suffix for suffix, _ in _FORMAT_SUFFIXES)
    raise ExportError(f"cannot tell the format of {name!r}; known endings: {endings}")


def dataset_inputs(dataset: Dataset, limit: int | None = None) -> torch.Tensor:
    """The first ``limit`` inputs (all if None) of an (input, label) dataset, stacked into one tensor."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    if count == 0:
        raise ExportError("the dataset is empty")
    loader = DataLoader(Subset(dataset, range(count)), batch_size=256, shuffle=False)
    return torch.cat([inputs for inputs, _ in loader])


def _run(session: ort.InferenceSession, inputs: torch.Tensor) -> np.ndarray:
    """The first output (logits) of one ONNX Runtime run on a CPU float batch."""
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().float().numpy()}
    return session.run(None, feed)[0]


def _fixed_batch(input_shape: Sequence[int], batch_size: int) -> np.ndarray:
    if batch_size < 1:
        raise ExportError(f"batch_size: got {batch_size}; expected at least 1")
    # The same values on every call, so runtimes and artifacts are timed on identical inputs.
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch_size, *input_shape), dtype=np.float32)


def _time(step: Callable[[], object], *, warmup: int, repeats: int, label: str) -> dict[str, float]:
    if repeats < 1 or warmup < 0:
        raise ExportError(f"got warmup={warmup}, repeats={repeats}; expected warmup >= 0 and repeats >= 1")
    bar = ProgressBar(label, warmup + repeats, unit="runs")
    for _ in range(warmup):
        step()
        bar.update()
    seconds = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        step()
        seconds[i] = time.perf_counter() - start
        bar.update()
    bar.close()
    milliseconds = seconds * 1e3
    return {
        MEDIAN_MS: float(np.median(milliseconds)),
        P95_MS: float(np.percentile(milliseconds, 95)),
        MEAN_MS: float(milliseconds.mean()),
    }


def accuracy_guard(rows: Sequence[dict[str, Any]], max_drop: float | None) -> list[str]:
    """One message per artifact row whose runtime test accuracy is more than ``max_drop`` below its reference's.

    Each row needs ``path``, ``test_accuracy`` (measured by the runtime) and ``torch_test_accuracy`` (its PyTorch
    model's). A row measured on another architecture (``pf_ray.aarch64``: ``Aarch64Report.guard_rows``) also names
    ``arch`` and ``num_images``, and may compare with another reference: ``reference_test_accuracy`` and
    ``reference`` (e.g. "the x86 runtime").
    """
    if max_drop is None:
        return []
    failures = []
    for row in rows:
        reference = row.get("reference_test_accuracy", row.get("torch_test_accuracy"))
        drop = reference - row["test_accuracy"]
        if drop <= max_drop:
            continue
        name, allowed = Path(row["path"]).name, f"export.max_accuracy_drop allows {100 * max_drop:.2f} pt"
        if "arch" in row:
            failures.append(f"{name} lost {100 * drop:.2f} pt of test accuracy on {row['arch']}: "
                            f"{100 * row['test_accuracy']:.2f}% vs {100 * reference:.2f}% with "
                            f"{row.get('reference', 'PyTorch')} on the same {row['num_images']} test images; {allowed}")
        else:
            failures.append(f"{name} lost {100 * drop:.2f} pt of test accuracy on its runtime "
                            f"({100 * row['test_accuracy']:.2f}% vs {100 * reference:.2f}% in PyTorch); {allowed}")
    return failures
