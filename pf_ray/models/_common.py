"""Helpers shared by the model files: channel rounding, weight initialisation, width-multiplier checks."""

from __future__ import annotations

from torch import nn

from pf_ray.errors import ConfigError


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor``, never more than 10% below ``value``.

    The rounding of the MobileNet v2 reference implementation (Sandler et al. 2018, TensorFlow slim).
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan_out, ReLU gain), BN to identity, small normal linear layers."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


def require_unit_width(model_name: str, width_multiplier: float) -> None:
    if width_multiplier != 1.0:
        raise ConfigError(
            f"model.width_multiplier: got {width_multiplier!r}; model {model_name!r} has no width multiplier, "
            "so only 1.0 is allowed (models with one: mobilenet_v1, mobilenet_v2, torchvision:mobilenet_v2, "
            "torchvision:mobilenet_v3_small, torchvision:mobilenet_v3_large)"
        )
