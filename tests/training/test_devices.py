"""The trial's device: decided once (``devices.training_device``) and handed to every stage; bf16 autocast keeps
the quantizer maths in fp32. (On this CPU-only machine the device is the CPU: these tests check that each stage is
*given* the device and that every forward pass meets its inputs on its weights' device; bench/gpu_smoke.py runs the
same stages on CUDA.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pf_ray.candidate as candidate_module
import pf_ray.train as train_module
from pf_ray.candidate import fine_tune, make_candidate, schedule_line
from pf_ray.config import ExperimentConfig, ResourcesConfig, TrainConfig
from pf_ray.devices import autocast, model_device, structure_digest, training_device
from pf_ray.errors import ConfigError
from pf_ray.ops.qat_layers import ActivationQuantizer
from pf_ray.ops.quantize import fake_quantize
from pf_ray.spec import RunSpec
from pf_ray.strict import from_dict
from tests.tiny import tiny_data, tiny_resnet20


def test_the_cpu_without_use_gpu_whatever_is_installed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device(ResourcesConfig()) == torch.device("cpu")
    assert training_device(ResourcesConfig(), assigned="cpu") == torch.device("cpu")


def test_use_gpu_without_cuda_in_the_process_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="resources.use_gpu: true, but this process sees no CUDA device"):
        training_device(ResourcesConfig(use_gpu=True))
    with pytest.raises(ConfigError, match="this worker was given device 'cpu'"):
        training_device(ResourcesConfig(use_gpu=True), assigned="cpu")


def test_use_gpu_takes_the_first_visible_gpu_or_the_one_assigned(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert training_device(ResourcesConfig(use_gpu=True)) == torch.device("cuda", 0)
    assert training_device(ResourcesConfig(use_gpu=True), assigned="cuda:3") == torch.device("cuda", 3)


class _Recorder:
    """Every forward pass of every module while installed: the stage it ran in, and whether its inputs and its own
    parameters and buffers were all on the expected device."""

    def __init__(self, expected: torch.device) -> None:
        self.expected = expected
        self.stage = "other"
        self.forwards: dict[str, int] = {}
        self.misplaced: list[str] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.forwards[self.stage] = self.forwards.get(self.stage, 0) + 1
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        wrong = [t.device for t in tensors if t.device.type != self.expected.type]
        if wrong:
            self.misplaced.append(f"{self.stage}: {type(module).__name__} saw {wrong}")

    def spy(self, owner: object, name: str, stage: str, calls: list) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            calls.append((stage, kwargs.get("device"), model_device(args[0])))
            previous, self.stage = self.stage, stage
            try:
                return original(*args, **kwargs)
            finally:
                self.stage = previous

        return wrapped


@pytest.mark.parametrize("learner", ["channel_pruning", "uniform_quantization", "weight_sparsification"])
def test_every_stage_is_given_the_training_device_and_runs_there(monkeypatch, learner):
    device = training_device(ResourcesConfig())
    config = from_dict(ExperimentConfig, {"dataset": {"name": "synthetic"}, "learner": {"name": learner},
                                          "search": {"proxy_bn_images": 8, "validation_subset": 8}})
    spec, data, baseline = RunSpec.resolve(config), tiny_data(), tiny_resnet20()
    recorder, calls = _Recorder(device), []
    for owner, name, stage in [(candidate_module, "recalibrate_batchnorm", "proxy_bn"),
                               (candidate_module, "evaluate", "proxy"), (candidate_module, "fit", "fit"),
                               (train_module, "evaluate", "validation")]:
        monkeypatch.setattr(owner, name, recorder.spy(owner, name, stage, calls))
    handle = nn.modules.module.register_module_forward_pre_hook(recorder)
    try:
        recorder.stage = "prepare"
        candidate = make_candidate(spec, baseline, data, device=device)
        recorder.stage = "other"
        logged: list[str] = []
        fine_tune(candidate, data, TrainConfig(epochs=1, batch_size=8, learning_rate=0.01), validation_subset=8,
                  device=device, log=logged.append)
    finally:
        handle.remove()
    assert {stage for stage, _, _ in calls} == {"proxy_bn", "proxy", "fit", "validation"}
    assert all(given == device and on == device for _, given, on in calls), calls  # explicitly given, not defaulted
    assert {"prepare", "proxy_bn", "proxy", "fit", "validation"} <= set(recorder.forwards)
    assert recorder.misplaced == []
    assert all(t.device == device for t in [*candidate.model.parameters(), *candidate.model.buffers()])
    assert logged[0] == schedule_line(TrainConfig(epochs=1, batch_size=8, learning_rate=0.01), 1)


def test_the_schedule_line_says_the_batch_is_per_worker_and_the_rate_unscaled():
    line = schedule_line(TrainConfig(batch_size=64, learning_rate=0.1), 4)
    assert "batch 64 per worker x 4 workers = 256 examples per step" in line
    assert "learning rate 0.1" in line and "not scaled" in line


def test_bf16_autocast_leaves_fake_quantization_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(4, 8).bfloat16()
    scale, zero_point = torch.tensor(0.02), torch.tensor(128, dtype=torch.int32)
    with autocast("cpu", "bf16"):
        out = fake_quantize(x, scale, zero_point, 8)
    assert out.dtype == torch.float32
    assert torch.equal(out, fake_quantize(x.float(), scale, zero_point, 8))
    codes = out / scale + 128
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the 8-bit grid exactly, up to fp32 rounding


def test_bf16_fit_trains_on_the_cpu_and_stays_close_to_fp32():
    data = tiny_data()
    results = {}
    for precision in ("fp32", "bf16"):
        model, history = tiny_resnet20(), []
        train_module.fit(model, data.train, TrainConfig(epochs=1, batch_size=8, learning_rate=0.01),
                         precision=precision, report=history.append)
        results[precision] = (history[0]["loss"], model)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32
    assert abs(results["bf16"][0] - results["fp32"][0]) < 0.05 * results["fp32"][0]


def test_a_quantizer_reads_its_observed_flag_once_and_again_after_a_load():
    quantizer = ActivationQuantizer(8, 0.9)
    assert quantizer(torch.ones(2)).equal(torch.ones(2))  # nothing observed in eval: passed through
    quantizer.train()
    quantizer(torch.arange(4.0))
    assert quantizer._seen and bool(quantizer.observed)
    fresh = ActivationQuantizer(8, 0.9).state_dict()
    quantizer.load_state_dict(fresh)
    quantizer.eval()
    assert quantizer(torch.ones(2) * 3.3).equal(torch.ones(2) * 3.3)  # the loaded "not observed" holds


def test_the_structure_digest_sees_shapes_and_masks_not_float_values():
    model = nn.Sequential(nn.Linear(4, 3))
    model.register_buffer("mask", torch.tensor([True, False, True]))
    digest = structure_digest(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert structure_digest(model) == digest
    model.mask[1] = True
    assert structure_digest(model) != digest
    assert structure_digest(nn.Sequential(nn.Linear(4, 2))) != structure_digest(nn.Sequential(nn.Linear(4, 3)))


def test_a_captured_qat_graph_trains_in_fp32_when_bf16_is_asked():
    pytest.importorskip("torchao")
    from pf_ray.learners import build_learner, learner_config_class

    data = tiny_data()
    learner = build_learner("native_int8", learner_config_class("native_int8")(method="qat", calibration_batches=1))
    model, history, logged = learner.prepare(tiny_resnet20(), data), [], []
    train_module.fit(model, data.train, TrainConfig(epochs=1, batch_size=8, learning_rate=0.01), precision="bf16",
                     report=history.append, log=logged.append)
    assert history[0]["loss"] > 0 and any("bf16 asked, fp32 used" in line for line in logged)


class _MakesATensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.ones(3, device=x.device)  # a device argument baked into the graph


@pytest.mark.parametrize("how", ["device pass at capture", "move_graph_ after prepare"])
def test_a_captured_graph_moves_with_its_device_arguments(how):
    """What native_int8 relies on to train a graph captured on the CPU elsewhere: .to() would leave the node's
    device argument on the CPU. ("meta" stands in for a GPU: it has a device of its own on any machine.)"""
    from pf_ray.ops.int8 import capture_dynamic_batch, move_graph_

    example = torch.randn(2, 3)
    if how == "device pass at capture":
        graph = capture_dynamic_batch(_MakesATensor(), example, device="meta")
    else:
        graph = move_graph_(capture_dynamic_batch(_MakesATensor(), example), "meta")
    devices = [node.kwargs["device"] for node in graph.graph.nodes if "device" in node.kwargs]
    assert devices and all(torch.device(device) == torch.device("meta") for device in devices)
    assert all(t.device.type == "meta" for t in [*graph.parameters(), *graph.buffers()])
    assert graph(torch.randn(4, 3, device="meta")).device.type == "meta"  # the batch dimension stays dynamic


def test_bf16_on_a_gpu_without_it_is_refused_when_the_trial_starts(monkeypatch) -> None:
    """A cluster's GPUs are known only in the trial: bf16 on one without it (a T4) ends with the field named."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "Tesla T4")
    gpu = torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"resources.precision: got 'bf16', but Tesla T4 has no bf16"):
        training_device(ResourcesConfig(use_gpu=True, precision="bf16"), assigned=gpu)
    assert training_device(ResourcesConfig(use_gpu=True, precision="fp32"), assigned=gpu) == gpu
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert training_device(ResourcesConfig(use_gpu=True, precision="bf16"), assigned=gpu) == gpu
