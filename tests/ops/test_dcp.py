"""Discrimination-aware channel pruning's maths (pf_ray.ops.dcp): greedy selection on a hand-checkable layer,
grouped-conv kernel slices, the reconstruction loss, masks equal removal, the auxiliary head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pf_ray.ops.channel_groups import GroupMember, prunable_groups
from pf_ray.ops.dcp import (
    AuxiliaryHead,
    channel_mask,
    input_channel_squared_norms,
    input_channel_weight_mask,
    mask_consumer_inputs_,
    reconstruction_loss,
    remove_unkept_channels_,
    select_channels_greedily_,
)
from tests.tiny import tiny_resnet20 as _resnet20


def _member(channels: int) -> GroupMember:
    return GroupMember("layer", "in", tuple(range(channels)), tuple(range(channels)))



def test_greedy_selection_adds_the_channel_with_the_largest_gradient_first():
    # A 1x1 conv, weights [1, 1, 1], on constant input channels 1, 10 and 2; the loss asks for the original
    # output 13. With every channel masked the output is 0 and the gradient of channel k is proportional to
    # -13 * x_k: channel 1 (x=10) first. Then the output is 10 and the gradients -3 * x_k: channel 2, then 0.
    layer = nn.Conv2d(3, 1, 1, bias=False)
    nn.init.ones_(layer.weight)
    inputs = torch.tensor([1.0, 10.0, 2.0]).view(1, 3, 1, 1).expand(4, 3, 5, 5)
    target = layer(inputs).detach()
    kept = torch.ones(3, dtype=torch.bool)
    order = select_channels_greedily_(
        [(layer, _member(3))], kept, 2, lambda: reconstruction_loss(layer(inputs), target)
    )
    assert order == [1, 2]
    assert kept.tolist() == [False, True, True]
    assert layer.weight.flatten().tolist() == [0.0, 1.0, 1.0]  # kept slices restored, the rest zero


def test_greedy_selection_sums_gradients_over_consumers():
    # Two linear consumers, weights [1, 1], read the group on different inputs. Alone, the first (inputs 1 and 3,
    # target 4) scores the channels (4*1)^2 = 16 and (4*3)^2 = 144 and keeps channel 1; the second (inputs 5 and
    # 0, target 5) adds 25^2 = 625 and 0, so together channel 0 wins: 641 against 144.
    first, second = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    nn.init.ones_(first.weight)
    nn.init.ones_(second.weight)
    first_inputs, second_inputs = torch.tensor([[1.0, 3.0]]), torch.tensor([[5.0, 0.0]])
    targets = first(first_inputs).detach(), second(second_inputs).detach()
    first_loss = lambda: reconstruction_loss(first(first_inputs), targets[0])
    both_loss = lambda: first_loss() + reconstruction_loss(second(second_inputs), targets[1])
    kept = torch.ones(2, dtype=torch.bool)
    assert select_channels_greedily_([(first, _member(2))], kept, 1, first_loss) == [1]
    nn.init.ones_(first.weight)
    assert select_channels_greedily_([(first, _member(2)), (second, _member(2))], kept, 1, both_loss) == [0]


def test_kernel_slices_of_grouped_convolutions():
    layer = nn.Conv2d(4, 6, 3, groups=2, bias=False)  # weight (6, 2, 3, 3): inputs 0-1 -> rows 0-2, 2-3 -> 3-5
    grad = torch.zeros_like(layer.weight)
    grad[3:6, 1] = 1.0  # input channel 3: second group, second column
    assert input_channel_squared_norms(layer, grad).tolist() == [0.0, 0.0, 0.0, 27.0]
    mask = input_channel_weight_mask(layer, torch.tensor([True, True, True, False]))
    assert mask.shape == layer.weight.shape
    assert mask[3:6, 1].sum() == 0 and mask.sum() == layer.weight.numel() - 27


def test_reconstruction_loss_ignores_removed_output_channels():
    output, target = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    target[:, 1] = 5.0  # only channel 1 differs
    assert reconstruction_loss(output, target, torch.tensor([True, False, True])) == 0.0
    assert reconstruction_loss(output, target, torch.tensor([True, True, True])) == pytest.approx(0.5 * 25 / 3)


def test_masking_the_consumers_equals_removing_the_channels():
    # Masks drive the whole selection; they are only right if a masked model computes what the pruned one does,
    # residual trunks included.
    shape = (1, 8, 8)
    model = _resnet20().eval()
    groups = prunable_groups(model, shape)
    generator = torch.Generator().manual_seed(0)
    kept = {}
    for group in groups:
        kept[group.name] = torch.zeros(group.num_channels, dtype=torch.bool)
        kept[group.name][torch.randperm(group.num_channels, generator=generator)[: group.num_channels // 2]] = True
    modules = dict(model.named_modules())
    for group in groups:
        consumers = [(modules[m.module], m) for m in group.members if m.dim == "in"]
        mask_consumer_inputs_(consumers, kept[group.name])
    inputs = torch.randn(4, *shape, generator=generator)
    with torch.no_grad():
        masked = model(inputs)
        counts = remove_unkept_channels_(model, shape, groups, kept)
        pruned = model(inputs)
    assert counts == {name: int(mask.sum()) for name, mask in kept.items()}
    assert model.conv1.out_channels == 8
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-5)


def test_auxiliary_head_shapes():
    assert AuxiliaryHead(8, 10)(torch.randn(4, 8, 5, 5)).shape == (4, 10)
    assert AuxiliaryHead(8, 10, spatial=False)(torch.randn(4, 8), torch.ones(8, dtype=torch.bool)).shape == (4, 10)


def test_channel_mask_maps_group_channels_to_layer_channels():
    member = GroupMember("layer", "in", (1, 3), (0, 1))  # the layer's channels 1 and 3 are group channels 0, 1
    assert channel_mask(4, [(member, torch.tensor([True, False]))]).tolist() == [True, True, True, False]
