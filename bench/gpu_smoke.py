"""GPU smoke test (issue 17): one command that proves the training path on one GPU, in under 8 minutes.

    python bench/gpu_smoke.py --out gpu-smoke            # on a GPU machine (CUDA must be visible)
    python bench/gpu_smoke.py --cpu --quick --out /tmp/s  # the same code path on the CPU (what the tests run)

Steps, each timed and recorded as passed / failed / skipped (the script goes on after a failure and exits 1 if any
step failed):

  preflight  versions, the device's name, bf16 support, which optional packages import (Ray, torchao, ...).
  learners   every learner on ResNet-20 (synthetic data): the learner's prepare and the proxy score on the device
             (``make_candidate(device=)``), a fine-tune epoch with distillation and finalize; asserts every
             parameter and buffer is on the device, device and CPU logits agree, the checkpoint reloads in a
             CPU-only subprocess (CUDA_VISIBLE_DEVICES="") with the same logits, and ONNX export works from it.
  resume     ``fit`` for one epoch, its training state saved, then a fresh model resumed from it for epoch 2.
  ddp        two ranks on the one device (gloo; NCCL refuses two ranks on one GPU), torch.distributed directly:
             ``make_candidate(distributed=True)`` + ``fine_tune`` under DDP; the ranks' parameters must agree.
  compress   only where Ray imports: ``pf-ray compress`` on digits with 2 random trials (GPUs requested unless
             --cpu), sampling nvidia-smi's utilisation during the run.
  timing     one training step of ResNet-20 (3x32x32, batch 128): CPU fp32 against the device in fp32 and bf16.

Writes ``summary.json`` and ``summary.txt`` to ``--out``. Needs only torch (+ torchvision-free pf_ray), onnx,
onnxruntime and scikit-learn: the GPU machines have no Ray and no network; Ray's parts say "skipped".
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

LEARNERS: list[tuple[str, str, dict[str, Any]]] = [  # (label, learner, options): small settings, same code paths
    ("channel_pruning_lasso", "channel_pruning", {"mode": "uniform", "keep_ratio": 0.5, "round_to": 4,
                                                  "num_batches": 2, "depth": False}),
    ("channel_pruning_l1", "channel_pruning", {"mode": "uniform", "keep_ratio": 0.5, "round_to": 4,
                                               "criterion": "l1", "depth": False}),
    ("discrimination_aware_pruning", "discrimination_aware_pruning", {"keep_ratio": 0.5, "num_stages": 2,
                                                                      "stage_fine_tune_steps": 2, "round_to": 4,
                                                                      "batch_size": 32}),
    ("uniform_quantization_w8a8", "uniform_quantization", {"weight_bits": 8, "activation_bits": 8}),
    ("nonuniform_quantization", "nonuniform_quantization", {"mode": "uniform", "bits": 4, "kmeans_iterations": 5}),
    ("weight_sparsification", "weight_sparsification", {"mode": "uniform", "sparsity": 0.5}),
    ("native_int8_qat", "native_int8", {"method": "qat", "calibration_batches": 1}),
    ("full_precision", "full_precision", {}),
]
DDP_LEARNERS = ("weight_sparsification", "uniform_quantization_w8a8", "nonuniform_quantization")
LOGIT_TOLERANCE = 1e-3  # device vs CPU logits of the finalized model (TF32 off for the comparison)
QUANTIZED_ACTIVATIONS = ("uniform_quantization_w8a8", "native_int8_qat")


class Smoke:
    def __init__(self, device: torch.device, quick: bool, out: Path) -> None:
        self.device, self.quick, self.out = device, quick, out
        self.reloaded = False  # --quick: the CPU-only reload subprocess for the first learner only
        self.steps: list[dict[str, Any]] = []
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def step(self, name: str, function: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        started = time.perf_counter()
        record: dict[str, Any] = {"step": name}
        try:
            details = function() or {}
            record.update(details)
            record.setdefault("status", "passed")
        except Exception as error:  # noqa: BLE001 -- recorded; the other steps still run
            record.update(status="failed", error=f"{type(error).__name__}: {error}",
                          traceback=traceback.format_exc(limit=6))
        record["seconds"] = round(time.perf_counter() - started, 2)
        self.steps.append(record)
        shown = {k: v for k, v in record.items() if k not in ("step", "status", "seconds", "traceback")}
        self.say(f"{record['status']:>7}  {name} ({record['seconds']} s) {json.dumps(shown, default=str)[:400]}")
        return record


# --- helpers -----------------------------------------------------------------------------------------------------


def on_device(model: nn.Module, device: torch.device) -> None:
    wrong = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device.type]
    if wrong:
        raise AssertionError(f"{len(wrong)} tensors not on {device}: {wrong[:5]}")


def experiment(learner: str, options: dict[str, Any], *, distil: bool) -> Any:
    from pf_ray.config import ExperimentConfig
    from pf_ray.strict import from_dict

    return from_dict(ExperimentConfig, {
        "model": {"name": "resnet20"}, "dataset": {"name": "synthetic"},
        "learner": {"name": learner, "options": options, "distillation": {} if distil else None},
        "search": {"proxy_bn_images": 64, "validation_subset": 64},
    })


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    from pf_ray.devices import model_device

    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(inputs.to(model_device(model))).float().cpu()
    model.train(was)
    return out


def no_tf32() -> Any:
    class _Off:
        def __enter__(self) -> None:
            self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def __exit__(self, *exc: object) -> None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved

    return _Off()


RELOAD = """
import sys, torch
sys.path.insert(0, {root!r})
assert not torch.cuda.is_available(), "CUDA visible in the CPU-only reload"
from pf_ray.checkpoint import load_checkpoint
model, _ = load_checkpoint({path!r})
inputs = torch.load({inputs!r})
model.eval()
with torch.no_grad():
    torch.save(model(inputs).float(), {logits!r})
"""


def reload_on_cpu(path: Path, inputs: torch.Tensor, work: Path) -> torch.Tensor:
    """The checkpoint loaded and run in a fresh process that sees no GPU; its logits."""
    torch.save(inputs, work / "inputs.pt")
    script = RELOAD.format(root=str(REPO_ROOT), path=str(path), inputs=str(work / "inputs.pt"),
                           logits=str(work / "logits.pt"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"CPU-only reload failed: {done.stderr.strip().splitlines()[-1:]}")
    return torch.load(work / "logits.pt", weights_only=True)


# --- steps -------------------------------------------------------------------------------------------------------


def preflight(smoke: Smoke) -> dict[str, Any]:
    import importlib

    found = {}
    for package in ("onnx", "onnxruntime", "sklearn", "torch_pruning", "torchao", "hyperopt", "ray", "executorch"):
        try:
            module = importlib.import_module(package)
            found[package] = getattr(module, "__version__", "present")
        except Exception as error:  # noqa: BLE001 -- absent or broken: recorded
            found[package] = f"missing ({type(error).__name__})"
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_build": torch.version.cuda, "device": str(smoke.device), "packages": found,
                            "cpu_count": os.cpu_count()}
    if smoke.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(smoke.device)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        info["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    from torch.export.passes import move_to_device_pass  # native_int8 needs it on this torch

    info["move_to_device_pass"] = move_to_device_pass.__module__
    return info


def learner_step(smoke: Smoke, label: str, learner: str, options: dict[str, Any]) -> dict[str, Any]:
    if learner == "native_int8":
        try:
            import torchao  # noqa: F401
        except ImportError:
            return {"status": "skipped", "why": "torchao not importable"}
    from pf_ray.candidate import fine_tune, make_candidate
    from pf_ray.checkpoint import save_checkpoint
    from pf_ray.config import TrainConfig
    from pf_ray.data import load_data
    from pf_ray.export.onnx import export_onnx
    from pf_ray.models import build_model
    from pf_ray.spec import RunSpec
    from pf_ray.strict import to_dict
    from pf_ray.train import fit

    config = experiment(learner, options, distil=True)
    spec = RunSpec.resolve(config)
    data = load_data(config.dataset)
    torch.manual_seed(0)
    baseline = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    candidate = make_candidate(spec, baseline, data, device=smoke.device)
    on_device(candidate.model, smoke.device)
    assert candidate.teacher is not None
    bf16: list[dict[str, Any]] = []  # the same fine-tuning in bf16 autocast, on a copy (fake quantizers in fp32)
    fit(copy.deepcopy(candidate.model), data.train, TrainConfig(epochs=1, batch_size=32, train_subset=64),
        device=smoke.device, precision="bf16", report=bf16.append, teacher=candidate.teacher,
        distillation=candidate.distillation)
    if not math.isfinite(bf16[0]["loss"]):
        raise AssertionError(f"bf16 fine-tuning loss {bf16[0]['loss']}")
    reports: list[dict[str, Any]] = []
    train = TrainConfig(epochs=1, batch_size=32, learning_rate=0.01, train_subset=64 if smoke.quick else 512)
    final = fine_tune(candidate, data, train, validation_subset=32 if smoke.quick else 128, report=reports.append,
                      device=smoke.device)
    on_device(final, smoke.device)
    inputs = torch.stack([data.validation[i][0] for i in range(16)])
    with no_tf32():
        here = logits_of(final, inputs)
        on_cpu = logits_of(copy.deepcopy(final).cpu(), inputs)
    difference = float((here - on_cpu).abs().max())
    # Quantized activations: a value within float error of a rounding boundary may take the next level on one
    # device, so those models get a looser bound (one activation level), and must agree on the top-1 class.
    tolerance = LOGIT_TOLERANCE if label not in QUANTIZED_ACTIVATIONS else 5e-2
    if difference > tolerance:
        raise AssertionError(f"{smoke.device} and CPU logits differ by {difference:.2e} > {tolerance}")
    agree = float((here.argmax(1) == on_cpu.argmax(1)).float().mean())
    if agree < 15 / 16:
        raise AssertionError(f"{smoke.device} and CPU top-1 agree on {agree:.0%} of 16 images")
    work = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=smoke.out))
    path = save_checkpoint(work / "compressed.pt", final, model_config=config.model,
                           input_shape=data.input_shape, num_classes=data.num_classes,
                           extra={"learner": learner, "learner_config": to_dict(candidate.spec.learner_config)})
    reload_difference = None
    if not (smoke.quick and smoke.reloaded):
        reloaded = reload_on_cpu(Path(path or work / "compressed.pt"), inputs, work)
        smoke.reloaded = True
        reload_difference = float((reloaded - on_cpu).abs().max())
        if reload_difference > 1e-4:
            raise AssertionError(f"the CPU-only reload's logits differ by {reload_difference:.2e}")
    export_onnx(final, data.input_shape, work / "model.onnx")  # copies to the CPU itself
    shutil.rmtree(work, ignore_errors=True)
    return {"proxy_accuracy": round(candidate.static_metrics["proxy_accuracy"], 4),
            "bf16_loss": round(bf16[0]["loss"], 4),
            "accuracy": round(reports[-1]["accuracy"], 4), "max_logit_difference": difference,
            "reload_difference": reload_difference}


def resume_step(smoke: Smoke) -> dict[str, Any]:
    from pf_ray.config import TrainConfig
    from pf_ray.data import load_data
    from pf_ray.models import build_model
    from pf_ray.train import fit

    config = experiment("full_precision", {}, distil=False)
    data = load_data(config.dataset)
    train = TrainConfig(epochs=2, batch_size=32, learning_rate=0.05, train_subset=64 if smoke.quick else 512)
    state = smoke.out / "training_state.pt"

    def save_and_stop(model: nn.Module) -> Callable[[dict[str, Any]], None]:
        def report(metrics: dict[str, Any]) -> None:
            torch.save({"model": model.state_dict(), "epoch": metrics["epoch"]}, state)
            if metrics["epoch"] == 1:
                raise KeyboardInterrupt  # a lost worker after epoch 1
        return report

    torch.manual_seed(0)
    first = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    try:
        fit(first, data.train, train, validation_set=data.validation, report=save_and_stop(first),
            device=smoke.device)
    except KeyboardInterrupt:
        pass
    on_device(first, smoke.device)
    saved = torch.load(state, map_location="cpu", weights_only=True)
    torch.manual_seed(1)
    second = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    second.load_state_dict(saved["model"])
    history: list[dict[str, Any]] = []
    fit(second, data.train, train, validation_set=data.validation, report=history.append,
        start_epoch=int(saved["epoch"]), device=smoke.device)
    on_device(second, smoke.device)
    if [h["epoch"] for h in history] != [2]:
        raise AssertionError(f"resumed epochs: {[h['epoch'] for h in history]}, expected [2]")
    return {"resumed_from_epoch": int(saved["epoch"]), "accuracy": round(history[-1]["accuracy"], 4)}


def _ddp_rank(rank: int, store: str, device_name: str, quick: bool, results: Any) -> None:
    import torch.distributed as dist

    from pf_ray.candidate import fine_tune, make_candidate
    from pf_ray.config import TrainConfig
    from pf_ray.data import load_data
    from pf_ray.models import build_model
    from pf_ray.spec import RunSpec

    torch.set_num_threads(1)
    device = torch.device(device_name)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        outcome = {}
        for label, learner, options in LEARNERS:
            if label not in DDP_LEARNERS:
                continue
            config = experiment(learner, options, distil=False)
            data = load_data(config.dataset)
            torch.manual_seed(0)
            baseline = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
            candidate = make_candidate(RunSpec.resolve(config), baseline, data, device=device, distributed=True,
                                       measure=False)
            ids = [device.index or 0] if device.type == "cuda" else None
            history: list[dict[str, Any]] = []
            fine_tune(candidate, data, TrainConfig(epochs=1, batch_size=32, learning_rate=0.01,
                                                   train_subset=64 if quick else 512),
                      validation_subset=64, report=history.append, distributed=True, device=device,
                      wrap=lambda model, ids=ids: nn.parallel.DistributedDataParallel(model, device_ids=ids))
            flat = torch.cat([p.detach().double().flatten().cpu() for p in candidate.model.parameters()])
            outcome[label] = {"checksum": float(flat.sum()), "sum_squares": float(flat.square().sum()),
                              "accuracy": history[-1]["accuracy"], "loss": history[-1]["loss"]}
        results.put((rank, "ok", outcome))
    except Exception as error:  # noqa: BLE001 -- the parent reports it
        results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=5)}"))
    finally:
        dist.destroy_process_group()


def ddp_step(smoke: Smoke) -> dict[str, Any]:
    import queue

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    store = str(Path(tempfile.mkdtemp(dir=smoke.out)) / "store")
    processes = [context.Process(target=_ddp_rank, args=(rank, store, str(smoke.device), smoke.quick, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    outcomes = {}
    try:
        for _ in range(2):
            rank, status, value = results.get(timeout=240)
            outcomes[rank] = (status, value)
    except queue.Empty as error:
        raise TimeoutError(f"DDP ranks {sorted(set(range(2)) - set(outcomes))} did not finish in 240 s") from error
    finally:
        for process in processes:
            process.join(timeout=20)
            if process.is_alive():
                process.kill()
    for rank, (status, value) in outcomes.items():
        if status != "ok":
            raise RuntimeError(f"rank {rank}: {value}")
    if outcomes[0][1] != outcomes[1][1]:
        raise AssertionError(f"the ranks disagree: {outcomes[0][1]} vs {outcomes[1][1]}")
    return {"learners": sorted(outcomes[0][1]), "rank0": outcomes[0][1]}


class GpuSampler:
    """nvidia-smi's utilisation and memory every half second, in a thread, while a step runs."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                utilisation, memory = out.stdout.strip().splitlines()[0].split(",")
                self.samples.append((float(utilisation), float(memory)))
            except Exception:  # noqa: BLE001 -- no nvidia-smi, or a transient failure: no sample
                pass
            self.stop.wait(0.5)

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_samples": 0}
        busy = [u for u, _ in self.samples]
        return {"gpu_samples": len(busy), "gpu_utilisation_max": max(busy),
                "gpu_utilisation_mean": round(sum(busy) / len(busy), 1),
                "gpu_busy_fraction": round(sum(u > 0 for u in busy) / len(busy), 3),
                "gpu_memory_max_mib": max(m for _, m in self.samples)}


def compress_step(smoke: Smoke) -> dict[str, Any]:
    try:
        import ray  # noqa: F401
    except Exception:  # noqa: BLE001 -- the GPU machines have no Ray
        return {"status": "skipped", "why": "skipped: ray not importable"}
    if smoke.quick:
        return {"status": "skipped", "why": "skipped: --quick (a Ray run takes minutes)"}
    use_gpu = smoke.device.type == "cuda"
    config = smoke.out / "compress.yaml"
    config.write_text(json.dumps({
        "model": {"name": "resnet20"}, "dataset": {"name": "digits"},
        "baseline": {"train": {"epochs": 1, "learning_rate": 0.05, "batch_size": 64}},
        "learner": {"name": "channel_pruning", "options": {"round_to": 4, "depth": False}},
        "search": {"algorithm": "random", "num_trials": 2, "target_macs_ratio": 0.5,
                   "fine_tune": {"epochs": 1, "learning_rate": 0.01, "batch_size": 64}},
        "retrain": {"train": {"epochs": 1, "learning_rate": 0.02, "batch_size": 64}},
        "resources": {"use_gpu": use_gpu},
        "storage": {"path": str(smoke.out / "runs"), "name": "smoke"},
    }))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with GpuSampler() as sampler:
        done = subprocess.run([sys.executable, "-m", "pf_ray.cli", "compress", str(config)], env=env,
                              capture_output=True, text=True, timeout=420)
    (smoke.out / "compress.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"pf-ray compress exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    results = smoke.out / "runs" / "smoke" / "results.json"
    if not results.exists():
        raise AssertionError(f"no {results}")
    return {"use_gpu": use_gpu, **sampler.summary()}


def timing_step(smoke: Smoke) -> dict[str, Any]:
    from torch.utils.data import TensorDataset

    from pf_ray.config import ModelConfig, TrainConfig
    from pf_ray.models import build_model
    from pf_ray.train import fit

    batch = 16 if smoke.quick else 128
    steps = 2 if smoke.quick else 20
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(batch * steps, 3, 32, 32, generator=generator),
                            torch.randint(0, 10, (batch * steps,), generator=generator))
    train = TrainConfig(epochs=2, batch_size=batch, learning_rate=0.01)  # epoch 1 warms up (cudnn autotuning)

    def step_ms(device: torch.device, precision: str, cpu_steps: int | None = None) -> float:
        torch.manual_seed(0)
        model = build_model(ModelConfig("resnet20"), in_channels=3, num_classes=10)
        data = dataset if cpu_steps is None else TensorDataset(*(t[: batch * cpu_steps] for t in dataset.tensors))
        history: list[dict[str, Any]] = []
        fit(model, data, train, device=device, precision=precision, report=history.append)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 1000 * history[-1]["epoch_seconds"] / (len(data) // batch)

    result: dict[str, Any] = {"batch": batch, "model": "resnet20 3x32x32"}
    result["cpu_fp32_ms"] = round(step_ms(torch.device("cpu"), "fp32", cpu_steps=min(steps, 3)), 2)
    if smoke.device.type == "cuda":
        result["gpu_fp32_ms"] = round(step_ms(smoke.device, "fp32"), 2)
        if torch.cuda.is_bf16_supported():
            result["gpu_bf16_ms"] = round(step_ms(smoke.device, "bf16"), 2)
        result["speedup_fp32"] = round(result["cpu_fp32_ms"] / result["gpu_fp32_ms"], 1)
    else:
        result["cpu_bf16_ms"] = round(step_ms(smoke.device, "bf16", cpu_steps=min(steps, 3)), 2)
    return result


# --- main --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run every step on the CPU (the same code path)")
    parser.add_argument("--quick", action="store_true", help="smaller subsets; skips the Ray run")
    parser.add_argument("--out", type=Path, default=Path("gpu-smoke"), help="folder for summary.json/.txt")
    parser.add_argument("--only", nargs="*", default=None, help="run only these steps (preflight always runs)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible; use --cpu for the CPU run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    smoke = Smoke(device, args.quick, args.out)
    started = time.perf_counter()
    smoke.say(f"gpu_smoke on {device}{' (quick)' if args.quick else ''}, torch {torch.__version__}")

    def wanted(name: str) -> bool:
        return args.only is None or any(name.startswith(prefix) for prefix in args.only)

    smoke.step("preflight", lambda: preflight(smoke))
    for label, learner, options in LEARNERS:
        if wanted(f"learner:{label}"):
            smoke.step(f"learner:{label}", lambda label=label, learner=learner, options=options:
                       learner_step(smoke, label, learner, options))
    for name, function in [("resume", resume_step), ("ddp", ddp_step), ("compress", compress_step),
                           ("timing", timing_step)]:
        if wanted(name):
            smoke.step(name, lambda function=function: function(smoke))

    total = round(time.perf_counter() - started, 1)
    counts = {status: sum(s["status"] == status for s in smoke.steps) for status in ("passed", "failed", "skipped")}
    smoke.say(f"gpu_smoke: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in "
              f"{total} s on {device}")
    summary = {"device": str(device), "quick": args.quick, "seconds": total, "counts": counts, "steps": smoke.steps}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (args.out / "summary.txt").write_text("\n".join(smoke.lines) + "\n")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
