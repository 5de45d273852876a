"""Depth pruning's ops: residual blocks found (which, in which order, why not), removed exactly (what the block
computes with its branch's last batch norm zeroed), and joint depth-and-width candidates (groups after removal,
analytic MACs equal to the really pruned model's)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.errors import ConfigError, ModelError
from pf_ray.metrics import model_stats
from pf_ray.models import build_model
from pf_ray.models.resnet_cifar import BasicBlock
from pf_ray.ops import blocks as blocks_module
from pf_ray.ops.blocks import (
    RemovedBlock,
    removable_blocks,
    remove_blocks_,
    removed_blocks,
    residual_blocks,
)
from pf_ray.ops.channel_groups import prunable_groups
from pf_ray.ops.depth import apply_joint_, joint_macs, vanished_groups, without_blocks
from pf_ray.ops.macs_budget import macs_table
from pf_ray.ops.resize import resize_to_state_dict_
from tests.tiny import tiny_resnet20

SHAPE = (1, 16, 16)
MODELS = {  # name -> (config, input shape)
    "resnet20": (ModelConfig("resnet20"), (1, 16, 16)),
    "mobilenet_v2": (ModelConfig("mobilenet_v2", width_multiplier=0.5), (3, 16, 16)),
    "torchvision_resnet18": (ModelConfig("torchvision_resnet18"), (3, 32, 32)),
    "torchvision_mobilenet_v2": (ModelConfig("torchvision_mobilenet_v2", width_multiplier=0.5), (3, 32, 32)),
    "torchvision_mobilenet_v3_small": (ModelConfig("torchvision_mobilenet_v3_small"), (3, 32, 32)),
}


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model with random batch-norm parameters and statistics (so that every branch contributes)."""
    config, shape = MODELS[name]
    torch.manual_seed(0)
    model = build_model(config, in_channels=shape[0], num_classes=10).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model, shape


def _outputs(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(4, *shape, generator=torch.Generator().manual_seed(3)))


def _zeroed(model: nn.Module, names: list[str], shape: tuple[int, ...]) -> nn.Module:
    """The reference: a copy whose named blocks' branches end in a batch norm of weight and bias 0."""
    reference = copy.deepcopy(model)
    found = {b.name: b for b in residual_blocks(model, shape)}
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name in names:
            norm = modules[found[name].branch_end]
            assert isinstance(norm, nn.BatchNorm2d)
            norm.weight.zero_()
            norm.bias.zero_()
    return reference


# --------------------------------------------------------------------------------------------------------------
# Which blocks


def test_resnet20_has_nine_blocks_seven_removable() -> None:
    """Every stage's first block of stages 2 and 3 downsamples (projection shortcut); stage 1's first block keeps
    16 channels at stride 1, so its shortcut is the identity and it is removable too."""
    found = residual_blocks(tiny_resnet20(), SHAPE)
    assert [b.name for b in found] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert [b.name for b in found if b.removable] == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2",
                                                       "layer3.1", "layer3.2"]
    assert {b.name: b.reason for b in found if not b.removable} == {
        "layer2.0": "its shortcut is not the identity (a projection / downsampling shortcut)",
        "layer3.0": "its shortcut is not the identity (a projection / downsampling shortcut)"}
    block = found[1]
    assert (block.kind, block.branch_end, block.activation) == ("pf_ray BasicBlock", "layer1.1.bn2",
                                                                "layer1.1.relu2")
    assert block.input_non_negative and block.removed_is_identity and block.shape == (16, 16, 16)


@pytest.mark.parametrize("name, removable", [
    ("mobilenet_v2", [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]),  # not the first of a stage (shape changes), nor 1 / 17
    ("torchvision_resnet18", ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]),
    ("torchvision_mobilenet_v2", [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]),
    ("torchvision_mobilenet_v3_small", [3, 5, 6, 8, 10, 11]),
])
def test_removable_blocks_of_the_other_models(name, removable) -> None:
    model, shape = _model(name)
    names = [f"features.{i}" if isinstance(i, int) else i for i in removable]
    assert [b.name for b in removable_blocks(model, shape)] == names
    order = [n for n, _ in model.named_modules()]
    found = [b.name for b in residual_blocks(model, shape)]
    assert found == sorted(found, key=order.index)  # forward order (here also module order)


def test_a_model_without_known_blocks_has_none() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))
    assert residual_blocks(model, (1, 8, 8)) == []
    with pytest.raises(ModelError, match=r"input shape \(3, 8, 8\): the model cannot run an example"):
        residual_blocks(model, (3, 8, 8))


# --------------------------------------------------------------------------------------------------------------
# Removal is exact


@pytest.mark.parametrize("name", list(MODELS))
def test_removal_equals_the_branch_switched_off(name) -> None:
    model, shape = _model(name)
    names = [b.name for b in removable_blocks(model, shape)]
    for chosen in (names[:1], names[1::2], names):
        pruned = copy.deepcopy(model)
        remove_blocks_(pruned, shape, chosen, check=False)  # this test is the check
        assert removed_blocks(pruned) == chosen
        expected = _outputs(_zeroed(model, chosen, shape), shape)
        assert torch.equal(_outputs(pruned, shape), expected), chosen  # bit for bit
        assert not torch.allclose(expected, _outputs(model, shape))  # the branches did contribute
    # every removed block here has a non-negative input (a ReLU's output): its post-add ReLU is dropped
    assert all(module.activation is None for module in pruned.modules() if isinstance(module, RemovedBlock))


def test_a_post_add_relu_on_a_signed_input_is_kept() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), BasicBlock(8, 8, 1), BasicBlock(8, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    shape = (1, 8, 8)
    first, second = residual_blocks(model, shape)
    assert not first.input_non_negative and not first.removed_is_identity  # a batch norm's output: signed
    assert second.input_non_negative  # the first block's output is its ReLU's
    pruned = copy.deepcopy(model)
    remove_blocks_(pruned, shape, ["2", "3"])
    assert isinstance(pruned[2].activation, nn.ReLU) and not pruned[2].activation.inplace
    assert pruned[3].activation is None  # the removed first block's ReLU makes its input non-negative
    assert torch.equal(_outputs(pruned, shape), _outputs(_zeroed(model, ["2", "3"], shape), shape))
    identity = copy.deepcopy(pruned)
    identity[2].activation = None
    assert not torch.equal(_outputs(identity, shape), _outputs(pruned, shape))  # dropping that ReLU would be wrong


def test_the_check_catches_a_wrong_rule(monkeypatch) -> None:
    rule = blocks_module.block_types()[BasicBlock]
    wrong = blocks_module.BlockRule(rule.kind, rule.identity_shortcut, lambda block: "bn1", rule.activation)
    monkeypatch.setitem(blocks_module.block_types(), BasicBlock, wrong)  # claims the branch ends at bn1
    with pytest.raises(ModelError, match=r"removing blocks \['layer1.1'\] changed the model's output"):
        remove_blocks_(_model("resnet20")[0], SHAPE, ["layer1.1"])


def test_bad_block_names_are_refused_with_what_is_allowed() -> None:
    model = tiny_resnet20()
    with pytest.raises(ConfigError, match=r"removed block 'layer2.0': pf_ray BasicBlock its shortcut is not the "
                                          r"identity .*; removable blocks of this model: layer1.0, layer1.1"):
        remove_blocks_(model, SHAPE, ["layer2.0"])
    with pytest.raises(ConfigError, match="removed block 'layer9.9': no residual block of a known type"):
        remove_blocks_(model, SHAPE, ["layer9.9"])
    with pytest.raises(ConfigError, match="got the string 'layer1.1'"):
        remove_blocks_(model, SHAPE, "layer1.1")
    remove_blocks_(model, SHAPE, ["layer1.1"])
    with pytest.raises(ConfigError, match="removed block 'layer1.1': it is already removed"):
        remove_blocks_(model, SHAPE, ["layer1.1"])
    assert remove_blocks_(model, SHAPE, []) == []


def test_a_depth_pruned_checkpoint_loads_into_a_fresh_model() -> None:
    model = tiny_resnet20().eval()
    apply_joint_(model, SHAPE, ["layer1.1", "layer3.2"], {"conv1": 8, "layer3.0.conv2": 32})
    fresh = tiny_resnet20().eval()
    remove_blocks_(fresh, SHAPE, removed_blocks(model))
    state = model.state_dict()
    resize_to_state_dict_(fresh, state).load_state_dict(state)
    assert torch.equal(_outputs(fresh, SHAPE), _outputs(model, SHAPE))


# --------------------------------------------------------------------------------------------------------------
# Channel groups and MACs after removal


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "torchvision_resnet18"])
def test_groups_after_removal_are_the_originals_less_the_removed_blocks(name) -> None:
    model, shape = _model(name)
    original = {g.name: g for g in prunable_groups(model, shape)}
    table = macs_table(model, shape)
    names = [b.name for b in removable_blocks(model, shape)]
    rng = random.Random(0)
    for _ in range(3):
        removed = [n for n in names if rng.random() < 0.5]
        pruned = copy.deepcopy(model)
        remove_blocks_(pruned, shape, removed)
        after = {g.name: g for g in prunable_groups(pruned, shape)}
        gone = vanished_groups(table, removed)
        # a removed block's own groups disappear; every other group keeps its name, size and outside members
        assert set(after) == set(original) - set(gone)
        assert all(any(m.module.startswith(f"{r}.") for r in removed) for g in gone for m in original[g].members)
        for group_name, group in after.items():
            outside = {(m.module, m.dim) for m in original[group_name].members
                       if not any(m.module.startswith(f"{r}.") for r in removed)}
            assert {(m.module, m.dim) for m in group.members} == outside
            assert group.num_channels == original[group_name].num_channels
        assert macs_table(pruned, shape).macs_of_counts(macs_table(pruned, shape).sizes) == \
            without_blocks(table, removed).macs_of_counts(table.sizes)


def test_resnet20_removal_takes_the_blocks_own_group_and_thins_the_trunk() -> None:
    model = tiny_resnet20()
    table = macs_table(model, SHAPE)
    assert vanished_groups(table, ["layer1.1", "layer3.2"]) == ("layer1.1.conv1", "layer3.2.conv1")
    pruned = copy.deepcopy(model)
    remove_blocks_(pruned, SHAPE, ["layer1.1"])
    (trunk,) = [g for g in prunable_groups(pruned, SHAPE) if g.name == "conv1"]
    assert not any(m.module.startswith("layer1.1.") for m in trunk.members)
    assert ("layer1.2.conv2", "out") in {(m.module, m.dim) for m in trunk.members}


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2", "torchvision_resnet18"])
def test_analytic_macs_of_joint_candidates_equal_measured_macs(name) -> None:
    model, shape = _model(name)
    table = macs_table(model, shape)
    names = [b.name for b in removable_blocks(model, shape)]
    rng = random.Random(1)
    for _ in range(4):
        removed = [n for n in names if rng.random() < 0.4]
        kept = {g: rng.randint(1, n) for g, n in zip(table.names, table.sizes, strict=True)}
        pruned = copy.deepcopy(model)
        got = apply_joint_(pruned, shape, removed, kept)
        assert got == {g: kept[g] for g in table.names if g not in vanished_groups(table, removed)}
        assert joint_macs(table, removed, kept) == model_stats(pruned, shape).macs
        assert joint_macs(table, removed, [kept[g] for g in table.names]) == model_stats(pruned, shape).macs
    assert joint_macs(table, [], table.sizes) == model_stats(model, shape).macs


def test_joint_candidates_check_their_counts() -> None:
    model = tiny_resnet20()
    table = macs_table(model, SHAPE)
    with pytest.raises(ConfigError, match=r"kept channels of group 'conv1': got 17; allowed: an integer in \[1, 16\]"):
        joint_macs(table, [], {"conv1": 17})
    with pytest.raises(ConfigError, match="kept channels of group 'fc': no such channel group of the original"):
        apply_joint_(model, SHAPE, [], {"fc": 4})
    with pytest.raises(ConfigError, match="got 2 counts; expected 12"):
        joint_macs(table, [], [4, 4])
    with pytest.raises(ConfigError, match="removed block 'layer7': the model has no conv/linear layer"):
        without_blocks(table, ["layer7"])
