"""``LatencyTable``: a model's latency on one target as a function of channel pruning's per-group kept counts.

Plain data (numbers, tuples, the ``MacsTable``'s layer records; no torch module), so searchers carry it to the Ray
driver and it round-trips through JSON (the cache). ``predict`` composes the fitted per-layer and per-group terms
(``pf_ray.latency.features``) in microseconds; ``predict_many`` does thousands of candidates in one numpy call.
A table built with depth (``TablePlan.depth``, on a model with removable residual blocks) also predicts candidates
that remove blocks (``predict(kept, removed=...)``); one without predicts as it always did. The measurements it
was fitted on, the held-out candidates it never saw (measured and predicted) and its errors on them travel with
it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pf_ray.errors import ConfigError
from pf_ray.latency.features import FeatureSet, Layout
from pf_ray.ops.channel_groups import LayerMacs
from pf_ray.ops.pruning import kept_channel_count


@dataclass(frozen=True)
class Measured:
    """One measured candidate: its kept count per group, its median latency (ms, normalised to the unpruned
    model measured in the same batch) and why it was measured: "full", "sweep" (one group changed), "dense"
    (one group at every count of a window, for the step), "block" (one block removed, or all: depth tables),
    "random" (training) or "holdout"."""

    kept: tuple[int, ...]
    ms: float
    kind: str
    predicted: float | None = None  # holdout only: the fitted table's prediction
    removed: tuple[str, ...] = ()  # the residual blocks removed (depth tables), in forward order
    fp32: tuple[str, ...] = ()  # the layers run in FP32 (precision tables), in ``precision_layers``' order


@dataclass(frozen=True, eq=False)
class LatencyTable:
    names: tuple[str, ...]  # prunable groups, in the MacsTable's order
    sizes: tuple[int, ...]  # channels per group, unpruned
    layers: tuple[LayerMacs, ...]  # the MacsTable's conv/linear calls
    features: FeatureSet
    weights: tuple[float, ...]  # one per column of Layout.design (column 0: the base, ms)
    step: int  # the channel multiple at which latency steps on this target: what round_to "auto" uses
    step_evidence: dict[str, Any]  # how ``step`` was decided (see pf_ray.latency.steps)
    full_ms: float  # the unpruned model on the target, measured
    reference_ms: float  # the unpruned model in FP32 ONNX Runtime (target's threads and batch), side by side
    target: dict[str, Any]  # runtime, precision, threads, batch_size
    environment: dict[str, Any]  # CPU model name and kernel flags, runtime and torch versions
    training: tuple[Measured, ...]  # every measurement the fit saw
    holdout: tuple[Measured, ...]  # random candidates the fit never saw, with their predictions
    median_error: float  # relative, on the holdout
    max_error: float
    cross_validation: tuple[dict[str, Any], ...] = ()  # the feature sets tried: CV errors, best first
    build_seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    blocks: tuple[str, ...] = ()  # removable residual blocks measured removed (depth tables), in forward order
    # layers (module names) measured in FP32 inside the INT8 model (precision tables), in forward order
    precision_layers: tuple[str, ...] = ()

    # ---- prediction

    @functools.cached_property
    def layout(self) -> Layout:
        return Layout.of(self.layers, self.sizes, self.blocks, precision=bool(self.precision_layers))

    @functools.cached_property
    def _weights(self) -> np.ndarray:
        return np.asarray(self.weights, float)

    def predict(self, kept: Sequence[int], removed: Collection[str] = (), fp32: Collection[str] = ()) -> float:
        """Milliseconds for a batch of ``target.batch_size`` on the target, with ``kept[i]`` channels in group i,
        the residual blocks ``removed`` (names of ``blocks``) removed and the layers ``fp32`` (names of
        ``precision_layers``) in FP32; the counts of groups that live only in removed blocks do not matter, nor
        does the precision of a layer inside one."""
        self._check(kept)
        mask = self._mask([removed]) if self.blocks or removed else None
        floats = self._fp32_mask([fp32]) if self.precision_layers or fp32 else None
        return float(self.layout.design(np.asarray(kept, float)[None, :], self.features, mask, floats)[0]
                     @ self._weights)

    def predict_many(self, kept: np.ndarray | Sequence[Sequence[int]],
                     removed: np.ndarray | Sequence[Collection[str]] | None = None,
                     fp32: Sequence[Collection[str]] | None = None) -> np.ndarray:
        """``predict`` for every row of a (candidates, groups) array, in one call; ``removed``: per candidate the
        names of its removed blocks, or a (candidates, blocks) 0/1 array in ``blocks``' order; ``fp32``: per
        candidate the names of its FP32 layers."""
        kept = np.atleast_2d(np.asarray(kept, float))
        mask = None
        if removed is not None:
            mask = np.asarray(removed, float) if isinstance(removed, np.ndarray) else self._mask(removed)
        floats = self._fp32_mask(fp32) if fp32 is not None else None
        return self.layout.design(kept, self.features, mask, floats) @ self._weights

    def predict_ratios(self, keep_ratios: Sequence[float], round_to: int, removed: Collection[str] = ()) -> float:
        """``predict`` of the counts ``prune_channels_(..., keep_ratios, round_to=round_to)`` keeps."""
        if len(keep_ratios) != len(self.sizes):
            raise ConfigError(f"keep_ratios: got {len(keep_ratios)} values; expected {len(self.sizes)}")
        return self.predict([kept_channel_count(n, r, round_to) for n, r in zip(self.sizes, keep_ratios,
                                                                                  strict=True)], removed)

    def rounding_step(self, largest: int = 16, tolerance: float = 0.01) -> int:
        """The channel multiple a search should round to (``round_to: auto``): of ``step`` and its multiples up to
        ``largest``, the one whose grid reaches the lowest predicted latency (every group at one keep ratio, 5% to
        100%); within ``tolerance`` of it, the finest. ``step`` alone comes from three noisy sweeps (ResNet-20 INT8
        gave 4 in one table and 16 in another); this asks the fitted table, which pools every measurement, what each
        grid can reach (with step 4 there, 2.06x at best; on 16's grid, 2.48x)."""
        ratios = np.linspace(0.05, 1.0, 20)
        fastest = {}
        for multiple in range(self.step, max(largest, self.step) + 1, self.step):
            rows = np.array([[kept_channel_count(n, r, multiple) for n in self.sizes] for r in ratios], float)
            fastest[multiple] = float(self.predict_many(rows).min())
        best = min(fastest.values())
        return min(m for m, ms in fastest.items() if ms <= best * (1 + tolerance))

    def speedup(self, kept: Sequence[int], removed: Collection[str] = (), fp32: Collection[str] = ()) -> float:
        """The reference (unpruned, FP32 ONNX Runtime) latency over the predicted latency of the candidate."""
        return self.reference_ms / self.predict(kept, removed, fp32)

    def _fp32_mask(self, fp32: Sequence[Collection[str]]) -> np.ndarray:
        """(candidates, layers of ``layers``): 1 where a candidate runs the layer in FP32 (every call of a layer
        called more than once)."""
        known = set(self.precision_layers)
        mask = np.zeros((len(fp32), len(self.layers)))
        for row, names in enumerate(fp32):
            if isinstance(names, str):
                raise ConfigError(f"fp32: got the string {names!r}; expected a collection of layer names")
            unknown = sorted(set(names) - known)
            if unknown:
                shown = ", ".join(self.precision_layers[:6]) + (", ..." if len(self.precision_layers) > 6 else "")
                raise ConfigError(f"fp32 layer {unknown[0]!r}: not a layer this latency table measured in FP32; "
                                  f"its layers: {shown or 'none (a table built without precision)'}")
            mask[row] = [layer.name in names for layer in self.layers]
        return mask

    def _mask(self, removed: Sequence[Collection[str]]) -> np.ndarray:
        """(candidates, blocks): 1 where a candidate removes the block."""
        index = {name: b for b, name in enumerate(self.blocks)}
        mask = np.zeros((len(removed), len(self.blocks)))
        for row, names in enumerate(removed):
            if isinstance(names, str):
                raise ConfigError(f"removed: got the string {names!r}; expected a collection of block names")
            for name in names:
                if name not in index:
                    shown = ", ".join(self.blocks[:6]) + (", ..." if len(self.blocks) > 6 else "")
                    raise ConfigError(f"removed block {name!r}: not a block this latency table measured removed; "
                                      f"its blocks: {shown or 'none (a table built without depth)'}")
                mask[row, index[name]] = 1.0
        return mask

    def _check(self, kept: Sequence[int]) -> None:
        if len(kept) != len(self.sizes):
            raise ConfigError(f"kept: got {len(kept)} counts; expected {len(self.sizes)}, one per group "
                              f"({', '.join(self.names[:3])}{', ...' if len(self.names) > 3 else ''})")
        for index, (count, size) in enumerate(zip(kept, self.sizes, strict=True)):
            if not 1 <= count <= size:
                raise ConfigError(f"kept[{index}] ({self.names[index]}): got {count}; allowed range is [1, {size}]")

    # ---- JSON (the cache)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["layers"] = [asdict(layer) for layer in self.layers]
        data["features"] = asdict(self.features)
        data["training"] = [asdict(m) for m in self.training]
        data["holdout"] = [asdict(m) for m in self.holdout]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        data = dict(data)
        data["names"], data["sizes"] = tuple(data["names"]), tuple(data["sizes"])
        data["weights"] = tuple(float(w) for w in data["weights"])
        data["layers"] = tuple(LayerMacs(**{**layer, "in_members": [tuple(m) for m in layer["in_members"]],
                                            "out_members": [tuple(m) for m in layer["out_members"]]})
                               for layer in data["layers"])
        data["features"] = FeatureSet(**{**data["features"], "aligns": tuple(data["features"]["aligns"])})
        for kind in ("training", "holdout"):
            data[kind] = tuple(Measured(**{**m, "kept": tuple(m["kept"]), "removed": tuple(m.get("removed", ())),
                                           "fp32": tuple(m.get("fp32", ()))})
                               for m in data[kind])
        data["cross_validation"] = tuple(data.get("cross_validation", ()))
        data["blocks"] = tuple(data.get("blocks", ()))
        data["precision_layers"] = tuple(data.get("precision_layers", ()))
        table = cls(**data)
        expected = len(table.layout.names(table.features))
        if len(table.weights) != expected or not all(math.isfinite(w) for w in table.weights):
            raise ValueError(f"a latency table with {len(table.weights)} weights; its features need {expected}")
        return table

    def summary(self) -> str:
        where = " ".join(str(self.target[key]) for key in ("runtime", "precision") if key in self.target)
        return (f"{where or 'target'}: unpruned {self.full_ms:.3f} ms "
                f"(FP32 ONNX Runtime {self.reference_ms:.3f} ms); {len(self.training)} + {len(self.holdout)} "
                f"measurements; held-out error median {100 * self.median_error:.1f}%, largest "
                f"{100 * self.max_error:.1f}%; step {self.step}; {self.features.describe()}"
                + (f"; {len(self.blocks)} removable blocks" if self.blocks else "")
                + (f"; {len(self.precision_layers)} layers measured in FP32" if self.precision_layers else ""))
