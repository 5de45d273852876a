"""Models by name: CIFAR ResNets, MobileNet v1/v2, every torchvision classifier ("torchvision:resnet50"), and user
models ("file.py:function")."""

from __future__ import annotations

import functools

import torch
from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.errors import ConfigError, ModelError, PfRayError
from pf_ray.models import mobilenet, resnet_cifar, torchvision_models  # noqa: F401  (registration)
from pf_ray.models.torchvision_models import build_torchvision, is_torchvision_name
from pf_ray.models.user import absolute_model_name, build_user_model, is_user_model, run_name_prefix
from pf_ray.registry import MODELS

__all__ = ["absolute_model_name", "build_model", "check_forward", "run_name_prefix"]


def build_model(config: ModelConfig, *, in_channels: int, num_classes: int,
                input_shape: tuple[int, int, int] | None = None) -> nn.Module:
    """Build the model ``config.name`` (registered name, ``torchvision:NAME`` or user reference) with fresh weights.

    Args:
        config: the model section; ``width_multiplier`` other than 1.0 needs a model that supports it.
        in_channels: channels of the input images (1 for Fashion-MNIST, 3 for CIFAR-10).
        num_classes: outputs of the classifier.
        input_shape: (channels, height, width) of the images, when known: torchvision models with a fixed input
            size (ViT, MaxViT) are built for it, and inputs too small for a torchvision model are refused.

    Raises:
        ConfigError: unknown name, or a width multiplier the model does not support.
        ModelError: a user model cannot be imported, called, or did not return an ``nn.Module``; a torchvision
            model cannot take ``input_shape``.
    """
    for field, value in (("in_channels", in_channels), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{field}: got {value!r}; expected a positive integer")
    if is_user_model(config.name):
        return build_user_model(
            config.name, in_channels=in_channels, num_classes=num_classes, width_multiplier=config.width_multiplier
        )
    if is_torchvision_name(config.name):
        factory = functools.partial(build_torchvision, config.name, input_shape=input_shape)
    else:
        try:
            factory = MODELS.get(config.name)
        except ConfigError as error:
            raise ConfigError(f"model.name: {error} (or 'torchvision:NAME', 'path/to/file.py:function', "
                              "'package.module:function')") from None
    try:
        model = factory(in_channels=in_channels, num_classes=num_classes, width_multiplier=config.width_multiplier)
    except PfRayError:
        raise
    except Exception as error:  # a builder that cannot make this model (e.g. torchvision's own checks)
        raise ModelError(f"model.name: building {config.name!r} for {in_channels} input channel(s) and "
                         f"{num_classes} classes raised {type(error).__name__}: {_first_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.name: {config.name!r} built a {type(model).__name__}; expected a torch.nn.Module")
    return model


def check_forward(model: nn.Module, name: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """Run ``model`` once (eval mode, two zero images of ``input_shape``): it must give (2, num_classes) logits.

    Raises:
        ModelError: the forward raised, or returned something else (a tuple, another shape); the model and the
            input shape are named.
    """
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            output = model(torch.zeros(2, *input_shape))
    except Exception as error:
        raise ModelError(f"model.name: {name!r} does not accept inputs of shape {tuple(input_shape)} (the "
                         f"dataset's channels, height, width): {type(error).__name__}: {_first_line(error)}"
                         ) from error
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"model.name: {name!r} returned a {type(output).__name__} for a batch of inputs "
                         f"{tuple(input_shape)}; expected a tensor of logits (batch, {num_classes})")
    if tuple(output.shape) != (2, num_classes):
        raise ModelError(f"model.name: {name!r} returned logits of shape {tuple(output.shape)} for a batch of 2 "
                         f"inputs {tuple(input_shape)}; expected (2, {num_classes}) for {num_classes} classes")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
