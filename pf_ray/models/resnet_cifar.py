"""CIFAR-style ResNet-20/32/44/56 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Three stages of ``n`` basic blocks with 16/32/64 channels (depth = 6n + 2), a 3x3 stride-1 stem, global average
pooling and a linear head. Shortcuts that change shape are 1x1 conv + BN projections (the paper's option B).
Everything is plain Conv2d/BatchNorm2d/ReLU modules with the residual add in ``forward``, so Torch-Pruning's
dependency graph can trace it and remove channels along the residual trunk.
"""

from __future__ import annotations

from torch import Tensor, nn

from pf_ray.models._common import init_weights, require_unit_width
from pf_ray.registry import MODELS

STAGE_WIDTHS = (16, 32, 64)  # channels of the three stages; stages 2 and 3 halve the resolution


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers and a shortcut: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: works for any input of at least 8x8 pixels and any channel count."""

    def __init__(self, blocks_per_stage: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        channels = STAGE_WIDTHS[0]
        stages = []
        for index, width in enumerate(STAGE_WIDTHS):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, num_classes)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, ceil(H/4), ceil(W/4))
        return self.fc(self.pool(x).flatten(1))


def _register(name: str, blocks_per_stage: int) -> None:
    def build(in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
        require_unit_width(name, width_multiplier)
        return CifarResNet(blocks_per_stage, in_channels, num_classes)

    build.__name__ = name
    build.__doc__ = f"ResNet-{6 * blocks_per_stage + 2} for CIFAR-sized inputs ({blocks_per_stage} blocks/stage)."
    MODELS.register(name, supports_width_multiplier=False)(build)


for _depth in (20, 32, 44, 56):
    _register(f"resnet{_depth}", (_depth - 2) // 6)
