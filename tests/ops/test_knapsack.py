"""The knapsack allocation (pf_ray.ops.knapsack) and the channel importance it weighs (pf_ray.ops.importance), on
instances solved by hand in the comments."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from pf_ray.ops.channel_groups import prunable_groups
from pf_ray.ops.importance import taylor_importance
from pf_ray.ops.knapsack import greedy_allocation


def test_a_separable_cost_keeps_the_most_importance_per_unit_of_cost():
    # Group 0: importance 4, 3, 2, 1 at 1 per channel; group 1: 10, 1, 1, 1 at 2 per channel. 12 unpruned, budget
    # 7. Removing group 1's least important channel loses 1 per 2 saved (0.5), group 0's loses 1 per 1 saved: three
    # times group 1 -> (4, 1), cost 6; nothing more fits (group 1's next channel would cost 8).
    kept = greedy_allocation([[4, 3, 2, 1], [10, 1, 1, 1]], lambda k: k[0] + 2 * k[1], 7, round_to=1,
                             min_counts=[1, 1])
    assert kept == [4, 1]


def test_an_interacting_cost_is_evaluated_whole():
    # One conv between the groups: cost k0 * k1, budget 6; both groups 5, 4, 3, 2. From (4, 4) = 16: dropping a
    # group's 2 saves 4 for 2 (0.5 each; group 0 first) -> (3, 4) = 12; then group 0's 3 saves 4 (0.75 per unit),
    # group 1's 2 saves 3 (0.67) -> (3, 3) = 9; then either 3 saves 3 (1.0; group 0 first) -> (2, 3) = 6, which
    # fits; neither channel comes back (9 and 8 are over). Importance kept: 9 + 12 = 21, the best of every
    # allocation within 6 ((3, 2) ties; (4, 1) keeps 19, (2, 2) 18).
    kept = greedy_allocation([[5, 4, 3, 2], [5, 4, 3, 2]], lambda k: k[0] * k[1], 6, round_to=1, min_counts=[1, 1])
    assert kept == [2, 3]


def test_steps_follow_round_to_and_stop_at_the_minimum_counts():
    # 10 channels in steps of 4: 10 -> 8 -> 4 (the minimum); the budget cannot be met: the minimum is returned
    importance = np.arange(10.0)
    assert greedy_allocation([importance], lambda k: float(k[0]), 1.0, round_to=4, min_counts=[4]) == [4]
    assert greedy_allocation([importance], lambda k: float(k[0]), 8.0, round_to=4, min_counts=[4]) == [8]


def test_what_fits_again_is_given_back():
    # Cost 6 k0 + k1 - 2 (12 unpruned), budget 6; importance: group 0 keeps 5 and 1, group 1 keeps 1 and 0.1.
    # Group 1's step loses 0.1 per 1 saved, group 0's 1 per 6 (0.17): group 1 goes first -> (2, 1) = 11, then
    # group 0 -> (1, 1) = 5. Group 1's step now fits again (6 <= 6) and comes back: (1, 2).
    cost = lambda k: 6 * k[0] + k[1] - 2  # noqa: E731
    assert greedy_allocation([[5, 1], [1, 0.1]], cost, 6, round_to=1, min_counts=[1, 1]) == [1, 2]
    assert greedy_allocation([[5, 1], [1, 0.1]], cost, 5, round_to=1, min_counts=[1, 1]) == [1, 1]  # no room


def _conv_then_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def test_a_channel_that_carries_nothing_has_no_importance_and_the_model_is_left_as_it_was():
    model = _conv_then_linear()
    with torch.no_grad():
        model[0].weight[2].zero_()
        model[1].weight[2] = 0.0  # its batch norm outputs the shift beta_2 for every input...
        model[1].bias[2] = 0.0  # ...and zero here: the channel carries nothing to the linear layer
    model.train()
    before = copy.deepcopy(model.state_dict())
    groups = prunable_groups(model, (1, 4, 4))
    assert [group.name for group in groups] == ["0"] and groups[0].num_channels == 4
    torch.manual_seed(1)
    batches = [(torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    (scores,) = taylor_importance(model, groups, batches)
    assert scores.shape == (4,) and scores.dtype == torch.float64
    assert scores[2] == 0.0 and bool((scores[[0, 1, 3]] > 0).all())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_importance_adds_the_squared_first_order_change_of_each_batch():
    # One batch: the channel's term is sum(g * w) over its parameters; two identical batches give twice its square
    model = _conv_then_linear()
    groups = prunable_groups(model, (1, 4, 4))
    batch = (torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,)))
    (once,) = taylor_importance(model, groups, [batch])
    (twice,) = taylor_importance(model, groups, [batch, batch])
    assert torch.allclose(twice, 2 * once)
