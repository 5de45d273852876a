"""LASSO channel selection and least-squares reconstruction: sampling, selection, alpha search, refit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.errors import ConfigError
from pf_ray.metrics import model_stats
from pf_ray.models import build_model
from pf_ray.ops import channel_choice
from pf_ray.ops.channel_groups import prunable_groups
from pf_ray.ops.feature_sampling import _conv_patches, residual_target, sample_layers
from pf_ray.ops.lasso import ChannelProblem, channel_problem, least_squares_weights, select_channels
from pf_ray.ops.macs_budget import macs_after
from pf_ray.ops.pruning import CRITERIA, lasso_consumers, prune_channels_


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize(
    "options",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "padding": 1},
        {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
        {"kernel_size": 1},
        {"kernel_size": 3, "padding": "same"},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    ],
)
def test_patches_are_the_im2col_columns_of_the_sampled_positions(options):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 5, **options)
    x = torch.randn(3, 4, 9, 10)
    output = conv(x)
    positions = torch.randint(0, output.shape[2] * output.shape[3], (3, 6))
    patches = _conv_patches(conv, x, positions)  # (18, 4, kernel)

    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    columns = F.unfold(
        F.pad(x, conv._reversed_padding_repeated_twice, mode=mode),
        conv.kernel_size,
        dilation=conv.dilation,
        stride=conv.stride,
    )
    expected = columns.gather(2, positions.unsqueeze(1).expand(-1, columns.shape[1], -1)).transpose(1, 2)
    assert torch.equal(patches, expected.reshape(18, 4, -1))
    # and patch . filter is the conv's output there
    sampled = output.flatten(2).gather(2, positions.unsqueeze(1).expand(-1, 5, -1)).transpose(1, 2).reshape(18, 5)
    assert torch.allclose(patches.flatten(1) @ conv.weight.flatten(1).T + conv.bias, sampled, atol=1e-5)


class _Block(nn.Module):
    """stem conv -> bn -> relu, then relu(bn2(conv2(x)) + x) and a linear head: one residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(x.mean((2, 3)))


def _block() -> _Block:
    torch.manual_seed(0)
    model = _Block()
    with torch.no_grad():
        for bn in (model.bn, model.bn2):
            bn.weight.uniform_(0.5, 2.0)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_samples_are_consistent_and_deterministic_by_seed():
    model = _block()
    batches = [torch.randn(4, 1, 6, 6, generator=_generator(i)) for i in range(2)]
    samples = sample_layers(model, ["stem", "conv2", "fc"], batches, points_per_image=5, seed=3)
    again = sample_layers(model, ["stem", "conv2", "fc"], batches, points_per_image=5, seed=3)
    other = sample_layers(model, ["stem", "conv2", "fc"], batches, points_per_image=5, seed=4)

    for name, module in (("stem", model.stem), ("conv2", model.conv2), ("fc", model.fc)):
        s = samples[name]
        points = 2 * 4 * (1 if name == "fc" else 5)  # batches x images x positions (a linear has one)
        assert s.inputs.shape[0] == s.outputs.shape[0] == points
        # outputs are before the bias: exactly patch . filter
        assert torch.allclose(s.inputs.flatten(1) @ module.weight.flatten(1).T, s.outputs, atol=1e-5)
        assert torch.equal(s.inputs, again[name].inputs) and torch.equal(s.outputs, again[name].outputs)
    assert not torch.equal(samples["conv2"].inputs, other["conv2"].inputs)
    assert model.training is False and not model.bn.training


def test_the_last_conv_of_a_residual_block_sees_the_other_operand_of_its_add():
    model = _block()
    batches = [torch.randn(4, 1, 6, 6, generator=_generator(0))]
    samples = sample_layers(model, ["stem", "conv2"], batches, points_per_image=5)
    conv2 = samples["conv2"]
    # the add's other operand is relu(bn(stem(x))) = conv2's own input at the patch centres
    assert torch.allclose(conv2.partner, conv2.inputs[:, :, 4])
    std = (model.bn2.running_var + model.bn2.eps).sqrt()
    assert torch.allclose(conv2.partner_scale, std / model.bn2.weight)
    assert samples["stem"].partner is None  # stem -> bn -> relu: no add right after

    # the drift-corrected target makes bn2(target) + s_current equal the reference sum
    current = copy.deepcopy(conv2)
    current.partner = conv2.partner + torch.randn(conv2.partner.shape, generator=_generator(1))
    channels = torch.arange(6)
    target = residual_target(conv2, current, channels)

    def bn2(y: torch.Tensor) -> torch.Tensor:
        return (y - model.bn2.running_mean) / std * model.bn2.weight + model.bn2.bias

    assert torch.allclose(bn2(target) + current.partner, bn2(conv2.outputs) + conv2.partner, atol=1e-4)


def test_an_output_changed_in_place_before_the_add_has_no_partner():
    """conv_b -> bn -> ReLU(inplace) -> x; then conv_c(x) + x: conv_b's output is not what is added (a ReLU is
    in between), conv_c's is (with no batch norm: scale 1)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_b = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU(inplace=True)
            self.conv_c = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.bn(self.conv_b(x)))
            return self.conv_c(x) + x

    torch.manual_seed(0)
    model = Net().eval()
    samples = sample_layers(model, ["conv_b", "conv_c"], [torch.randn(2, 1, 5, 5)], points_per_image=3)
    assert samples["conv_b"].partner is None
    assert torch.allclose(samples["conv_c"].partner, samples["conv_c"].inputs[:, :, 0])
    assert torch.equal(samples["conv_c"].partner_scale, torch.ones(4))


# --------------------------------------------------------------------------------------------------------------
# Selection


def _layer(num_points: int, seed: int, *, silent: tuple[int, ...], noise: tuple[int, ...]):
    """A 3x3 conv consumer with 8 input channels: ``silent`` ones are all zeros, ``noise`` ones are random and
    their filters are large, but the target is made of the other channels' contributions only."""
    generator = _generator(seed)
    inputs = torch.randn(num_points, 8, 9, generator=generator)
    inputs[:, list(silent)] = 0.0
    weight = torch.randn(6, 8, 3, 3, generator=generator)
    weight[:, list(noise)] *= 5.0  # L1 would keep these first
    informative = [c for c in range(8) if c not in silent and c not in noise]
    target = inputs[:, informative].flatten(1) @ weight[:, informative].flatten(1).T
    return inputs, weight, target + 0.01 * torch.randn(target.shape, generator=generator), informative


def test_lasso_keeps_the_channels_that_carry_the_signal():
    inputs, weight, target, informative = _layer(800, 0, silent=(1, 4, 6), noise=(2, 7))
    problem = channel_problem(inputs, weight, target, range(8), range(8), 8)
    selection = select_channels(problem, 3)
    assert list(selection.keep) == informative == [0, 3, 5]
    assert selection.exact


def test_prune_channels_lasso_keeps_informative_filters_where_l1_does_not():
    """conv1's channels 1, 4, 6 are dead (zero filters) and 2, 7 have the largest filters but conv2 ignores
    them: LASSO keeps 0, 3, 5; L1 keeps the big useless ones."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))

    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.conv1.weight[[1, 4, 6]] = 0.0
        model.conv1.weight[[2, 7]] *= 10.0
        model.conv2.weight[:, [2, 7]] = 0.0
    original = copy.deepcopy(model)
    shape = (1, 8, 8)
    batches = [torch.randn(16, *shape, generator=_generator(i)) for i in range(2)]
    groups = [g.name for g in prunable_groups(model, shape)]
    assert groups == ["conv1", "conv2"]

    l1_model = copy.deepcopy(model)
    prune_channels_(l1_model, shape, {"conv1": 3 / 8}, round_to=1, criterion="l1")
    prune_channels_(model, shape, {"conv1": 3 / 8}, round_to=1, criterion="lasso", batches=batches, reconstruct=False)
    assert torch.equal(model.conv1.weight, original.conv1.weight[[0, 3, 5]])
    assert torch.equal(model.conv2.weight, original.conv2.weight[:, [0, 3, 5]])  # no refit asked for
    assert 2 in _kept_rows(l1_model.conv1.weight, original.conv1.weight)
    # nothing was lost: the pruned model computes what the original did
    test = torch.randn(8, *shape, generator=_generator(9))
    with torch.no_grad():
        assert torch.allclose(model(test), original(test), atol=1e-5)


def _kept_rows(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    return [i for i in range(len(original)) if any(torch.equal(original[i], row) for row in pruned)]


def test_alpha_search_hits_every_count_exactly():
    generator = _generator(1)
    inputs = torch.randn(500, 12, 1, generator=generator)
    weight = torch.randn(5, 12, generator=generator)
    share = torch.linspace(0.1, 1.0, 12)[torch.randperm(12, generator=generator)]  # how much each channel matters
    target = inputs.flatten(1) @ (weight * share).T
    problem = channel_problem(inputs, weight, target, range(12), range(12), 12)
    for count in range(1, 12):
        selection = select_channels(problem, count)
        assert selection.exact, count
        assert np.count_nonzero(selection.coefficients) == len(selection.keep) == count
        assert set(selection.keep) == set(np.flatnonzero(selection.coefficients).tolist())
    assert select_channels(problem, 12).keep == tuple(range(12))


def test_a_count_the_lasso_path_jumps_over_is_still_met():
    # channels 0 and 1 explain the target almost equally: the window with exactly one of them is ~1e-5 wide
    problem = ChannelProblem(gram=np.diag([1.0, 1.0, 1.0]), correlation=np.array([0.799999, 0.8, 0.1]), energy=1.0)
    selection = select_channels(problem, 1, max_bisections=5, use_path=False)
    assert selection.keep == (1,) and not selection.exact  # the larger coefficient of the last alpha keeping 2
    on_path = select_channels(problem, 1, max_bisections=5)  # the LARS path sees the narrow window itself
    assert on_path.keep == (1,) and on_path.exact and on_path.alpha < 0.8


@pytest.mark.parametrize("seed", range(6))
def test_the_lars_path_keeps_what_the_alpha_search_keeps(seed):
    generator = _generator(seed)
    inputs = (torch.randn(400, 6, generator=generator) @ torch.randn(6, 24, generator=generator)
              + 0.3 * torch.randn(400, 24, generator=generator)).reshape(400, 24, 1)
    weight = torch.randn(10, 24, generator=generator)
    problem = channel_problem(inputs, weight, inputs.flatten(1) @ weight.T, range(24), range(24), 24)
    for count in (3, 8, 12, 20):
        searched = select_channels(problem, count, use_path=False)
        assert select_channels(problem, count).keep == searched.keep, count


def test_too_few_informative_channels_are_topped_up_by_correlation_then_index():
    problem = ChannelProblem(gram=np.diag([1.0, 1.0, 0.0, 0.0]), correlation=np.array([0.5, 0.8, 0.0, 0.0]), energy=1.0)
    assert select_channels(problem, 1).keep == (1,)
    assert select_channels(problem, 2).keep == (0, 1)
    selection = select_channels(problem, 3)
    assert selection.keep == (0, 1, 2) and not selection.exact  # two channels carry signal; the tie goes by index


# --------------------------------------------------------------------------------------------------------------
# Reconstruction


def _correlated_layer(num_points: int, seed: int):
    """8 input channels that are mixtures of 3 latent signals (plus a little noise): what a pruned channel
    carried, the kept ones still carry, so a refit can recover it."""
    generator = _generator(seed)
    mixing = torch.randn(3, 8 * 9, generator=_generator(100))
    weight = torch.randn(6, 8, 3, 3, generator=_generator(101))
    latent = torch.randn(num_points, 3, generator=generator)
    inputs = (latent @ mixing + 0.05 * torch.randn(num_points, 72, generator=generator)).reshape(-1, 8, 9)
    return inputs, weight, inputs.flatten(1) @ weight.flatten(1).T


def test_reconstruction_lowers_the_held_out_error_of_a_pruned_layer():
    inputs, weight, target = _correlated_layer(600, 0)
    kept = [0, 2, 5, 7]
    refit, bias = least_squares_weights(inputs, target, kept, weight, bias=False)
    assert refit.shape == (6, 4, 9) and bias is None

    held_out, _, held_out_target = _correlated_layer(400, 1)
    x = held_out[:, kept].flatten(1)
    plain = (held_out_target - x @ weight[:, kept].flatten(1).T).square().mean()
    reconstructed = (held_out_target - x @ refit.float().flatten(1).T).square().mean()
    assert reconstructed < 0.05 * plain


def test_reconstruction_never_does_worse_than_no_refit_on_held_out_points():
    # pure noise target, very few points: any refit overfits; the validated ridge falls back to no refit
    generator = _generator(2)
    inputs = torch.randn(40, 8, 9, generator=generator)
    weight = torch.randn(6, 8, 3, 3, generator=generator)
    target = inputs.flatten(1) @ weight.flatten(1).T
    refit, _ = least_squares_weights(
        inputs, target + 10 * torch.randn(40, 6, generator=generator), [0, 1, 2, 3], weight, bias=False
    )
    assert torch.allclose(refit.float(), weight[:, :4].flatten(2), atol=0.5)


def test_lasso_pruning_with_reconstruction_beats_both_without_it_on_a_trained_like_block():
    model = _block()
    shape = (1, 6, 6)
    batches = [torch.randn(32, *shape, generator=_generator(i)) for i in range(4)]
    test = torch.randn(64, *shape, generator=_generator(50))
    with torch.no_grad():
        reference = model(test)
    errors = {}
    for name, options in {
        "l1": {"criterion": "l1"},
        "lasso": {"criterion": "lasso", "batches": batches, "reconstruct": False},
        "lasso+refit": {"criterion": "lasso", "batches": batches, "reconstruct": True},
    }.items():
        pruned = copy.deepcopy(model)
        prune_channels_(pruned, shape, [0.5], round_to=1, **options)
        assert pruned.conv2.in_channels == 3 and pruned.fc.in_features == 3
        with torch.no_grad():
            errors[name] = float((pruned(test) - reference).square().mean())
    assert errors["lasso+refit"] < errors["lasso"] and errors["lasso+refit"] < errors["l1"]


# --------------------------------------------------------------------------------------------------------------
# Through pf_ray.ops.pruning: the criterion, depthwise convs, the L1 fallback


def _dead_and_useless_net() -> nn.Module:
    """conv1 -> relu -> conv2 -> relu -> pool -> fc; conv1's channels 1, 4, 6 are dead and 2, 7 are ignored."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        model[0].weight[[1, 4, 6]] = 0.0
        model[0].weight[[2, 7]] *= 10.0
        model[2].weight[:, [2, 7]] = 0.0
    return model


def test_the_lasso_criterion_scores_the_selection_first():
    model = _dead_and_useless_net()
    group = prunable_groups(model, (1, 8, 8))[0]
    batches = [torch.randn(16, 1, 8, 8, generator=_generator(0))]
    scores = CRITERIA["lasso"](model, group, batches=batches, num_kept=3)
    assert sorted(torch.argsort(scores, descending=True)[:3].tolist()) == [0, 3, 5]
    with pytest.raises(ConfigError, match="criterion 'lasso' needs training data: pass batches= and num_kept="):
        CRITERIA["lasso"](model, group)


def test_groups_lasso_cannot_regress_fall_back_to_l1_with_a_warning(monkeypatch):
    monkeypatch.setattr(channel_choice, "MAX_LASSO_FEATURES", 1)  # every consumer is now "too wide"
    batches = [torch.randn(16, 1, 8, 8, generator=_generator(0))]
    model, l1_model = _dead_and_useless_net(), _dead_and_useless_net()
    with pytest.warns(UserWarning, match=r"group '0': consumer '2' has 8 x 9 input features .* chosen by L1 norm"):
        prune_channels_(model, (1, 8, 8), {"0": 3 / 8}, round_to=1, criterion="lasso", batches=batches)
    prune_channels_(l1_model, (1, 8, 8), {"0": 3 / 8}, round_to=1, criterion="l1")
    assert torch.equal(model[0].weight, l1_model[0].weight)


def test_a_depthwise_conv_is_pruned_with_its_group_and_the_dense_layer_after_it_is_regressed():
    torch.manual_seed(0)
    model = build_model(ModelConfig("mobilenet_v2", width_multiplier=0.5), in_channels=1, num_classes=10).eval()
    shape = (1, 8, 8)
    groups = prunable_groups(model, shape)
    expanded = next(g for g in groups if g.name == "features.2.conv.0.0")  # 1x1 expand -> depthwise -> 1x1
    consumers, reason = lasso_consumers(model, expanded)
    assert reason == "" and [m.module for m in consumers] == ["features.2.conv.2"]
    assert ("features.2.conv.1.0", "out") in {(m.module, m.dim) for m in expanded.members}  # the depthwise conv

    # the groups up to and including this one (LASSO over all 25 groups took 18 s for nothing more to check)
    last = groups.index(expanded)
    ratios = [0.5 if index <= last else 1.0 for index in range(len(groups))]
    batches = [torch.randn(16, *shape, generator=_generator(i)) for i in range(2)]
    pruned = copy.deepcopy(model)
    prune_channels_(pruned, shape, ratios, round_to=1, criterion="lasso", batches=batches)
    depthwise = pruned.features[2].conv[1][0]
    assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == pruned.features[2].conv[2].in_channels
    assert model_stats(pruned, shape).macs == macs_after(model, shape, ratios, 1)
    with torch.no_grad():
        assert torch.isfinite(pruned(torch.randn(4, *shape))).all()


def test_a_non_finite_problem_is_left_to_the_alpha_search() -> None:
    """A diverged model's features (inf in the Gram matrix) make sklearn's LARS retry until an int overflows: the
    path is not tried, and the alpha search decides as it did before the path existed."""
    import numpy as np

    from pf_ray.ops.lasso import ChannelProblem, _from_lars_path

    gram = np.eye(4)
    gram[1, 1] = np.inf
    problem = ChannelProblem(gram=gram, correlation=np.ones(4), energy=1.0)
    assert _from_lars_path(problem, 2, 1.0) is None
