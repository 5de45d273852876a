"""Channel pruning ops: groups, L1 selection, rounding, analytic MACs, budget projection, checkpoint reload."""

from __future__ import annotations

import copy
import io
import random

import pytest
import torch
from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.errors import ConfigError
from pf_ray.metrics import model_stats
from pf_ray.models import build_model
from pf_ray.ops.channel_groups import prunable_groups
from pf_ray.ops.macs_budget import macs_after, macs_table, project_to_budget
from pf_ray.ops.pruning import kept_channel_count, l1_channel_scores, prune_channels_
from pf_ray.ops.resize import resize_to_state_dict_

SHAPE = (1, 16, 16)  # small grey images keep every trace fast


def _resnet20() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10)


def _mobilenet_v2() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig("mobilenet_v2", width_multiplier=0.5), in_channels=3, num_classes=10)


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    return _resnet20()


def _outputs(model: nn.Module, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed)))


# --------------------------------------------------------------------------------------------------------------
# Channel counts


@pytest.mark.parametrize(
    "num_channels, keep_ratio, round_to, expected",
    [
        (16, 0.5, 8, 8),
        (16, 0.3, 8, 8),  # 4.8 -> 5 channels -> nearest multiple of 8 is 8
        (16, 0.75, 8, 16),  # 12 is half-way between 8 and 16: halves round up
        (64, 0.4, 8, 24),  # 25.6 -> 26 -> 24
        (64, 0.45, 8, 32),  # 28.8 -> 29 -> 32
        (10, 0.05, 8, 8),  # at least round_to ...
        (4, 0.5, 8, 4),  # ... but never more than there are
        (20, 1.0, 8, 20),  # 20 -> 24 -> capped at 20
        (30, 0.5, 4, 16),  # 15 -> 16
        (10, 0.25, 1, 3),  # 2.5 rounds up to 3
        (3, 0.01, 1, 1),  # at least one channel
        (96, 0.5, 4, 48),
    ],
)
def test_kept_channel_count(num_channels, keep_ratio, round_to, expected):
    assert kept_channel_count(num_channels, keep_ratio, round_to) == expected


@pytest.mark.parametrize("arguments", [(16, 0.0, 8), (16, 1.5, 8), (16, 0.5, 0), (0, 0.5, 1)])
def test_kept_channel_count_rejects_bad_arguments(arguments):
    with pytest.raises(ConfigError):
        kept_channel_count(*arguments)


# --------------------------------------------------------------------------------------------------------------
# Groups


def test_resnet20_groups_are_nine_blocks_and_three_trunks(resnet20):
    groups = prunable_groups(resnet20, SHAPE)
    assert [(g.name, g.num_channels) for g in groups] == [
        ("conv1", 16),  # stem + stage-1 trunk
        ("layer1.0.conv1", 16),
        ("layer1.1.conv1", 16),
        ("layer1.2.conv1", 16),
        ("layer2.0.conv1", 32),
        ("layer2.0.conv2", 32),  # stage-2 trunk with its projection shortcut
        ("layer2.1.conv1", 32),
        ("layer2.2.conv1", 32),
        ("layer3.0.conv1", 64),
        ("layer3.0.conv2", 64),  # stage-3 trunk
        ("layer3.1.conv1", 64),
        ("layer3.2.conv1", 64),
    ]
    trunk = {(m.module, m.dim) for m in groups[5].members}
    assert {
        ("layer2.0.shortcut.0", "out"),
        ("layer2.1.conv2", "out"),
        ("layer2.2.conv2", "out"),
        ("layer3.0.conv1", "in"),
        ("layer3.0.shortcut.0", "in"),
    } <= trunk
    assert ("fc", "in") in {(m.module, m.dim) for m in groups[9].members}
    # the classifier's outputs and the input image's channels belong to no group
    assert not any(m.module == "fc" and m.dim == "out" for g in groups for m in g.members)
    assert not any(m.module == "conv1" and m.dim == "in" for g in groups for m in g.members)


def test_uniform_half_with_round_to_8_prunes_every_layer_and_the_trunks(resnet20):
    model = copy.deepcopy(resnet20)
    num_groups = len(prunable_groups(model, SHAPE))
    expected_macs = macs_after(resnet20, SHAPE, [0.5] * num_groups, 8)
    kept = prune_channels_(model, SHAPE, [0.5] * num_groups, round_to=8)

    assert kept["conv1"] == 8 and kept["layer2.0.conv2"] == 16 and kept["layer3.2.conv1"] == 32
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.out_channels % 8 == 0, name
            assert module.in_channels % 8 == 0 or name == "conv1", name
    assert model.conv1.in_channels == 1  # the image's channels stay
    # residual trunks: stem, every block's second conv and the projections lost the same channels
    assert model.conv1.out_channels == model.layer1[2].conv2.out_channels == 8
    assert model.layer2[0].shortcut[0].out_channels == model.layer2[2].bn2.num_features == 16
    assert model.layer3[0].shortcut[0].out_channels == model.fc.in_features == 32
    assert model.fc.out_features == 10
    assert _outputs(model, SHAPE).shape == (4, 10)
    macs = model_stats(model, SHAPE).macs
    assert macs == expected_macs
    assert macs < 0.3 * model_stats(resnet20, SHAPE).macs  # about a quarter: every layer halved both ways


class _TinyNet(nn.Module):
    """conv(1 -> 16) -> BN -> ReLU -> pool -> linear(16 -> 3): one prunable group of 16 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("keep_ratio, round_to, num_kept", [(0.5, 8, 8), (0.25, 1, 4)])
def test_l1_keeps_exactly_the_largest_filters(keep_ratio, round_to, num_kept):
    torch.manual_seed(0)
    model = _TinyNet()
    norms = torch.randperm(16).double() + 1  # filter c has L1 norm norms[c]: all different
    with torch.no_grad():
        signs = torch.randn(16, 1, 3, 3).sign()
        model.conv.weight.copy_(signs * (norms / 9).view(16, 1, 1, 1))
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.running_mean.normal_()
    original = copy.deepcopy(model)
    (group,) = prunable_groups(model, (1, 8, 8))
    assert torch.allclose(l1_channel_scores(model, group), norms)

    prune_channels_(model, (1, 8, 8), [keep_ratio], round_to=round_to)

    kept = torch.sort(torch.argsort(norms, descending=True)[:num_kept]).values
    assert torch.equal(model.conv.weight, original.conv.weight[kept])
    assert torch.equal(model.conv.bias, original.conv.bias[kept])
    assert torch.equal(model.bn.weight, original.bn.weight[kept])
    assert torch.equal(model.bn.running_mean, original.bn.running_mean[kept])
    assert torch.equal(model.fc.weight, original.fc.weight[:, kept])
    assert torch.equal(model.fc.bias, original.fc.bias)


def test_wrong_number_of_ratios_names_the_field(resnet20):
    with pytest.raises(ConfigError, match=r"learner\.options\.layer_keep_ratios: got 3 values; expected 12"):
        prune_channels_(copy.deepcopy(resnet20), SHAPE, [0.5] * 3)
    with pytest.raises(ConfigError, match=r"layer_keep_ratios: got 13 values; expected 12"):
        macs_after(resnet20, SHAPE, [0.5] * 13, 8)


def test_unknown_criterion_lists_the_known_ones(resnet20):
    with pytest.raises(ConfigError, match="criterion: got 'taylor'; allowed: l1, lasso"):
        prune_channels_(copy.deepcopy(resnet20), SHAPE, [0.5] * 12, criterion="taylor")


def test_lasso_without_data_says_what_it_needs(resnet20):
    with pytest.raises(ConfigError, match="criterion 'lasso' needs training data: pass batches="):
        prune_channels_(copy.deepcopy(resnet20), SHAPE, [0.5] * 12, criterion="lasso")


# --------------------------------------------------------------------------------------------------------------
# Analytic MACs = MACs measured after really pruning


@pytest.mark.parametrize(
    "build, shape", [(_resnet20, SHAPE), (_mobilenet_v2, (3, 32, 32))], ids=["resnet20", "mobilenet_v2"]
)
def test_analytic_macs_equal_measured_macs(build, shape):
    base = build()
    num_groups = len(prunable_groups(base, shape))
    assert macs_after(base, shape, [1.0] * num_groups, 1) == model_stats(base, shape).macs
    rng = random.Random(0)
    for round_to in (1, 8):
        ratios = [rng.uniform(0.1, 1.0) for _ in range(num_groups)]
        model = copy.deepcopy(base)
        prune_channels_(model, shape, ratios, round_to=round_to)
        assert model_stats(model, shape).macs == macs_after(base, shape, ratios, round_to)
        assert _outputs(model, shape).shape == (4, 10)


# --------------------------------------------------------------------------------------------------------------
# Budget projection


def _is_count(ratio: float, size: int) -> bool:
    """A topped-up group's ratio is kept / size exactly."""
    return abs(ratio * size - round(ratio * size)) < 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_projection_spends_the_budget_and_keeps_the_shape(resnet20, seed):
    rng = random.Random(seed)
    ratios = [rng.uniform(0.2, 1.0) for _ in range(12)]
    table = macs_table(resnet20, SHAPE)
    budget = 0.5 * table.macs([1.0] * 12, 8)
    projected = project_to_budget(macs_table(resnet20, SHAPE), ratios, 0.5, round_to=8, min_ratio=0.1)

    kept = [kept_channel_count(n, p, 8) for n, p in zip(table.sizes, projected, strict=True)]
    assert table.macs_of_counts(kept) == macs_after(resnet20, SHAPE, projected, 8) <= budget
    # nothing left to spend: no group can keep one more rounding step of channels within the budget
    for group, size in enumerate(table.sizes):
        if kept[group] < size:
            grown = kept[:group] + [min(kept[group] + 8, size)] + kept[group + 1 :]
            assert table.macs_of_counts(grown) > budget
    # the groups the top-up left alone are the proposal times one common scale (clipped to [0.1, 1])
    scales = [
        p / r for r, p, n in zip(ratios, projected, table.sizes, strict=True) if 0.1 < p < 1.0 and not _is_count(p, n)
    ]
    assert len(scales) >= 3 and max(scales) == pytest.approx(min(scales), rel=1e-12)


@pytest.mark.parametrize(
    "build, shape",
    [
        (_resnet20, (1, 8, 8)),
        (lambda: build_model(ModelConfig("mobilenet_v2"), in_channels=1, num_classes=10), (1, 8, 8)),
        (lambda: build_model(ModelConfig("torchvision_resnet18"), in_channels=1, num_classes=10), (1, 32, 32)),
    ],
    ids=["resnet20", "mobilenet_v2", "torchvision_resnet18"],
)
def test_projection_with_round_to_1_lands_within_2_percent_of_the_target(build, shape):
    model = build()
    table = macs_table(model, shape)
    baseline = table.macs([1.0] * len(table.names), 1)
    rng = random.Random(0)
    for target in (0.21, 0.5, 0.74):
        proposal = [rng.uniform(0.05, 1.0) for _ in table.names]
        projected = project_to_budget(macs_table(model, shape), proposal, target, round_to=1, min_ratio=0.1)
        assert 0.98 * target <= table.macs(projected, 1) / baseline <= target


def test_lasso_pruned_resnet20_has_the_projected_macs():
    model = _resnet20()
    shape = (1, 8, 8)
    proposal = [random.Random(3).uniform(0.2, 1.0) for _ in range(12)]
    projected = project_to_budget(macs_table(model, shape), proposal, 0.4, round_to=1, min_ratio=0.1)
    baseline = model_stats(model, shape).macs
    batches = [torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))]
    prune_channels_(model, shape, projected, round_to=1, criterion="lasso", batches=batches)
    assert 0.98 * 0.4 <= model_stats(model, shape).macs / baseline <= 0.4


def test_projection_grows_a_proposal_far_under_budget(resnet20):
    projected = project_to_budget(macs_table(resnet20, SHAPE), [0.2] * 12, 0.5, round_to=8, min_ratio=0.1)
    assert all(p > 0.2 for p in projected)
    baseline = macs_after(resnet20, SHAPE, [1.0] * 12, 8)
    assert 0.4 * baseline < macs_after(resnet20, SHAPE, projected, 8) <= 0.5 * baseline


def test_projection_reports_an_unreachable_budget(resnet20):
    with pytest.raises(
        ConfigError,
        match=r"search\.target_macs_ratio: got 0.01; the smallest reachable with "
        r"round_to=8 and min ratio 0.1 is 0\.\d+",
    ):
        project_to_budget(macs_table(resnet20, SHAPE), [0.5] * 12, 0.01, round_to=8, min_ratio=0.1)


# --------------------------------------------------------------------------------------------------------------
# Reloading a pruned checkpoint from (architecture, state dict)


@pytest.mark.parametrize(
    "build, shape", [(_resnet20, SHAPE), (_mobilenet_v2, (3, 32, 32))], ids=["resnet20", "mobilenet_v2"]
)
def test_resize_to_state_dict_round_trip(build, shape):
    model = build()
    num_groups = len(prunable_groups(model, shape))
    ratios = [random.Random(2).uniform(0.1, 1.0) for _ in range(num_groups)]
    prune_channels_(model, shape, ratios, round_to=8)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state_dict = torch.load(buffer, weights_only=True)

    fresh = resize_to_state_dict_(build(), state_dict)
    fresh.load_state_dict(state_dict)  # strict: every shape matches
    assert torch.equal(_outputs(fresh, shape), _outputs(model, shape))
    assert model_stats(fresh, shape) == model_stats(model, shape)


def test_the_uniform_keep_ratio_toward_a_macs_fraction_is_hand_computed() -> None:
    """small_cnn on 1x8x8: conv 1->k1 (576 MACs a channel), conv k1->k2 (576 a pair), linear k2->10. At 0.68 the
    counts are (5, 11): 34,670 of 78,496 MACs <= half; at 0.69 they are (6, 11): 41,582 > half. With the 16-channel
    group left whole: k1 * 9,792 + 160 <= 39,248 needs k1 <= 3, which round(8 r) gives below 0.4375."""
    from pf_ray.ops.macs_budget import macs_table, uniform_keep_ratio, without_groups
    from tests.latency.conftest import small_cnn

    table = macs_table(small_cnn(), (1, 8, 8))
    assert table.macs([1.0, 1.0], 1) == 78_496
    assert uniform_keep_ratio(table, 0.5, 1, lowest=0.1) == 0.68
    assert uniform_keep_ratio(table, 0.01, 1, lowest=0.3) == 0.3  # unreachable: the floor
    assert uniform_keep_ratio(without_groups(table, [table.names[1]]), 0.5, 1, lowest=0.1) == 0.43
