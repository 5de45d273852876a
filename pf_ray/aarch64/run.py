"""Run an artifact on emulated aarch64 kernels and compare it with the x86 runtime and with PyTorch.

``run_on_aarch64`` is the primitive (images in, logits out); ``verify_on_aarch64`` turns logits into the numbers a
report shows: the ARM runtime's accuracy and its top-1 agreement with the x86 runtime (and with PyTorch, given its
logits) on the same images. INT8 logits differ between architectures by up to about 0.1 (seen on ResNet-20,
Fashion-MNIST) while the top-1 class agrees: compare accuracy and agreement, not logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pf_ray.aarch64.environment import EXECUTORCH, Aarch64Environment, ensure_environment
from pf_ray.arm_cpus import CpuModel
from pf_ray.errors import ConfigError, EmulationError

ARCH = "aarch64"
WORKER = Path(__file__).with_name("worker.py")

# Metric keys of an aarch64 row, the same in every report (TOP1_AGREEMENT etc. of pf_ray.export.verify for x86).
TOP1_AGREEMENT_X86 = "top1_agreement_x86"
TOP1_AGREEMENT_TORCH = "top1_agreement_torch"
MAX_ABS_DIFF_X86 = "max_abs_diff_x86"


DEFAULT_CPU = CpuModel.CORTEX_A53
_ONNX_SUFFIXES = (".onnx", ".ort")  # run by worker.py on ONNX Runtime
_PTE_SUFFIX = ".pte"  # run by the cross-compiled pte_runner on ExecuTorch (XNNPACK)
INSTALL_HINT = "pip install 'pf-ray[executorch]'"


def cpu_model(name: str | CpuModel) -> CpuModel:
    """``name`` as a CpuModel; an unknown name is a ConfigError listing the allowed ones."""
    try:
        return CpuModel(name)
    except ValueError:
        allowed = ", ".join(model.value for model in CpuModel)
        raise ConfigError(f"cpu: got {name!r}; the emulated aarch64 CPUs are {allowed}") from None


def run_on_aarch64(artifact: str | Path, images: np.ndarray, *, cpu: str | CpuModel = DEFAULT_CPU,
                   environment: Aarch64Environment | None = None, threads: int = 1,
                   timeout_s: float | None = None) -> np.ndarray:
    """The logits of ``artifact`` run on its aarch64 runtime under qemu-aarch64 emulating ``cpu``: ONNX Runtime
    for ``.onnx`` and ``.ort``, ExecuTorch with XNNPACK for ``.pte`` (a fixed-batch program runs its batch at a time).

    Args:
        artifact: a ``.onnx``, ``.ort`` or ``.pte`` file (FP32 or INT8).
        images: float32 inputs, (N, C, H, W). Emulation runs at 80x (INT8) to 400x (FP32) native time: pass a
            subset (a few hundred images).
        environment: the built environment; None = ``ensure_environment()`` (builds it on first use, about 15 s).
        threads: ONNX Runtime intra-op threads inside the emulator (ExecuTorch: its default pool).
        timeout_s: give up after this many seconds (None: no limit).

    Returns:
        (N, num_classes) float32 logits.

    Raises:
        ConfigError: an unknown ``cpu`` or a file format this runner does not take.
        EmulationError: the environment cannot be built, or the run failed (the message names the artifact, the CPU
            and the worker's last output lines).
    """
    return _run_artifact(artifact, images, cpu=cpu, environment=environment, threads=threads,
                         timeout_s=timeout_s)[0]


def _run_artifact(artifact: str | Path, images: np.ndarray, *, cpu: str | CpuModel,
                  environment: Aarch64Environment | None, threads: int = 1,
                  timeout_s: float | None) -> tuple[np.ndarray, dict[str, Any]]:
    """``run_on_aarch64``'s logits and what the worker or runner said about the run (versions, CPU features)."""
    cpu = cpu_model(cpu)
    artifact = Path(artifact)
    if not artifact.is_file():
        raise ConfigError(f"artifact: {str(artifact)!r} does not exist")
    if artifact.suffix not in (*_ONNX_SUFFIXES, _PTE_SUFFIX):
        raise ConfigError(f"artifact: {artifact.name!r} cannot run on aarch64 here; formats: .onnx, .ort, .pte "
                          f"(FP32 and INT8)")
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ConfigError(f"images: got shape {images.shape}; expected (N, C, H, W) with N >= 1")
    environment = environment or ensure_environment()
    what = f"{artifact.name} on {ARCH} ({cpu})"
    with tempfile.TemporaryDirectory(prefix="pf_ray_aarch64_") as work:
        if artifact.suffix == _PTE_SUFFIX:
            if not environment.executorch:
                raise EmulationError(f"{what}: the aarch64 environment has no ExecuTorch runner, as ExecuTorch is "
                                     f"not installed on this machine; {INSTALL_HINT}, then make aarch64")
            inputs, outputs = Path(work) / "images.f32", Path(work) / "logits.f32"
            images.astype("<f4").tofile(inputs)
            command = [str(environment.pte_runner), str(artifact.resolve()), str(inputs), str(outputs),
                       *(str(size) for size in images.shape)]
            said = _emulate(environment, cpu, command, what=what, timeout_s=timeout_s)
            logits = np.fromfile(outputs, dtype="<f4").reshape(len(images), -1)
            versions = {EXECUTORCH: environment.executorch}
        else:
            inputs, outputs = Path(work) / "images.npy", Path(work) / "logits.npy"
            np.save(inputs, images)
            command = [str(environment.python), "-I", "-S", str(WORKER), str(artifact.resolve()), str(inputs),
                       str(outputs), "--site", str(environment.site), "--threads", str(threads)]
            said = _emulate(environment, cpu, command, what=what, timeout_s=timeout_s)
            logits = np.load(outputs)
            versions = {}
    if logits.shape[0] != len(images):
        raise EmulationError(f"{artifact.name} on {ARCH} ({cpu}): {len(images)} images gave logits {logits.shape}")
    try:
        info = json.loads(said.strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {}
    return logits, {**info, **versions}


def emulator_command(environment: Aarch64Environment, cpu: str | CpuModel, guest_command: list[str]) -> list[str]:
    """The host command that runs ``guest_command`` (an aarch64 program and its arguments) under qemu-aarch64."""
    return [str(environment.qemu), "-L", str(environment.root), "-cpu", cpu_model(cpu).value, *guest_command]


def _emulate(environment: Aarch64Environment, cpu: CpuModel, guest_command: list[str], *, what: str,
             timeout_s: float | None) -> str:
    # A clean environment: the host's PYTHON*, LD_* and QEMU_* variables must not reach the guest or the emulator.
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/"),
           "OMP_NUM_THREADS": "1"}
    try:
        result = subprocess.run(emulator_command(environment, cpu, guest_command), capture_output=True, text=True,
                                env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"{what}: still running after {timeout_s:.0f} s (emulation is 80-400x slower than "
                             f"native: use fewer images)") from None
    except OSError as error:
        raise EmulationError(f"{what}: qemu-aarch64 could not start: {error}") from None
    if result.returncode != 0:
        output = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        signal = f" (signal {-result.returncode})" if result.returncode < 0 else ""
        raise EmulationError(f"{what} failed (exit {result.returncode}{signal}): "
                             f"{' | '.join(output[-3:]) or 'no output'}")
    return result.stdout


@dataclass(frozen=True)
class Aarch64Report:
    """How one artifact behaves on emulated aarch64 kernels, on ``num_images`` test images."""

    path: Path
    format: str  # an EXPORTERS name ("onnx_int8", ...)
    cpu: str  # a CpuModel value
    num_images: int
    test_accuracy: float  # top-1 computed by the aarch64 runtime
    x86_test_accuracy: float  # the same images on this machine's runtime
    top1_agreement_x86: float  # fraction of images whose top-1 class is the same on both architectures
    max_abs_diff_x86: float  # largest |logit difference| between the architectures (INT8: up to about 0.1)
    torch_test_accuracy: float | None = None  # the PyTorch model on the same images (None: not given)
    top1_agreement_torch: float | None = None
    runtime: dict[str, Any] | None = None  # what the worker reported: versions, the emulated CPU's features

    arch = ARCH

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, keyed like ``ArtifactReport.to_dict`` where the meaning is the same (``test_accuracy``)."""
        return {"path": str(self.path), "format": self.format, "arch": self.arch, "cpu": self.cpu,
                "num_images": self.num_images, "test_accuracy": self.test_accuracy,
                "x86_test_accuracy": self.x86_test_accuracy, TOP1_AGREEMENT_X86: self.top1_agreement_x86,
                MAX_ABS_DIFF_X86: self.max_abs_diff_x86, "torch_test_accuracy": self.torch_test_accuracy,
                TOP1_AGREEMENT_TORCH: self.top1_agreement_torch, "runtime": self.runtime}

    def guard_rows(self) -> list[dict[str, Any]]:
        """Rows for ``pf_ray.export.verify.accuracy_guard``: the aarch64 accuracy against PyTorch's (when known)
        and against the x86 runtime's, on the same images, each naming the architecture."""
        where = {"path": str(self.path), "test_accuracy": self.test_accuracy, "arch": f"{self.arch} ({self.cpu})",
                 "num_images": self.num_images}
        rows = [{**where, "reference_test_accuracy": self.x86_test_accuracy, "reference": "the x86 runtime"}]
        if self.torch_test_accuracy is not None:
            rows.insert(0, {**where, "reference_test_accuracy": self.torch_test_accuracy, "reference": "PyTorch"})
        return rows


def verify_on_aarch64(artifact: str | Path, images: np.ndarray, labels: np.ndarray, *,
                      cpu: str | CpuModel = DEFAULT_CPU, x86_logits: np.ndarray | None = None,
                      torch_logits: np.ndarray | None = None, environment: Aarch64Environment | None = None,
                      timeout_s: float | None = None) -> Aarch64Report:
    """Run ``artifact`` on aarch64 and compare: accuracy on ``labels``, top-1 agreement with the x86 runtime and,
    given ``torch_logits``, with PyTorch; all on the same ``images``.

    Args:
        images: (N, C, H, W) float32, e.g. the first 256 test images.
        labels: (N,) integer classes.
        x86_logits: this machine's runtime on ``images``; None = run it here (ONNX Runtime, one thread).
        torch_logits: the PyTorch model's logits on ``images`` (None: no PyTorch columns).
    """
    from pf_ray.export.verify import artifact_format, open_session

    cpu = cpu_model(cpu)
    artifact = Path(artifact)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise ConfigError(f"labels: got {len(labels)} for {len(images)} images")
    if x86_logits is None:
        session = open_session(artifact)
        name = session.get_inputs()[0].name
        batches = [np.asarray(images[i:i + 256], dtype=np.float32) for i in range(0, len(images), 256)]
        x86_logits = np.concatenate([session.run(None, {name: batch})[0] for batch in batches])
    environment = environment or ensure_environment()
    arm_logits, info = _run_artifact(artifact, images, cpu=cpu, environment=environment, timeout_s=timeout_s)
    if arm_logits.shape != x86_logits.shape:
        raise EmulationError(f"{artifact.name}: aarch64 gives logits {arm_logits.shape}, x86 {x86_logits.shape}")
    arm_top1, x86_top1 = arm_logits.argmax(axis=1), x86_logits.argmax(axis=1)
    torch_top1 = None if torch_logits is None else np.asarray(torch_logits).argmax(axis=1)
    return Aarch64Report(
        path=artifact, format=artifact_format(artifact), cpu=cpu.value, num_images=len(labels),
        test_accuracy=float((arm_top1 == labels).mean()), x86_test_accuracy=float((x86_top1 == labels).mean()),
        top1_agreement_x86=float((arm_top1 == x86_top1).mean()),
        max_abs_diff_x86=float(np.abs(arm_logits - x86_logits).max()),
        torch_test_accuracy=None if torch_top1 is None else float((torch_top1 == labels).mean()),
        top1_agreement_torch=None if torch_top1 is None else float((arm_top1 == torch_top1).mean()),
        runtime=info,
    )
