"""The training loop: per-epoch reports through a plain callback, learning, divergence, evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pf_ray.config import DistillationConfig, TrainConfig
from pf_ray.metrics import ACCURACY, EPOCH, LOSS
from pf_ray.train import distillation_loss, evaluate, fit, recalibrate_batchnorm


def _linearly_separable(n: int = 256, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 1, 4, 4, generator=generator)
    labels = (inputs.flatten(1).sum(dim=1) > 0).long()
    return TensorDataset(inputs, labels)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))


def test_fit_reports_every_epoch_and_learns():
    data = _linearly_separable()
    model = _tiny_model()
    before = evaluate(model, data)[ACCURACY]
    results: list[dict] = []
    fit(model, data, TrainConfig(epochs=3, batch_size=32, learning_rate=0.1), validation_set=data,
        report=results.append)
    assert [r[EPOCH] for r in results] == [1, 2, 3]
    assert results[-1][ACCURACY] > max(before, 0.9)
    assert results[-1][LOSS] < results[0][LOSS]


def test_train_subset_limits_the_steps():
    steps: list[int] = []
    fit(_tiny_model(), _linearly_separable(256), TrainConfig(epochs=1, batch_size=32, train_subset=64),
        on_step=lambda model, step: steps.append(step))
    assert steps == [1, 2]


def test_divergence_raises_with_a_reason():
    data = _linearly_separable()
    model = _tiny_model()
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training diverged: loss is nan at epoch 1"):
        fit(model, data, TrainConfig(epochs=1, batch_size=32))


def test_evaluate_counts_correct_predictions():
    # A model that always predicts class 1: accuracy = share of label 1.
    inputs = torch.zeros(10, 1, 4, 4)
    labels = torch.tensor([1] * 7 + [0] * 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0]))
    result = evaluate(model, TensorDataset(inputs, labels), batch_size=4)
    assert result[ACCURACY] == pytest.approx(0.7)
    expected_loss = torch.nn.functional.cross_entropy(torch.tensor([[0.0, 1.0]] * 10), labels).item()
    assert result[LOSS] == pytest.approx(expected_loss)


def test_recalibrate_batchnorm_re_estimates_statistics_over_the_images_given():
    # 6 images, each a constant 1..6 over its 1x2x2 pixels; the first 4 are used, in batches of 2. Batch means
    # 1.5 and 3.5 average to 2.5; each batch's unbiased variance is 8 * 0.25 / 7 = 2/7, and so is their average.
    inputs = torch.arange(1.0, 7.0).reshape(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    dataset = TensorDataset(inputs, torch.zeros(6, dtype=torch.long))
    quantizer = nn.Dropout(0.5)  # any other module: must stay in eval mode
    model = nn.Sequential(nn.BatchNorm2d(1, momentum=0.1), quantizer)
    model[0].running_mean.fill_(100.0)
    model[0].weight.data.fill_(3.0)
    returned = recalibrate_batchnorm(model, dataset, images=4, batch_size=2)
    assert returned is model and not model.training and not quantizer.training
    assert model[0].running_mean.item() == pytest.approx(2.5)
    assert model[0].running_var.item() == pytest.approx(2 / 7)  # a cumulative average over the 2 batches
    assert model[0].momentum == 0.1 and model[0].weight.item() == 3.0  # momentum restored, weights untouched
    # a BatchNorm the forward never calls (held by a layer that folds it in eval mode) keeps its statistics
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.held = nn.BatchNorm2d(1), nn.BatchNorm2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x)  # self.held is never called

    model = Holder()
    held = model.held
    held.running_mean.fill_(5.0)
    recalibrate_batchnorm(model, dataset, images=4, batch_size=2)
    assert held.running_mean.item() == 5.0 and held.running_var.item() == 1.0 and not held.training
    assert model.norm.running_mean.item() == pytest.approx(2.5)
    # images=0 leaves the statistics alone
    model.norm.running_mean.fill_(7.0)
    recalibrate_batchnorm(model, dataset, images=0)
    assert model.norm.running_mean.item() == 7.0


def test_a_log_gets_a_progress_bar_within_an_epoch(monkeypatch):
    import pf_ray.train as train

    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0.0)  # a bar line after every step
    lines: list[str] = []
    fit(_tiny_model(), _linearly_separable(128), TrainConfig(epochs=1, batch_size=32), log=lines.append)
    bars = [line for line in lines if " steps, " in line]
    # Three lines while the epoch runs (1, 2, 3 of 4 steps), then the closed bar at 100%.
    assert [line.split("] ")[1].split("%")[0].strip() for line in bars] == ["25", "50", "75", "100"]
    assert bars[0].startswith("  epoch 1/1 [#####...............]  25% 1/4 steps, ")
    assert ", ETA " in bars[0] and ", loss " in bars[0]
    assert bars[-1].startswith("  epoch 1/1 [####################] 100% 4/4 steps, ") and "ETA" not in bars[-1]
    assert lines[-1].startswith("  epoch 1/1: epoch 1, loss ")  # the epoch's summary comes last


def test_distillation_loss_against_a_hand_computation():
    # Student logits (1, 0), teacher logits (0, 1), T = 2. Teacher's softened target: softmax(0, 0.5) =
    # (1, e^0.5) / (1 + e^0.5) = (0.377541, 0.622459). Student's softened log-probabilities: log_softmax(0.5, 0)
    # = (0.5 - log(1 + e^0.5), -log(1 + e^0.5)) = (-0.474077, -0.974077). Cross-entropy:
    # 0.377541 * 0.474077 + 0.622459 * 0.974077 = 0.178984 + 0.606323 = 0.785307.
    loss = distillation_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), temperature=2.0)
    assert loss.item() == pytest.approx(0.785307, abs=1e-6)
    # A batch is the mean over its rows; the same row twice gives the same number.
    batch = distillation_loss(torch.tensor([[1.0, 0.0]] * 2), torch.tensor([[0.0, 1.0]] * 2), temperature=2.0)
    assert batch.item() == pytest.approx(0.785307, abs=1e-6)


def test_distillation_gradient_reaches_the_student_only():
    student = torch.tensor([[1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0]], requires_grad=True)
    distillation_loss(student, teacher, temperature=2.0).backward()
    # d/ds of CE(p_t, softmax(s / T)) = (softmax(s / T) - p_t) / T: softmax(0.5, 0) = (0.622459, 0.377541), so
    # ((0.622459 - 0.377541) / 2, (0.377541 - 0.622459) / 2) = (0.122459, -0.122459).
    assert student.grad.tolist()[0] == pytest.approx([0.122459, -0.122459], abs=1e-6)
    assert teacher.grad is None


def test_fit_with_a_teacher_adds_the_weighted_distillation_term():
    # One batch, one epoch: the reported loss is the loss of the first step, before any update.
    data = _linearly_separable(16)
    model, teacher = _tiny_model(), nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    inputs, labels = data.tensors
    with torch.no_grad():
        logits = model(inputs)
        expected = (nn.functional.cross_entropy(logits, labels)
                    + 4.0 * distillation_loss(logits, teacher(inputs), temperature=3.0)).item()
    results: list[dict] = []
    fit(model, data, TrainConfig(epochs=1, batch_size=16), report=results.append, teacher=teacher,
        distillation=DistillationConfig(weight=4.0, temperature=3.0))
    assert results[0][LOSS] == pytest.approx(expected, rel=1e-5)
    assert all(p.grad is None for p in teacher.parameters())  # frozen: never trained
    with pytest.raises(ValueError, match="together"):
        fit(model, data, TrainConfig(epochs=1), teacher=teacher)


def test_distillation_config_defaults_and_errors():
    from pf_ray.config import ExperimentConfig
    from pf_ray.errors import ConfigError
    from pf_ray.strict import from_dict

    config = from_dict(ExperimentConfig, {"learner": {"distillation": {}}})
    assert config.learner.distillation == DistillationConfig(weight=4.0, temperature=4.0)
    assert from_dict(ExperimentConfig, {}).learner.distillation is None
    message = r"^learner\.distillation\.temperature: got 0\.0; allowed range is \(0, 100\]$"
    with pytest.raises(ConfigError, match=message):
        from_dict(ExperimentConfig, {"learner": {"distillation": {"temperature": 0}}})


def _labels_of(batches) -> list[list[int]]:
    return [labels.tolist() for _, labels in batches]


def test_take_batches_counts_cycles_and_reshuffles_each_pass():
    from pf_ray.train import make_loader, take_batches

    data = TensorDataset(torch.zeros(10, 1), torch.arange(10))  # labels name the examples
    one_pass = _labels_of(take_batches(data, 4, seed=3))
    assert [len(b) for b in one_pass] == [4, 4, 2] and sorted(sum(one_pass, [])) == list(range(10))
    assert _labels_of(take_batches(data, 4, 2, seed=3)) == one_pass[:2]
    assert _labels_of(take_batches(data, 4, 0, seed=3)) == []
    # cycling goes on with the same loader: pass 2 is that loader's next order (what iterating it again gives)
    loader = make_loader(data, 4, shuffle=True, seed=3)
    expected = _labels_of(loader) + _labels_of(loader)
    assert _labels_of(take_batches(data, 4, 5, seed=3, cycle=True)) == expected[:5]
    # reseeded: pass p is a fresh loader seeded seed + p; full_only drops the 2-example batches
    reseeded = _labels_of(take_batches(data, 4, 4, seed=3, cycle=True, reseed=True, full_only=True))
    expected = [b for p in range(2) for b in _labels_of(make_loader(data, 4, shuffle=True, seed=3 + p)) if len(b) == 4]
    assert reseeded == expected


def test_take_batches_ends_when_a_pass_yields_nothing_even_when_cycling():
    from pf_ray.train import take_batches

    three = TensorDataset(torch.zeros(3, 1), torch.arange(3))
    assert list(take_batches(three, 4, 5, cycle=True, full_only=True)) == []  # no full batch of 4: no endless loop
