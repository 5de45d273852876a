"""The training loop: per-epoch reports through a plain callback, learning, divergence, evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pf_ray.config import TrainConfig
from pf_ray.train import ACCURACY, EPOCH, LOSS, evaluate, fit


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
