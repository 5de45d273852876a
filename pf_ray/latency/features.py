"""What a pruned candidate's latency is made of, as a linear model's features of its per-group kept counts.

For every conv/linear call l of the model (``LayerMacs``: which groups its input and output channels belong to):

- ``work``: its kept fraction of the unpruned MACs after rounding each group's kept count up to a multiple of
  ``block`` (x86 FP32 convolutions compute whole blocks of 8 or 16 channels: 9 channels cost what 16 do);

and, for each alignment ``a`` of ``aligns``, where a group keeps a count that is not a multiple of ``a`` (the
runtime leaves its blocked or vectorised kernel for a slower one, and converts layouts around it):

- ``misaligned``: per layer, 1 when one of its groups is so pruned; ``misaligned_work``: that times the layer's exact
  kept fraction of its MACs (the slower kernel's per-MAC cost);
- ``group_misaligned``: per group, 1 when it is so pruned; ``group_misaligned_activation``: that times kept / n
  (element-wise work on its activations done the slow way);

and per group, ``activation``: kept / n (element-wise work on its activations: ReLU, residual adds, INT8 quantize
and dequantize). Latency = base + features . weights, the weights fitted non-negative (NNLS). All numpy on plain
data: no model, thousands of candidates per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pf_ray.ops.channel_groups import LayerMacs


@dataclass(frozen=True)
class FeatureSet:
    """Which features a latency model uses, and the channel multiples they round to."""

    block: int = 1  # kept counts rounded up to a multiple of this for ``work``
    aligns: tuple[int, ...] = ()  # a count that is not a multiple of one of these is misaligned at that level
    activations: bool = True  # the per-group activation features

    def describe(self) -> str:
        aligns = ",".join(map(str, self.aligns)) or "none"
        return f"block {self.block}, aligns {aligns}, activations {'on' if self.activations else 'off'}"


@dataclass(frozen=True, eq=False)
class Layout:
    """The model's layers as arrays: per layer, how many channels of each group its input and output hold (a layer
    can hold several copies of a group, e.g. a linear after flattening; a depthwise conv's inputs do not count)."""

    sizes: np.ndarray  # (groups,) channels per group
    in_channels: np.ndarray  # (layers,) input channels per conv group (1 for a depthwise conv)
    out_channels: np.ndarray  # (layers,)
    in_members: np.ndarray  # (layers, groups)
    out_members: np.ndarray  # (layers, groups)

    @classmethod
    def of(cls, layers: Sequence[LayerMacs], sizes: Sequence[int]) -> Layout:
        in_members = np.zeros((len(layers), len(sizes)))
        out_members = np.zeros((len(layers), len(sizes)))
        for index, layer in enumerate(layers):
            if layer.groups == 1:  # grouped/depthwise: inputs per group do not change (see LayerMacs.macs)
                for group, channels in layer.in_members:
                    in_members[index, group] += channels
            for group, channels in layer.out_members:
                out_members[index, group] += channels
        return cls(np.asarray(sizes, float), np.array([layer.in_channels // layer.groups for layer in layers], float),
                   np.array([layer.out_channels for layer in layers], float), in_members, out_members)

    def names(self, features: FeatureSet) -> list[str]:
        """One name per column of ``design``, e.g. ``work[3]`` (layer 3), ``group_misaligned4[1]`` (group 1)."""
        layers, groups = range(len(self.in_channels)), range(len(self.sizes))
        names = ["base", *(f"work[{i}]" for i in layers)]
        for a in features.aligns:
            names += [f"misaligned{a}[{i}]" for i in layers] + [f"misaligned_work{a}[{i}]" for i in layers]
            names += [f"group_misaligned{a}[{g}]" for g in groups]
            names += [f"group_misaligned_activation{a}[{g}]" for g in groups]
        return names + ([f"activation[{g}]" for g in groups] if features.activations else [])

    def design(self, kept: np.ndarray | Sequence[Sequence[int]], features: FeatureSet) -> np.ndarray:
        """(candidates, columns): the features of each row of ``kept`` (candidates, groups); column 0 is 1."""
        kept = np.atleast_2d(np.asarray(kept, float))
        if kept.shape[1] != len(self.sizes):
            raise ValueError(f"kept: got {kept.shape[1]} counts per candidate; expected {len(self.sizes)}")
        fraction = kept / self.sizes
        exact = self._work(kept)
        rounded = np.minimum(np.ceil(kept / features.block) * features.block, self.sizes)
        columns = [np.ones((len(kept), 1)), self._work(rounded) if features.block > 1 else exact]
        touched = ((self.in_members + self.out_members) > 0).T.astype(float)  # (groups, layers)
        for a in features.aligns:
            off = ((kept < self.sizes) & (np.mod(kept, a) != 0)).astype(float)  # (candidates, groups)
            misaligned = (off @ touched > 0).astype(float)  # (candidates, layers)
            columns += [misaligned, misaligned * exact, off, off * fraction]
        if features.activations:
            columns.append(fraction)
        return np.concatenate(columns, axis=1)

    def _work(self, kept: np.ndarray) -> np.ndarray:
        """(candidates, layers): each layer's kept fraction of its MACs with ``kept`` channels per group."""
        removed = 1.0 - kept / self.sizes
        inputs = 1.0 - (removed @ self.in_members.T) / self.in_channels
        outputs = 1.0 - (removed @ self.out_members.T) / self.out_channels
        return inputs * outputs
