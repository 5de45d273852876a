"""torchvision's ResNet-18, MobileNet v2 and MobileNet v3-small, built untrained (weights=None, no download).

He et al. 2016; Sandler et al. 2018; Howard et al., "Searching for MobileNetV3", ICCV 2019.
The first convolution is replaced when ``in_channels != 3``; the classifier has ``num_classes`` outputs. The
ImageNet strides are kept (overall stride 32): inputs from 32x32 up work, smaller ones shrink to 1x1.
"""

from __future__ import annotations

from torch import nn
from torchvision import models

from pf_ray.models._common import require_unit_width
from pf_ray.registry import MODELS


def _replace_first_conv(parent: nn.Module, attribute: str | int, in_channels: int) -> None:
    """Swap ``parent[attribute]`` for the same convolution reading ``in_channels`` channels (Kaiming init)."""
    old = parent[attribute] if isinstance(attribute, int) else getattr(parent, attribute)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    if isinstance(attribute, int):
        parent[attribute] = new
    else:
        setattr(parent, attribute, new)


@MODELS.register("torchvision_resnet18", supports_width_multiplier=False)
def torchvision_resnet18(in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
    require_unit_width("torchvision_resnet18", width_multiplier)
    model = models.resnet18(weights=None, num_classes=num_classes)
    _replace_first_conv(model, "conv1", in_channels)
    return model


@MODELS.register("torchvision_mobilenet_v2", supports_width_multiplier=True)
def torchvision_mobilenet_v2(in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
    model = models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_multiplier)
    _replace_first_conv(model.features[0], 0, in_channels)  # features[0] = Conv2dNormActivation
    return model


@MODELS.register("torchvision_mobilenet_v3_small", supports_width_multiplier=True)
def torchvision_mobilenet_v3_small(in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
    model = models.mobilenet_v3_small(weights=None, num_classes=num_classes, width_mult=width_multiplier)
    _replace_first_conv(model.features[0], 0, in_channels)
    return model
