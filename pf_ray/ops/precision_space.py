"""Precision as a searched dimension of channel pruning on an INT8 target: after the groups' keep ratios (and the
blocks' values, ``ops.depth_space``), one value per conv/linear layer, in the same box [min_keep_ratio, 1]; a layer
whose value is below the box's middle stays in FP32 in the exported INT8 model (ONNX Runtime's excluded nodes,
XNNPACK's per-module quantizer config). Projected vectors say it plainly: ``min_keep_ratio`` for an FP32 layer, 1
for an INT8 one. High values are INT8, as high keep ratios keep channels: the uniform start (every value 1) is the
all-INT8 model.

Projection onto a latency budget keeps the proposal's FP32 layers and projects the rest at a latency that counts
them; when even that is out of reach, it quantizes the FP32 layers back one by one (the one nearest the threshold
first) before it removes any block the proposal did not remove.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from pf_ray.config import Budget, Scoring, SearchConfig
from pf_ray.errors import ConfigError
from pf_ray.ops.projection import Unreachable
from pf_ray.search_space import layer_features

FP32_PREFIX = "fp32:"  # a precision dimension's name in the space (and the report): "fp32:layer1.0.conv1"
INT8 = 1.0  # an INT8 layer's projected value; an FP32 layer's is the box's bottom (min_keep_ratio)


def dimension_names(layers: Sequence[str]) -> tuple[str, ...]:
    return tuple(FP32_PREFIX + name for name in layers)


def check_precision_search(search: SearchConfig) -> None:
    """A precision search needs a latency budget (an FP32 layer costs no MACs; it costs time) and fine-tuned
    trials (the proxy accuracy is the FP32 model's)."""
    if search.budget is not Budget.LATENCY:
        raise ConfigError(f"learner.options.mixed_precision: true needs search.budget latency (an FP32 layer's cost "
                          f"is measured latency, not MACs); got search.budget {search.budget}")
    if search.scoring is Scoring.PROXY:
        raise ConfigError("learner.options.mixed_precision: true needs search.scoring fine_tune (trials are scored on "
                          "their INT8 artifact's accuracy); got proxy")


def precision_features(model: nn.Module, input_shape: tuple[int, int, int], layers: Sequence[str], *,
                       start: int) -> tuple[tuple[float, ...], ...]:
    """A row of ``search_space.LAYER_FEATURES`` per precision dimension (DDPG's state): its layer's, indexed from
    ``start`` (after the groups' and blocks' rows)."""
    rows = layer_features(model, input_shape, layers)
    return tuple((float(start + index), *row[1:]) for index, row in enumerate(rows))


def is_fp32(value: float, low: float) -> bool:
    """A layer's value below the middle of the box [low, 1] keeps it in FP32."""
    return value < (low + INT8) / 2


def split_tail(values: Sequence[float], head: int, layers: Sequence[str],
               low: float) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """(the vector's first ``head`` values, the FP32 layers its tail names). A vector without the tail (a start
    built before precision was searched) is all INT8."""
    tail = values[head:]
    if tail and len(tail) != len(layers):
        raise ValueError(f"a vector of {len(values)} values: {head} before the precision values, then "
                         f"{len(tail)}; expected {len(layers)} (one per layer)")
    return (tuple(float(v) for v in values[:head]),
            tuple(name for name, value in zip(layers, tail, strict=False) if is_fp32(value, low)))


def join_tail(head: Sequence[float], layers: Sequence[str], fp32: Sequence[str], low: float) -> tuple[float, ...]:
    """``split_tail``'s inverse: the head, then ``low`` for each FP32 layer and 1 for each INT8 one."""
    floats = set(fp32)
    return (*(float(v) for v in head), *(low if name in floats else INT8 for name in layers))


# the vector's head, the FP32 layers -> the projected head (raises Unreachable)
ProjectHead = Callable[[Sequence[float], tuple[str, ...]], tuple[float, ...]]


def project_with_precision(values: Sequence[float], head: int, layers: Sequence[str], low: float,
                           project_head: ProjectHead) -> tuple[float, ...]:
    """The proposal's FP32 layers kept and its head projected at a latency that counts them; if that is out of
    reach, FP32 layers quantized back, the highest value (nearest the threshold) first, until it is not.

    Raises:
        Unreachable: even with every layer INT8.
    """
    start, fp32 = split_tail(values, head, layers, low)
    tail = dict(zip(layers, values[head:], strict=False))
    order = sorted(fp32, key=lambda name: -tail[name])
    while True:
        try:
            return join_tail(project_head(start, fp32), layers, fp32, low)
        except Unreachable:
            if not order:
                raise
            gone = order.pop(0)
            fp32 = tuple(name for name in fp32 if name != gone)
