"""MobileNet v1 and v2 for small images, with a width multiplier.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications", 2017;
Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018.

The layer lists are the papers' ImageNet ones with CIFAR-friendly strides, so 28x28 and 32x32 inputs do not
vanish: the stem convolution has stride 1 (both), and in v2 the 24-channel stage too (as in the common CIFAR
ports), giving an overall stride of 16 (v1) and 8 (v2) instead of 32. Every channel count is
``make_divisible(channels * width_multiplier, 8)``; v2's last 1x1 convolution (1280) is only ever widened.
"""

from __future__ import annotations

from torch import Tensor, nn

from pf_ray.models._common import init_weights, make_divisible
from pf_ray.registry import MODELS

# MobileNet v1 after the stem: (output channels, stride) of each depthwise-separable block.
V1_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)

# MobileNet v2 after the stem: (expansion t, output channels c, repeats n, first stride s), the paper's Table 2
# with the 24-channel stage's stride 2 -> 1.
V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    relu: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias, "same" padding) + BatchNorm + activation."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        relu(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width_multiplier: float = 1.0) -> None:
        super().__init__()
        channels = make_divisible(32 * width_multiplier)
        layers = [conv_bn_relu(in_channels, channels, 3, stride=1)]
        for out_channels, stride in V1_BLOCKS:
            out_channels = make_divisible(out_channels * width_multiplier)
            layers.append(
                nn.Sequential(
                    conv_bn_relu(channels, channels, 3, stride=stride, groups=channels),  # depthwise 3x3
                    conv_bn_relu(channels, out_channels, 1),  # pointwise 1x1
                )
            )
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.classifier(self.pool(self.features(x)).flatten(1))


class InvertedResidual(nn.Module):
    """1x1 expansion (t x channels), 3x3 depthwise, linear 1x1 projection; identity shortcut when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_relu(in_channels, hidden, 1, relu=nn.ReLU6))
        layers += [
            conv_bn_relu(hidden, hidden, 3, stride=stride, groups=hidden, relu=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),  # linear bottleneck: no activation
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width_multiplier: float = 1.0) -> None:
        super().__init__()
        channels = make_divisible(32 * width_multiplier)
        last_channels = make_divisible(1280 * max(1.0, width_multiplier))
        layers: list[nn.Module] = [conv_bn_relu(in_channels, channels, 3, stride=1, relu=nn.ReLU6)]
        for expansion, out_channels, repeats, first_stride in V2_STAGES:
            out_channels = make_divisible(out_channels * width_multiplier)
            for repeat in range(repeats):
                stride = first_stride if repeat == 0 else 1
                layers.append(InvertedResidual(channels, out_channels, stride, expansion))
                channels = out_channels
        layers.append(conv_bn_relu(channels, last_channels, 1, relu=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.classifier(self.pool(self.features(x)).flatten(1))


@MODELS.register("mobilenet_v1", supports_width_multiplier=True)
def mobilenet_v1(in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
    return MobileNetV1(in_channels, num_classes, width_multiplier)


@MODELS.register("mobilenet_v2", supports_width_multiplier=True)
def mobilenet_v2(in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
    return MobileNetV2(in_channels, num_classes, width_multiplier)
