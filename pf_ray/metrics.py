"""MACs, parameters and size of a model, and the per-layer table (the DDPG agent's state, He et al. AMC 2018).

One definition, used everywhere in pf-ray:

- **MACs** are the multiply-accumulates of ``nn.Conv2d`` and ``nn.Linear`` layers for one image:
  a convolution does ``out_h * out_w * out_channels * (in_channels / groups) * k_h * k_w``, a linear layer
  ``in_features * out_features`` (times any extra leading dimensions of its input, e.g. tokens).
  Biases, batch norm, activations, pooling and residual additions are not counted. A layer called twice in one
  forward counts (and appears in the table) twice.
- **Params** are all parameters of the model (``numel``), counted once even when shared.
- **Size** is ``4 * (parameters + buffers)`` bytes: the model stored in FP32 (BN statistics included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pf_ray.errors import ModelError
from pf_ray.hooks import forward_hooks

# Metric keys: the same strings in trial results, results.json, reports and searchers.
EPOCH = "epoch"  # fine-tuning epochs done (ASHA's time attribute)
ACCURACY = "accuracy"  # validation top-1 during search and retraining, as a fraction in [0, 1]
LOSS = "loss"  # mean training loss over the epoch
TRAIN_ACCURACY = "train_accuracy"
SECONDS = "epoch_seconds"
SCORE = "score"  # what searchers and ASHA maximise (search.reward applied to the search.scoring accuracy)
PROXY_ACCURACY = "proxy_accuracy"  # validation accuracy right after compression, before any fine-tuning
MACS = "macs"
PARAMS = "params"
MACS_RATIO = "macs_ratio"  # candidate MACs / baseline MACs
LAYER_VALUES = "layer_values"  # the projected per-layer vector the learner used (e.g. keep ratios)
REMOVED_BLOCKS = "removed_blocks"  # residual blocks the candidate's model has removed (depth pruning), by name
FP32_LAYERS = "fp32_layers"  # layers its INT8 exports keep in FP32 (channel pruning's precision search), by name
INT8_ACCURACY = "int8_accuracy"  # validation accuracy of its INT8 artifact on the target (a precision search's)
LATENCY_MS = "latency_ms"  # latency on the deployment target, on the trial's node (search.reward: latency)
LATENCY_RATIO = "latency_ratio"  # candidate latency / the latency it should have (export.latency.reward_latency)
TARGET_MS = "target_ms"  # the candidate measured whole on the deployment target after the search (results.json)
TARGET_SPEEDUP = "target_speedup"  # the search a trial belongs to: its target speed-up (None: a MACs budget)
PREDICTED_MS = "predicted_ms"  # the latency table's prediction of it (search.budget: latency)
# What a trial's record (results.json, the report) keeps of its last result; the latency two with that reward only.
TRIAL_METRICS = (SCORE, ACCURACY, PROXY_ACCURACY, EPOCH, MACS_RATIO, MACS, PARAMS, LAYER_VALUES, REMOVED_BLOCKS,
                 FP32_LAYERS, INT8_ACCURACY, LATENCY_MS, LATENCY_RATIO)

CONV = "conv"
DEPTHWISE_CONV = "depthwise_conv"
LINEAR = "linear"


@dataclass(frozen=True)
class LayerInfo:
    name: str  # the module's qualified name, e.g. "layer1.0.conv1"
    kind: str  # CONV, DEPTHWISE_CONV (groups == in_channels > 1) or LINEAR
    in_channels: int  # in_features for linear layers
    out_channels: int  # out_features for linear layers
    kernel_size: tuple[int, int]  # (1, 1) for linear
    stride: tuple[int, int]  # (1, 1) for linear
    groups: int  # 1 for linear
    output_size: tuple[int, int]  # (height, width) of the output feature map; (1, 1) for linear
    macs: int  # per image
    params: int  # this layer's weight + bias


@dataclass(frozen=True)
class ModelStats:
    macs: int  # per image, Conv2d + Linear only (see the module docstring)
    params: int
    size_bytes: int  # FP32 bytes of parameters + buffers


def layer_table(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerInfo]:
    """The Conv2d and Linear layers in the order they run, from one batch-1 forward pass.

    Args:
        model: left in the train/eval mode it came in (the pass itself runs in eval mode, without gradients).
        input_shape: (channels, height, width) of one image.
    """
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ModelError(f"input_shape: got {input_shape!r}; expected (channels, height, width) of positive ints")
    names = {module: name for name, module in model.named_modules()}
    rows: list[LayerInfo] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        rows.append(_describe(names[module], module, output))

    hooks = {m: record for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    reference = next(model.parameters(), None)
    example = torch.zeros(
        (1, *input_shape),
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None and reference.is_floating_point() else torch.float32,
    )
    try:
        with forward_hooks(model, hooks, training=False), torch.no_grad():
            model(example)
    except Exception as error:
        raise ModelError(
            f"model forward failed on an input of shape {tuple(example.shape)}: {type(error).__name__}: {error}"
        ) from error
    return rows


def quantized_layers(model: nn.Module, input_shape: tuple[int, int, int] | None = None, *,
                     first_last: bool = False) -> list[str]:
    """The conv/linear layers a quantizing learner covers, each once: in forward order (``input_shape`` given,
    from ``layer_table``) or in definition order; without ``first_last`` the first and the last of them are left
    out (PocketFlow keeps those in float)."""
    if input_shape is not None:
        names = list(dict.fromkeys(row.name for row in layer_table(model, input_shape)))
    else:
        names = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    return names if first_last else names[1:-1]


def model_stats(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelStats:
    """Total MACs per image, parameter count and FP32 size of ``model`` (definitions in the module docstring)."""
    macs = sum(row.macs for row in layer_table(model, input_shape))
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    return ModelStats(macs=macs, params=params, size_bytes=4 * (params + buffers))


def _describe(name: str, module: nn.Module, output: torch.Tensor) -> LayerInfo:
    params = sum(p.numel() for p in module.parameters(recurse=False))
    if isinstance(module, nn.Linear):
        # output: (1, ..., out_features); every leading position repeats the matrix product
        positions = output.numel() // module.out_features
        return LayerInfo(
            name=name,
            kind=LINEAR,
            in_channels=module.in_features,
            out_channels=module.out_features,
            kernel_size=(1, 1),
            stride=(1, 1),
            groups=1,
            output_size=(1, 1),
            macs=positions * module.in_features * module.out_features,
            params=params,
        )
    assert isinstance(module, nn.Conv2d)
    out_h, out_w = output.shape[-2:]  # output: (1, out_channels, out_h, out_w)
    k_h, k_w = module.kernel_size
    depthwise = module.groups > 1 and module.groups == module.in_channels
    macs = out_h * out_w * module.out_channels * (module.in_channels // module.groups) * k_h * k_w
    return LayerInfo(
        name=name,
        kind=DEPTHWISE_CONV if depthwise else CONV,
        in_channels=module.in_channels,
        out_channels=module.out_channels,
        kernel_size=(k_h, k_w),
        stride=tuple(module.stride),
        groups=module.groups,
        output_size=(int(out_h), int(out_w)),
        macs=int(macs),
        params=params,
    )


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None for a missing, non-numeric, NaN or infinite one (what a failed or
    diverged trial reports): the one rule by which searchers, the best-trial choice and the report read scores."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
