"""A candidate: flat search values -> projected learner config -> pruned, fine-tuned model (no Ray)."""

from __future__ import annotations

import pytest
import torch

from pf_ray.candidate import fine_tune, make_candidate, resolve, search_space
from pf_ray.config import DistillationConfig, ExperimentConfig, TrainConfig
from pf_ray.data import load_data
from pf_ray.metrics import ACCURACY, EPOCH, LAYER_VALUES, MACS_RATIO, model_stats
from pf_ray.models import build_model
from pf_ray.spec import RunSpec
from pf_ray.strict import from_dict


@pytest.fixture(scope="module")
def setup():
    config = from_dict(ExperimentConfig, {"dataset": {"name": "synthetic"},
                                          "learner": {"options": {"round_to": 4}},
                                          "search": {"target_macs_ratio": 0.4}})
    data = load_data(config.dataset)
    torch.manual_seed(0)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    return RunSpec.resolve(config), data, model


def test_space_has_one_key_per_channel_group(setup):
    spec, data, model = setup
    space = search_space(spec, model, data.input_shape)
    assert space.field == "layer_keep_ratios" and space.label == "keep ratio"
    assert len(space.names) == 12 and space.keys()[0] == "layer_00" and space.keys()[-1] == "layer_11"
    assert (space.low, space.high) == (0.1, 1.0)
    assert space.values_from({k: 0.5 for k in space.keys()}) == (0.5,) * 12


def test_every_candidate_meets_the_budget_and_keeps_the_proposal_shape(setup):
    spec, data, model = setup
    space = search_space(spec, model, data.input_shape)
    proposal = [1.0 if i % 2 else 0.5 for i in range(len(space.names))]
    ratios = resolve(spec, model, data.input_shape, proposal).learner_config.layer_keep_ratios
    assert all(ratios[i] > ratios[i - 1] for i in range(1, len(ratios), 2))  # shape kept: odd > even
    candidate = make_candidate(spec, model, data, proposal=proposal)
    assert candidate.spec.learner_config.layer_keep_ratios == ratios
    measured = model_stats(candidate.model, data.input_shape).macs / model_stats(model, data.input_shape).macs
    assert measured <= 0.4
    assert candidate.static_metrics[MACS_RATIO] == pytest.approx(measured)
    assert candidate.static_metrics[LAYER_VALUES] == list(ratios)
    assert model_stats(model, data.input_shape).params > candidate.static_metrics["params"]  # baseline intact


def test_fine_tune_reports_static_metrics_every_epoch(setup):
    spec, data, model = setup
    candidate = make_candidate(spec, model, data)
    reports: list[dict] = []
    fine_tune(candidate, data, TrainConfig(epochs=2, batch_size=64, learning_rate=0.01, train_subset=128),
              validation_subset=64, report=reports.append)
    assert [r[EPOCH] for r in reports] == [1, 2]
    assert all(MACS_RATIO in r and 0 <= r[ACCURACY] <= 1 for r in reports)


def test_best_trial_breaks_ties_by_trial_id_not_by_order():
    from pf_ray.candidate import best_trial
    from pf_ray.metrics import SCORE

    trials = [{"trial_id": "c", SCORE: 0.5, "epoch": 2, "error": None},
              {"trial_id": "b", SCORE: 0.5, "epoch": 2, "error": None},
              {"trial_id": "a", SCORE: 0.4, "epoch": 2, "error": None},
              {"trial_id": "d", SCORE: 0.9, "epoch": 1, "error": None}]  # stopped early by ASHA: not eligible
    assert best_trial(trials, max_epochs=2)["trial_id"] == "b"
    assert best_trial(list(reversed(trials)), max_epochs=2)["trial_id"] == "b"


def test_a_candidate_distils_from_a_frozen_baseline_only_when_the_experiment_says_so(setup):
    spec, data, model = setup
    plain = make_candidate(spec, model, data, measure=False)
    assert plain.teacher is None and plain.distillation is None
    distilling = RunSpec.resolve(from_dict(ExperimentConfig, {
        "dataset": {"name": "synthetic"}, "learner": {"options": {"round_to": 4, "criterion": "l1"},
                                                      "distillation": {"weight": 2.0}}}))
    candidate = make_candidate(distilling, model, data, measure=False)
    assert candidate.distillation == DistillationConfig(weight=2.0)
    assert candidate.teacher is not model and not candidate.teacher.training
    assert not any(p.requires_grad for p in candidate.teacher.parameters())
    assert "proxy_accuracy" not in candidate.static_metrics  # measure=False: what only the search uses is skipped


def test_a_channel_pruning_candidate_traces_its_dependency_graph_once(setup, monkeypatch):
    """The space (groups, MACs table, budget) and the pruning itself come from one torch-pruning trace of the copy
    being pruned (it used to be traced five times per trial)."""
    import torch_pruning

    spec, data, model = setup
    proposal = [0.5] * len(search_space(spec, model, data.input_shape).names)
    builds = []
    original = torch_pruning.DependencyGraph.build_dependency

    def counted(self, *args, **kwargs):
        builds.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch_pruning.DependencyGraph, "build_dependency", counted)
    candidate = make_candidate(spec, model, data, proposal=proposal, measure=False)
    assert len(builds) == 1
    assert candidate.static_metrics[MACS_RATIO] <= 0.4


def test_a_precision_candidate_is_scored_on_its_int8_artifact_with_its_fp32_layers(setup, monkeypatch):
    """``mixed_precision``: each epoch's score is the INT8 ONNX file's validation accuracy, with the candidate's
    FP32 layers (``quantized_accuracy`` is asked with them); a candidate without it is scored in PyTorch."""
    import pf_ray.export.quantized_eval as quantized_eval
    from pf_ray.metrics import FP32_LAYERS, INT8_ACCURACY, SCORE

    spec, data, model = setup
    asked = []
    real = quantized_eval.quantized_accuracy
    monkeypatch.setattr(quantized_eval, "quantized_accuracy",
                        lambda *a, fp32_layers=(), **k: asked.append(fp32_layers) or real(*a, fp32_layers=fp32_layers,
                                                                                          **k))
    options = {"mode": "uniform", "keep_ratio": 0.5, "round_to": 4, "fp32_layers": ["conv1", "fc"]}
    precise = spec.with_learner_config(from_dict(type(spec.learner_config), options, path="learner.options"))
    candidate = make_candidate(precise, model, data, measure=False)
    assert candidate.static_metrics[FP32_LAYERS] == ["conv1", "fc"]
    train = TrainConfig(epochs=1, batch_size=64, learning_rate=0.01, train_subset=128)
    reports: list[dict] = []
    fine_tune(candidate, data, train, validation_subset=64, report=reports.append)
    assert INT8_ACCURACY not in reports[0] and asked == []  # scored in PyTorch: not a precision search
    searched = from_dict(type(spec.learner_config), {**options, "mode": "auto", "mixed_precision": True,
                                                     "layer_keep_ratios": [0.5] * 12}, path="learner.options")
    candidate = make_candidate(spec.with_learner_config(searched), model, data, measure=False)
    fine_tune(candidate, data, train, validation_subset=64, report=reports.append)
    assert asked == [("conv1", "fc")]
    assert 0 <= reports[1][INT8_ACCURACY] <= 1 and reports[1][SCORE] == reports[1][INT8_ACCURACY]
