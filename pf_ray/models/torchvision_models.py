"""Every torchvision classifier by name (``torchvision:resnet50``), built untrained (weights=None, no download).

The builders are torchvision 0.29's classification ones (``torchvision.models.list_models(module=
torchvision.models)``: not detection, segmentation, video, optical flow or quantized models). Each is adapted to
the dataset: the first convolution is replaced when ``in_channels != 3`` and the classifier has ``num_classes``
outputs. The ImageNet strides are kept (overall stride 32 for most): small inputs shrink to 1x1 feature maps.
Models with a fixed input size are built for the dataset's (ViT: ``image_size``; MaxViT: ``input_size``) or
refused in one line that names the size they need.

``torchvision_resnet18``, ``torchvision_mobilenet_v2`` and ``torchvision_mobilenet_v3_small``, the names of
before, stay registered as aliases. ``EXCLUDED`` lists the classifiers that build but that the contract test
(channel pruning toward half the MACs, ONNX export, ONNX Runtime parity) does not cover, with the reason.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Sequence

from torch import nn
from torchvision import models

from pf_ray.errors import ConfigError, ModelError
from pf_ray.models._common import require_unit_width
from pf_ray.models.user import TORCHVISION_PREFIX as PREFIX
from pf_ray.registry import MODELS

# Builders with a width multiplier of their own (``width_mult``): model.width_multiplier is passed to it.
WIDTH_MULTIPLIER_BUILDERS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")

# Extra keywords for some builders: without auxiliary classifiers, GoogLeNet and Inception-v3 return a tuple in
# training mode (which no loss takes); init_weights=True is their documented default, said out loud so that
# torchvision does not warn about it.
_BUILDER_OPTIONS: dict[str, dict[str, object]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}

# Classifiers that build and run but that the contract test (tests/models/test_torchvision_contract.py) does not
# cover: channel pruning toward half the MACs, ONNX export, ONNX Runtime parity. Name -> why. They can still be
# compressed by learners that keep the channels (weight_sparsification, uniform_quantization, native_int8) where
# the model allows it.
EXCLUDED: dict[str, str] = {
    "maxvit_t": "torch-pruning's dependency analysis does not finish within its bound (AnalysisLimits: 120 s; at "
                "3x224x224 it was stopped after 120 s and +3.4 GB on 2 cores, grouping the 5th of 150 layers, a grid "
                "attention's to_qkv): the window and grid partitions reshape across the channel axis",
    "regnet_y_128gf": "too large for the test machine (645M parameters, 2.6 GB in float32, over ONNX's 2 GB "
                      "single-file limit; 375 GFLOPs at 224x224)",
    **{name: "torch-pruning's dependency analysis does not finish within its bound (AnalysisLimits: 120 s; swin_t "
             "at 3x64x64 was stopped after 130 s on 2 cores, grouping the 1st of 28 layers): the windowed attention's "
             "reshapes across the channel axis" for name in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s",
                                                             "swin_v2_b")},
    **{name: "pruning it where the safety check (ops.safe_pruning, at keep ratio 0.3 on a copy) found it safe fails "
             "inside torch-pruning on the model itself (TypeError in its split handler: a split size of None, after "
             "the channel shuffle's reshapes; shufflenet_v2_x0_5 and x1_5 pass)"
       for name in ("shufflenet_v2_x1_0", "shufflenet_v2_x2_0")},
    **{name: "too large for the test machine at 3x224x224, the smallest input its ONNX export takes (15.5-19.6 "
             "GMACs): the slow sweep's process reached 16.9 GB resident memory on vgg16_bn and was killed for "
             "memory on the 23 GB machine (vgg11, vgg13 and their _bn pass)" for name in ("vgg16_bn", "vgg19",
                                                                                          "vgg19_bn")},
    "vit_h_14": "too large for the test machine (633M parameters, 2.5 GB in float32, over ONNX's 2 GB single-file "
                "limit; 1017 GFLOPs at 224x224)",
}


# The classifiers that cannot run, or export to ONNX, at a small input: the smallest square side they can, and why.
# (The legacy ONNX exporter takes an AdaptiveAvgPool2d only when its output size divides the input's.)
_VGG_SIDE = (224, "ONNX exports its AdaptiveAvgPool2d((7, 7)) only on a 7x7 (or 14x14...) feature map")
SMALLEST_SIDES: dict[str, tuple[int, str]] = {
    "alexnet": (224, "ONNX exports its AdaptiveAvgPool2d((6, 6)) only on a 6x6 (or 12x12...) feature map"),
    "inception_v3": (75, "its strides and kernels"),
    "maxvit_t": (224, "every stage's feature map must split into 7x7 windows"),
    **{name: _VGG_SIDE for name in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
                                    "vgg19_bn")},
}


def example_input_shape(name: str, side: int = 64, in_channels: int = 3) -> tuple[int, int, int]:
    """An input shape ``name`` (``resnet18`` or ``torchvision:resnet18``) runs and exports at: ``side`` x ``side``,
    or its ``SMALLEST_SIDES`` entry where ``side`` is below it (ViTs need a side that is a multiple of their patch
    size: 64 and 96 are, for every ViT of torchvision but vit_h_14's 14-pixel patches)."""
    builder = name.removeprefix(PREFIX)
    smallest = SMALLEST_SIDES.get(builder, (1, ""))[0]
    return (in_channels, max(side, smallest), max(side, smallest))


@functools.cache
def _all_classifiers() -> tuple[str, ...]:
    return tuple(models.list_models(module=models))


def classifier_names(*, include_excluded: bool = False) -> list[str]:
    """torchvision's classification builders (``resnet18``, ...; without the ``torchvision:`` prefix), sorted:
    those the contract test covers, or every one with ``include_excluded``."""
    return [name for name in _all_classifiers() if include_excluded or name not in EXCLUDED]


def is_torchvision_name(name: str) -> bool:
    return name.startswith(PREFIX)


def build_torchvision(name: str, *, in_channels: int, num_classes: int, width_multiplier: float = 1.0,
                      input_shape: Sequence[int] | None = None) -> nn.Module:
    """Build ``torchvision:NAME`` (or a bare NAME) untrained for ``in_channels`` and ``num_classes``.

    Args:
        name: ``torchvision:resnet50`` or ``resnet50``.
        width_multiplier: other than 1.0 only for builders with a ``width_mult`` (``WIDTH_MULTIPLIER_BUILDERS``).
        input_shape: (channels, height, width) of the dataset's images; the models with a fixed input size are
            built for it (None: torchvision's default, 224x224), and the CNNs refuse inputs smaller than the
            smallest their strides and kernels allow.

    Raises:
        ConfigError: an unknown name (close matches listed), or a width multiplier the builder does not have.
        ModelError: an input size the model cannot take.
    """
    builder = name.removeprefix(PREFIX)
    full_name = PREFIX + builder
    if builder not in _all_classifiers():
        close = difflib.get_close_matches(builder, _all_classifiers(), n=5, cutoff=0.5)
        hint = f"close matches: {', '.join(PREFIX + c for c in close)}; " if close else ""
        raise ConfigError(
            f"model.name: unknown torchvision classifier {full_name!r}; {hint}torchvision {_torchvision_version()} "
            f"has {len(_all_classifiers())} (list them with python -c \"import torchvision; "
            "print(torchvision.models.list_models(module=torchvision.models))\")"
        )
    options: dict[str, object] = dict(_BUILDER_OPTIONS.get(builder, {}))
    if builder in WIDTH_MULTIPLIER_BUILDERS:
        options["width_mult"] = width_multiplier
    else:
        require_unit_width(full_name, width_multiplier)
    if input_shape is not None:
        options.update(_input_size_options(builder, full_name, tuple(input_shape)))
    model = models.get_model(builder, weights=None, num_classes=num_classes, **options)
    replace_first_conv_(model, in_channels)
    return model


def _input_size_options(builder: str, full_name: str, input_shape: tuple[int, ...]) -> dict[str, object]:
    """The builder keywords that fit the model to ``input_shape``; ModelError for a size it cannot take."""
    if len(input_shape) != 3:
        raise ModelError(f"model.name: {full_name!r} takes images (channels, height, width); the dataset gives "
                         f"inputs of shape {input_shape}")
    _, height, width = input_shape
    shown = "x".join(str(d) for d in input_shape)
    if builder.startswith("vit_"):
        patch = int(builder.rsplit("_", 1)[1])  # vit_b_16: 16x16 pixel patches
        if height != width or height % patch:
            raise ModelError(f"model.name: {full_name!r} needs square inputs whose side is a multiple of its patch "
                             f"size {patch} (e.g. 3x{14 * patch}x{14 * patch}); the dataset gives {shown}")
        return {"image_size": height}
    if builder == "maxvit_t":
        # every stage's feature map (1/4 .. 1/32 of the input, each stride-2 stage rounding up) must split into
        # 7x7 windows
        if not all(math.ceil(side / 2**k) % 7 == 0 for side in (height, width) for k in range(2, 6)):
            raise ModelError(f"model.name: {full_name!r} needs inputs whose height and width split into 7x7 windows "
                             f"at every stage, e.g. 3x224x224 (a side of 221-224 pixels, or a multiple of 224); the "
                             f"dataset gives {shown}")
        return {"input_size": (height, width)}
    smallest = _smallest_input(builder)
    if height < smallest[0] or width < smallest[1]:
        raise ModelError(f"model.name: {full_name!r} needs inputs of at least {smallest[0]}x{smallest[1]} pixels "
                         f"(its strides and kernels); the dataset gives {shown}")
    return {}


def _smallest_input(builder: str) -> tuple[int, int]:
    """The smallest (height, width) the model takes: torchvision's ``min_size`` of its weights. Swin's is the
    resolution its weights were trained at (224 or 256); built untrained it pads its windows and takes any size."""
    if builder.startswith("swin_"):
        return (1, 1)
    return min(tuple(weights.meta["min_size"]) for weights in models.get_model_weights(builder))


def replace_first_conv_(model: nn.Module, in_channels: int) -> None:
    """Swap the model's first convolution (its stem, the first ``nn.Conv2d`` defined) for the same convolution
    reading ``in_channels`` channels (Kaiming init); nothing when it already reads that many."""
    parent, attribute, old = _first_conv(model)
    if old.in_channels == in_channels:
        return
    if old.groups != 1:
        raise ModelError(f"the first convolution of {type(model).__name__} is grouped (groups={old.groups}); "
                         f"it cannot be rebuilt for {in_channels} input channel(s)")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    setattr(parent, attribute, new)  # Sequential children are attributes named "0", "1", ... too


def _first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent module, attribute name, convolution) of the first ``nn.Conv2d`` in definition order: every
    torchvision classifier defines its stem first."""
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, attribute, child
    raise ModelError(f"{type(model).__name__} has no nn.Conv2d whose input channels could be adapted")


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__.split("+")[0]


# The names of before: registered aliases of torchvision:resnet18, :mobilenet_v2 and :mobilenet_v3_small.
ALIASES = {
    "torchvision_resnet18": "resnet18",
    "torchvision_mobilenet_v2": "mobilenet_v2",
    "torchvision_mobilenet_v3_small": "mobilenet_v3_small",
}


def _register_alias(alias: str, builder: str) -> None:
    def build(in_channels: int, num_classes: int, width_multiplier: float = 1.0) -> nn.Module:
        if builder not in WIDTH_MULTIPLIER_BUILDERS:
            require_unit_width(alias, width_multiplier)
        return build_torchvision(builder, in_channels=in_channels, num_classes=num_classes,
                                 width_multiplier=width_multiplier)

    build.__name__ = alias
    build.__doc__ = f"torchvision's {builder}: an alias of {PREFIX}{builder}."
    MODELS.register(alias, supports_width_multiplier=builder in WIDTH_MULTIPLIER_BUILDERS)(build)


for _alias, _builder in ALIASES.items():
    _register_alias(_alias, _builder)
