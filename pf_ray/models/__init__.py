"""Models by name: CIFAR ResNets, MobileNet v1/v2, torchvision models, and user models ("file.py:function")."""

from __future__ import annotations

from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.errors import ConfigError, ModelError
from pf_ray.models import mobilenet, resnet_cifar, torchvision_models  # noqa: F401  (registration)
from pf_ray.models.user import absolute_model_name, build_user_model, is_user_model, run_name_prefix
from pf_ray.registry import MODELS

__all__ = ["absolute_model_name", "build_model", "run_name_prefix"]


def build_model(config: ModelConfig, *, in_channels: int, num_classes: int) -> nn.Module:
    """Build the model ``config.name`` (registered name or user reference) with fresh weights.

    Args:
        config: the model section; ``width_multiplier`` other than 1.0 needs a model that supports it.
        in_channels: channels of the input images (1 for Fashion-MNIST, 3 for CIFAR-10).
        num_classes: outputs of the classifier.

    Raises:
        ConfigError: unknown name, or a width multiplier the model does not support.
        ModelError: a user model cannot be imported, called, or did not return an ``nn.Module``.
    """
    for field, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{field}: got {value!r}; expected a positive integer")
    if is_user_model(config.name):
        return build_user_model(
            config.name, in_channels=in_channels, num_classes=num_classes, width_multiplier=config.width_multiplier
        )
    try:
        factory = MODELS.get(config.name)
    except ConfigError as error:
        raise ConfigError(f"model.name: {error} (or 'path/to/file.py:function', 'package.module:function')") from None
    return factory(in_channels, num_classes, config.width_multiplier)
