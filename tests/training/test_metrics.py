"""MACs / params / size: hand-computed answers on tiny nets, and ResNet-20 against the paper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.errors import ModelError
from pf_ray.metrics import CONV, DEPTHWISE_CONV, LINEAR, LayerInfo, layer_table, model_stats
from pf_ray.models import build_model


def tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 1x8x8 -> 4x8x8
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False),  # -> 8x4x4
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise -> 8x4x4
        nn.Conv2d(8, 8, 1, groups=2),  # grouped, not depthwise
        nn.MaxPool2d(2),  # -> 8x2x2
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def test_tiny_net_by_hand():
    rows = layer_table(tiny_net(), (1, 8, 8))
    assert rows == [
        LayerInfo("0", CONV, 1, 4, (3, 3), (1, 1), 1, (8, 8), macs=8 * 8 * 4 * 1 * 9, params=4 * 9 + 4),
        LayerInfo("3", CONV, 4, 8, (3, 3), (2, 2), 1, (4, 4), macs=4 * 4 * 8 * 4 * 9, params=8 * 4 * 9),
        LayerInfo("4", DEPTHWISE_CONV, 8, 8, (3, 3), (1, 1), 8, (4, 4), macs=4 * 4 * 8 * 1 * 9, params=8 * 9 + 8),
        LayerInfo("5", CONV, 8, 8, (1, 1), (1, 1), 2, (4, 4), macs=4 * 4 * 8 * 4, params=8 * 4 + 8),
        LayerInfo("8", LINEAR, 32, 10, (1, 1), (1, 1), 1, (1, 1), macs=320, params=330),
    ]
    stats = model_stats(tiny_net(), (1, 8, 8))
    assert stats.macs == 2304 + 4608 + 1152 + 512 + 320
    params = 40 + 8 + 288 + 80 + 40 + 330  # conv0, BN (weight + bias), conv3, conv4, conv5, linear
    assert stats.params == params
    assert stats.size_bytes == 4 * (params + 4 + 4 + 1)  # + BN running mean, var, num_batches_tracked


def test_linear_on_extra_leading_dimensions_counts_each_position():
    # A (1, 1, 5, 8) input: the Linear(8 -> 3) runs at 5 positions.
    assert model_stats(nn.Linear(8, 3), (1, 5, 8)).macs == 5 * 8 * 3


def test_rows_follow_execution_order_not_definition_order():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.conv = nn.Conv2d(1, 4, 8)

        def forward(self, x):
            return self.head(self.conv(x).flatten(1))

    assert [row.name for row in layer_table(Reversed(), (1, 8, 8))] == ["conv", "head"]


def test_modes_are_restored_and_gradients_untouched():
    model = tiny_net().train()
    model[1].eval()  # a mixed model stays mixed
    running_mean = model[1].running_mean.clone()
    layer_table(model, (1, 8, 8))
    assert model.training and not model[1].training and all(m.training for i, m in enumerate(model) if i != 1)
    assert torch.equal(model[1].running_mean, running_mean)
    assert all(p.grad is None for p in model.parameters())


def test_resnet20_matches_the_known_numbers():
    model = build_model(ModelConfig("resnet20"), in_channels=3, num_classes=10)
    stats = model_stats(model, (3, 32, 32))
    assert stats.macs == 40_813_184  # "about 41M" (40.8M) in the CIFAR ResNet literature
    assert stats.params == 272_474  # 0.27M
    rows = layer_table(model, (3, 32, 32))
    assert len(rows) == 19 + 2 + 1  # 3x3 convs, projection shortcuts, head
    assert rows[0].macs == 32 * 32 * 16 * 3 * 9 and rows[-1].macs == 64 * 10


def test_agrees_with_torch_pruning_on_conv_and_linear_layers():
    tp = pytest.importorskip("torch_pruning")
    model = build_model(ModelConfig("mobilenet_v2", width_multiplier=0.5), in_channels=3, num_classes=10)
    _, params, layer_flops, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, 32, 32), layer_wise=True)
    modules = dict(model.named_modules())
    for row in layer_table(model, (3, 32, 32)):
        module = modules[row.name]
        # Torch-Pruning adds one op per output element for a bias; we do not count biases.
        bias_ops = row.out_channels * row.output_size[0] * row.output_size[1] if module.bias is not None else 0
        assert layer_flops[module] == row.macs + bias_ops, row.name
    assert params == model_stats(model, (3, 32, 32)).params


def test_bad_input_shape_and_failing_forward_are_model_errors():
    with pytest.raises(ModelError, match=r"input_shape: got \(8, 8\)"):
        layer_table(tiny_net(), (8, 8))
    with pytest.raises(ModelError, match=r"forward failed on an input of shape \(1, 3, 8, 8\)"):
        layer_table(tiny_net(), (3, 8, 8))
