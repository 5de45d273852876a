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

Depth (a layout with removable residual blocks, ``pf_ray.ops.blocks``): a candidate also says which blocks it
removes. A removed block's layers are gone (their ``work`` and misalignment columns are 0), so are the groups that
lived only in them (their group columns are 0: their kept counts do not matter), and per block more columns say
what the block costs while it is there: ``block``, 1 (its operators' fixed overhead: kernel launches, the add,
INT8 quantize / dequantize nodes), ``block_activation``, the kept fraction of its trunk's channels (the add and
activation on the trunk's width), and for each alignment ``a``, ``block_misaligned``: 1 when its trunk's count is
not a multiple of ``a`` (layouts converted around each block's add; on ResNet-20 in ONNX Runtime INT8 these took
the held-out median error from 2.5% to 2.2%). A layout without blocks has none of them, and designs exactly as
before.

Precision (a layout with ``precision``, for INT8 targets where some layers may stay in FP32): a candidate also says
which layers run in FP32. A layer's ``work`` column then counts only while it is INT8, and two more columns per
layer count it while it is FP32: ``fp32_work``, its exact kept fraction of its MACs (FP32 arithmetic's per-MAC cost),
and ``fp32``, 1 (the quantize / dequantize nodes around a float layer in an INT8 graph, and its float kernel's fixed
cost). A layout without precision has none of them.
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
    can hold several copies of a group, e.g. a linear after flattening; a depthwise conv's inputs do not count);
    and, with removable blocks, which block holds each layer and each block's trunk groups."""

    sizes: np.ndarray  # (groups,) channels per group
    in_channels: np.ndarray  # (layers,) input channels per conv group (1 for a depthwise conv)
    out_channels: np.ndarray  # (layers,)
    in_members: np.ndarray  # (layers, groups)
    out_members: np.ndarray  # (layers, groups)
    layer_block: np.ndarray | None = None  # (layers,) index of the removable block holding the layer, -1 if none
    block_trunk: np.ndarray | None = None  # (blocks, groups): 1/k for each of a block's k trunk groups
    precision: bool = False  # the layers may run in FP32 (per-layer columns ``fp32`` and ``fp32_work``)

    @classmethod
    def of(cls, layers: Sequence[LayerMacs], sizes: Sequence[int], blocks: Sequence[str] = (), *,
           precision: bool = False) -> Layout:
        in_members = np.zeros((len(layers), len(sizes)))
        out_members = np.zeros((len(layers), len(sizes)))
        for index, layer in enumerate(layers):
            if layer.groups == 1:  # grouped/depthwise: inputs per group do not change (see LayerMacs.macs)
                for group, channels in layer.in_members:
                    in_members[index, group] += channels
            for group, channels in layer.out_members:
                out_members[index, group] += channels
        layer_block = block_trunk = None
        if blocks:
            layer_block = np.array([next((b for b, name in enumerate(blocks) if layer.name.startswith(f"{name}.")),
                                         -1) for layer in layers])
            touched = (in_members + out_members) > 0  # (layers, groups)
            block_trunk = np.zeros((len(blocks), len(sizes)))
            for b in range(len(blocks)):
                # a trunk group: touched by the block's layers and by layers outside it (the residual stream)
                trunk = touched[layer_block == b].any(0) & touched[layer_block != b].any(0)
                if trunk.any():
                    block_trunk[b, trunk] = 1.0 / trunk.sum()
        return cls(np.asarray(sizes, float), np.array([layer.in_channels // layer.groups for layer in layers], float),
                   np.array([layer.out_channels for layer in layers], float), in_members, out_members,
                   layer_block, block_trunk, precision)

    @property
    def num_blocks(self) -> int:
        return 0 if self.block_trunk is None else len(self.block_trunk)

    def names(self, features: FeatureSet) -> list[str]:
        """One name per column of ``design``, e.g. ``work[3]`` (layer 3), ``group_misaligned4[1]`` (group 1)."""
        layers, groups = range(len(self.in_channels)), range(len(self.sizes))
        names = ["base", *(f"work[{i}]" for i in layers)]
        for a in features.aligns:
            names += [f"misaligned{a}[{i}]" for i in layers] + [f"misaligned_work{a}[{i}]" for i in layers]
            names += [f"group_misaligned{a}[{g}]" for g in groups]
            names += [f"group_misaligned_activation{a}[{g}]" for g in groups]
        names += [f"activation[{g}]" for g in groups] if features.activations else []
        blocks = range(self.num_blocks)
        names += [f"block[{b}]" for b in blocks] + [f"block_activation[{b}]" for b in blocks]
        names += [f"block_misaligned{a}[{b}]" for a in features.aligns for b in blocks]
        if self.precision:
            names += [f"fp32[{i}]" for i in layers] + [f"fp32_work[{i}]" for i in layers]
        return names

    def design(self, kept: np.ndarray | Sequence[Sequence[int]], features: FeatureSet,
               removed: np.ndarray | None = None, fp32: np.ndarray | None = None) -> np.ndarray:
        """(candidates, columns): the features of each row of ``kept`` (candidates, groups), with the blocks that
        ``removed`` (candidates, blocks; 1 = removed) marks removed (none if None) and the layers that ``fp32``
        (candidates, layers; 1 = FP32) marks in FP32 (none if None; a layout with ``precision`` only); column 0
        is 1."""
        kept = np.atleast_2d(np.asarray(kept, float))
        if kept.shape[1] != len(self.sizes):
            raise ValueError(f"kept: got {kept.shape[1]} counts per candidate; expected {len(self.sizes)}")
        present, group_present, block_present = self._presence(len(kept), removed)
        float_layers = self._float_layers(len(kept), fp32) * present
        fraction = kept / self.sizes
        exact = self._work(kept) * present
        rounded = np.minimum(np.ceil(kept / features.block) * features.block, self.sizes)
        work = self._work(rounded) * present if features.block > 1 else exact
        columns = [np.ones((len(kept), 1)), work * (1.0 - float_layers)]
        touched = ((self.in_members + self.out_members) > 0).T.astype(float)  # (groups, layers)
        for a in features.aligns:
            off = ((kept < self.sizes) & (np.mod(kept, a) != 0)) * group_present  # (candidates, groups)
            misaligned = (off @ touched > 0) * present  # (candidates, layers)
            columns += [misaligned, misaligned * exact, off, off * fraction]
        if features.activations:
            columns.append(fraction * group_present)
        if self.num_blocks:
            trunk = fraction @ self.block_trunk.T + (1.0 - self.block_trunk.sum(1))  # 1 for a block without one
            columns += [block_present, block_present * trunk]
            for a in features.aligns:
                off = (kept < self.sizes) & (np.mod(kept, a) != 0)
                columns.append(block_present * ((off @ self.block_trunk.T) > 0))
        if self.precision:
            columns += [float_layers, float_layers * exact]
        return np.concatenate(columns, axis=1)

    def _float_layers(self, count: int, fp32: np.ndarray | None) -> np.ndarray:
        """(candidates, layers): 1 where a layer runs in FP32."""
        layers = len(self.in_channels)
        if fp32 is None:
            return np.zeros((count, layers))
        fp32 = np.atleast_2d(np.asarray(fp32, float))
        if not self.precision and fp32.any():
            raise ValueError("fp32: this layout was built without precision (every layer INT8)")
        if fp32.shape != (count, layers):
            raise ValueError(f"fp32: got shape {fp32.shape}; expected ({count}, {layers})")
        return fp32

    def vanished(self, removed: np.ndarray) -> np.ndarray:
        """(candidates, groups): True where a group's layers are all in removed blocks (its count does not
        matter)."""
        return self._presence(len(np.atleast_2d(removed)), removed)[1] == 0

    def _presence(self, count: int, removed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per candidate: which layers (1/0), groups (1/0) and blocks (1/0) are there."""
        layers, groups = len(self.in_channels), len(self.sizes)
        if removed is None or self.num_blocks == 0:
            if removed is not None and np.asarray(removed).any():
                raise ValueError("removed: this layout has no removable blocks")
            return np.ones((count, layers)), np.ones((count, groups)), np.ones((count, self.num_blocks))
        removed = np.atleast_2d(np.asarray(removed, float))
        if removed.shape != (count, self.num_blocks):
            raise ValueError(f"removed: got shape {removed.shape}; expected ({count}, {self.num_blocks})")
        block_present = 1.0 - removed
        inside = self.layer_block >= 0
        present = np.ones((count, layers))
        present[:, inside] = block_present[:, self.layer_block[inside]]
        touched = ((self.in_members + self.out_members) > 0).astype(float)  # (layers, groups)
        group_present = (present @ touched > 0).astype(float)
        return present, group_present, block_present

    def _work(self, kept: np.ndarray) -> np.ndarray:
        """(candidates, layers): each layer's kept fraction of its MACs with ``kept`` channels per group."""
        removed = 1.0 - kept / self.sizes
        inputs = 1.0 - (removed @ self.in_members.T) / self.in_channels
        outputs = 1.0 - (removed @ self.out_members.T) / self.out_channels
        return inputs * outputs
