"""Channel pruning's budget in measured latency: a candidate's latency on the deployment target, predicted from
its per-group kept channel counts (and removed blocks, and layers left in FP32 on an INT8 target) by a latency table
measured on this machine (``pf_ray.latency``), at most the reference latency divided by ``search.target_speedup``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from pf_ray.errors import ConfigError
from pf_ray.ops.depth_space import join_values, project_with_blocks, split_values
from pf_ray.ops.precision_space import project_with_precision, split_tail
from pf_ray.ops.projection import Unreachable, project_keep_ratios
from pf_ray.ops.pruning import kept_channel_count, with_whole_groups


class LatencyPredictor(Protocol):
    """Predicted milliseconds on a deployment target from the kept channels of each prunable group and the
    residual blocks removed (a table built with depth, ``pf_ray.latency.LatencyTable``; others are asked with none
    removed)."""

    sizes: tuple[int, ...]  # channels per group, in the order of ``ops.macs_budget.macs_table(model).names``

    def predict(self, kept: Sequence[int], removed: Collection[str] = (), fp32: Collection[str] = ()) -> float:
        """``fp32``: layers left in FP32 in an INT8 model (a table built with precision; others are asked with
        none)."""


@dataclass(frozen=True)
class WholeGroups:
    """``predictor`` with some groups always kept whole (channel pruning's excluded groups): asked with a kept
    count per other group, it predicts with the full count filled in for each excluded one."""

    predictor: LatencyPredictor
    excluded: tuple[int, ...]  # positions in ``predictor.sizes`` of the groups kept whole

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(n for i, n in enumerate(self.predictor.sizes) if i not in self.excluded)

    def __getattr__(self, name: str) -> object:  # blocks, precision_layers...: the table's own
        if name in ("predictor", "excluded"):
            raise AttributeError(name)
        return getattr(self.predictor, name)

    def predict(self, kept: Sequence[int], removed: Collection[str] = (), fp32: Collection[str] = ()) -> float:
        counts = iter(kept)
        full = [n if i in self.excluded else next(counts) for i, n in enumerate(self.predictor.sizes)]
        return self.predictor.predict(full, removed, fp32) if fp32 else self.predictor.predict(full, removed)


@dataclass(frozen=True)
class TargetLatency:
    """What a latency budget is measured against on this machine: the deployment target's latency table, and the
    reference (the unpruned model in FP32 ONNX Runtime, same threads and batch size)."""

    predictor: LatencyPredictor
    reference_ms: float
    name: str  # the target, for messages: "onnxruntime int8, 1 thread, batch 1"
    step: int = 1  # the channel multiple where latency steps on the target (channel pruning's round_to "auto")


class LatencySource(Protocol):
    """How a learner gets the target's latency: asked only when it budgets latency (building a table takes minutes;
    a learner that refuses the budget, or has nothing to search, never asks). ``depth``: a table that also
    predicts removed residual blocks (``pf_ray.latency.TablePlan.depth``); ``precision``: one that also predicts
    layers left in FP32 (``TablePlan.precision``; INT8 targets only)."""

    def __call__(self, *, depth: bool = False, precision: bool = False) -> TargetLatency: ...


@dataclass(frozen=True)
class LatencyBudget:
    """The predicted latency of a keep-ratio vector as a fraction of ``reference_ms`` (the unpruned model in FP32
    ONNX Runtime, the speed-up's denominator); the allowed fraction is ``1 / target_speedup``. Plain data: the
    predictor is a table, not a model, so searchers carry it to the Ray driver."""

    target: float  # 1 / search.target_speedup
    predictor: LatencyPredictor
    reference_ms: float
    round_to: int
    min_ratio: float  # no group's keep ratio below this (the search box's bottom)
    target_name: str = "the target"  # named in errors, e.g. "onnxruntime int8, 1 thread, batch 1"
    # depth: the removable residual blocks, in forward order (a vector's last values, ``ops.depth_space``); the
    # predictor must be a table built with depth
    blocks: tuple[str, ...] = ()
    # precision (INT8 targets): the layers that may stay FP32, one value each after the blocks'
    # (``ops.precision_space``); the predictor must be a table built with precision
    layers: tuple[str, ...] = ()

    def kept(self, values: Sequence[float]) -> list[int]:
        ratios = split_values(self._head(values), self.blocks, self.min_ratio)[0]  # blocks' values are not counts
        return [kept_channel_count(n, r, self.round_to) for n, r in zip(self.predictor.sizes, ratios, strict=True)]

    def counts(self, values: Sequence[float]) -> list[int]:
        """``kept`` for every group of the model's ``macs_table``, those a ``WholeGroups`` predictor keeps whole
        included."""
        if not isinstance(self.predictor, WholeGroups):
            return self.kept(values)
        sizes = self.predictor.predictor.sizes
        return with_whole_groups(self.kept(values), [(i, sizes[i]) for i in self.predictor.excluded])

    def removed(self, values: Sequence[float]) -> tuple[str, ...]:
        """The residual blocks a vector removes (none without ``blocks``)."""
        return split_values(self._head(values), self.blocks, self.min_ratio)[1]

    def fp32(self, values: Sequence[float]) -> tuple[str, ...]:
        """The layers a vector leaves in FP32 (none without ``layers``)."""
        return split_tail(values, self._width, self.layers, self.min_ratio)[1]

    @property
    def _width(self) -> int:
        """Values before the precision values: the groups' keep ratios and the blocks' values."""
        return len(self.predictor.sizes) + len(self.blocks)

    def _head(self, values: Sequence[float]) -> tuple[float, ...]:
        return split_tail(values, self._width, self.layers, self.min_ratio)[0]

    def predicted_ms(self, values: Sequence[float]) -> float:
        return self._predict(self.kept(values), self.removed(values), self.fp32(values))

    def _predict(self, kept: Sequence[int], removed: Collection[str], fp32: Collection[str]) -> float:
        # a predictor of a table without precision may not take ``fp32``: asked only when there are FP32 layers
        return self.predictor.predict(kept, removed, fp32) if fp32 else self.predictor.predict(kept, removed)

    def cost(self, values: Sequence[float]) -> float:
        return self.predicted_ms(values) / self.reference_ms

    def project(self, values: Sequence[float]) -> tuple[float, ...]:
        """The proposal scaled (its shape kept) to the largest keep ratios whose predicted latency meets the
        target speed-up, then topped up (``ops.projection``); with ``blocks``, at the latency of its removed blocks,
        removing more where the target needs it (``ops.depth_space.project_with_blocks``)."""

        def head(values: Sequence[float], fp32: tuple[str, ...]) -> tuple[float, ...]:
            def width(ratios: Sequence[float], removed: tuple[str, ...]) -> tuple[float, ...]:
                return project_keep_ratios(self.predictor.sizes, ratios,
                                           lambda kept: self._predict(kept, removed, fp32),
                                           self.target * self.reference_ms, round_to=self.round_to,
                                           min_ratio=self.min_ratio)

            if self.blocks:
                if fp32:  # the proposal's blocks only: quantizing FP32 layers back comes before removing more
                    ratios, removed = split_values(values, self.blocks, self.min_ratio)
                    return join_values(width(ratios, removed), self.blocks, removed, self.min_ratio)
                return project_with_blocks(values, self.blocks, self.min_ratio, width)
            return width(values, ())

        try:
            if self.layers:
                return project_with_precision(values, self._width, self.layers, self.min_ratio, head)
            return head(values, ())
        except Unreachable as error:
            blocks = f" and all {len(self.blocks)} removable blocks removed" if self.blocks else ""
            raise ConfigError(
                f"search.target_speedup: got {1 / self.target:g}; the fastest reachable on {self.target_name} by "
                f"pruning channels (every group at keep ratio {self.min_ratio:g}, round_to={self.round_to}{blocks}) is "
                f"{self.reference_ms / error.smallest:.2f}x, as the latency table predicts"
            ) from None
