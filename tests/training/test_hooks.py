"""forward_hooks: a hooked forward pass that puts every module's mode back and removes its hooks, even on error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pf_ray.hooks import forward_hooks


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))
    model.train()
    model[1].eval()  # mixed modes: a frozen batch norm in a training model
    return model


def test_hooks_see_the_forward_in_the_mode_asked_for_and_modes_come_back_one_by_one():
    model = _model()
    seen = []
    hook = lambda module, inputs, output: seen.append((module, module.training))  # noqa: E731
    with forward_hooks(model, {model[0]: hook, model[2]: hook}, training=False):
        model(torch.zeros(4, 2))
    assert seen == [(model[0], False), (model[2], False)]
    assert [m.training for m in model] == [True, False, True] and model.training
    model(torch.zeros(4, 2))
    assert len(seen) == 2  # the hooks are gone


class _Stop(Exception):
    pass


def test_an_exception_from_a_hook_still_restores_modes_and_removes_hooks():
    model = _model()

    def stop(module, inputs, output):
        raise _Stop

    with pytest.raises(_Stop), forward_hooks(model, {model[0]: stop}, training=False):
        model(torch.zeros(4, 2))
    assert [m.training for m in model] == [True, False, True] and model.training
    model(torch.zeros(4, 2))  # no hook left to raise


def test_without_training_the_modes_are_left_as_they_are():
    model = _model()
    with forward_hooks(model):
        assert [m.training for m in model] == [True, False, True]
