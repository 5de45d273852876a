"""Latency in the loop: the per-architecture cache, and the latency reward (search.reward: latency)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from pf_ray.candidate import make_candidate, score
from pf_ray.config import (
    Budget,
    DatasetConfig,
    ExperimentConfig,
    LearnerConfig,
    ModelConfig,
    Precision,
    Reward,
    SearchConfig,
    TargetConfig,
)
from pf_ray.data import load_data
from pf_ray.export import latency as latency_module
from pf_ray.latency.measure import measure_ms
from pf_ray.metrics import LATENCY_MS, LATENCY_RATIO, MACS
from pf_ray.models import build_model
from pf_ray.spec import RunSpec


def small(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(channels * 8 * 8, 10)).eval()


def test_latency_is_measured_once_per_architecture(tmp_path, monkeypatch) -> None:
    from pf_ray.latency import measure  # latency_ms times its sessions with time_sessions

    calls = []
    time_sessions = measure.time_sessions

    def counting(*args, **kwargs):
        calls.append(args[2])
        return time_sessions(*args, **kwargs)

    monkeypatch.setattr(measure, "time_sessions", counting)
    first = latency_module.latency_ms(small(8), (1, 8, 8), folder=tmp_path)
    again = latency_module.latency_ms(small(8), (1, 8, 8), folder=tmp_path)  # new weights, same shapes
    wider = latency_module.latency_ms(small(32), (1, 8, 8), folder=tmp_path)
    assert first == again and first > 0 and wider > 0
    assert calls == [1, 1]  # batch 1, two architectures
    assert len(list(tmp_path.glob("*.json"))) == 2
    two_threads = latency_module.architecture_key(small(8), (1, 8, 8), threads=2)
    assert two_threads != latency_module.architecture_key(small(8), (1, 8, 8), threads=1)


def test_a_damaged_cache_entry_is_measured_again(tmp_path) -> None:
    model = small(8)
    key = latency_module.architecture_key(model, (1, 8, 8), threads=1)
    (tmp_path / f"{key}.json").write_text("{not json")
    assert latency_module.latency_ms(model, (1, 8, 8), folder=tmp_path) > 0


def test_latency_reward_prefers_the_faster_of_equal_accuracies() -> None:
    on_target = score(0.9, {MACS: 1000, LATENCY_RATIO: 1.0}, Reward.LATENCY)
    slower = score(0.9, {MACS: 1000, LATENCY_RATIO: 2.0}, Reward.LATENCY)
    faster = score(0.9, {MACS: 1000, LATENCY_RATIO: 0.5}, Reward.LATENCY)
    assert on_target == pytest.approx(0.9) and slower < on_target < faster
    assert slower == pytest.approx(0.9 * 2 ** -0.07)  # twice the target latency costs about 5%
    assert score(0.9, {MACS: 1000}, Reward.ACCURACY) == 0.9


def test_compress_with_the_latency_reward_measures_candidate_and_baseline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(latency_module.CACHE_ENV, str(tmp_path))
    torch.manual_seed(0)
    experiment = ExperimentConfig(dataset=DatasetConfig(name="digits"),
                                  learner=LearnerConfig(name="channel_pruning",
                                                        options={"mode": "uniform", "criterion": "l1"}))
    experiment = replace(experiment, search=replace(experiment.search, reward=Reward.LATENCY,
                                                    validation_subset=64))
    data = load_data(experiment.dataset)
    baseline = build_model(ModelConfig(), in_channels=1, num_classes=data.num_classes).eval()
    candidate = make_candidate(RunSpec.resolve(experiment), baseline, data)
    static = candidate.static_metrics
    assert static[LATENCY_MS] > 0
    # on the deployment target (default ONNX Runtime INT8): from the cache the trial filled
    baseline_ms = measure_ms(baseline, data.input_shape, experiment.target, timing=latency_module.TIMING)
    assert static[LATENCY_RATIO] == pytest.approx(static[LATENCY_MS] / (0.5 * baseline_ms))
    assert len(list(tmp_path.glob("*.json"))) == 2  # the candidate and the baseline
    assert static[LATENCY_MS] == measure_ms(candidate.model, data.input_shape, experiment.target,
                                            timing=latency_module.TIMING)


def test_with_a_latency_budget_the_reward_aims_at_the_reference_over_the_speedup(tmp_path) -> None:
    experiment = ExperimentConfig(search=SearchConfig(budget=Budget.LATENCY, target_speedup=1.5),
                                  target=TargetConfig(precision=Precision.FP32))
    candidate, wanted = latency_module.reward_latency(small(4), small(8), (1, 8, 8), experiment, folder=tmp_path)
    reference = measure_ms(small(8), (1, 8, 8), TargetConfig(precision=Precision.FP32),
                           timing=latency_module.TIMING, folder=tmp_path)  # the FP32 target is the reference
    assert candidate > 0 and wanted == pytest.approx(reference / 1.5)
    assert len(list(tmp_path.glob("*.json"))) == 2
