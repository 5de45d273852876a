"""Trained codebooks: k-bit weight sharing (Han et al., "Deep Compression", ICLR 2016).

Each layer (or each bucket of ``bucket_size`` consecutive weights of the flattened tensor) gets 2^k float
centroids; every weight is replaced by one of them, so the layer is stored as k-bit indices plus a 2^k-entry
table. Unlike uniform quantization the centroids follow the weight distribution (dense near zero, sparse in the
tails), which is why 4-bit codebooks lose little accuracy; but the products stay float, so this compresses
storage, not arithmetic.

The maths here is pure (no learner): centroid initialisation (``init_centroids``), nearest-centroid assignment
(``nearest_codes``), the differentiable look-up whose centroid gradient is the sum of the gradients of the
weights that share it (``quantize``), the module that applies it while fine-tuning (``CodebookWeight``), a
post-training one-call version for already-sparse models (``codebook_quantize_``). Bits per layer under an
average-bits budget come from ``pf_ray.ops.bits``, shared with uniform quantization.

Weights are handled as a (buckets, bucket_size) matrix: bucket b holds elements [b * S, (b + 1) * S) of the
flattened tensor (S = the whole tensor when ``bucket_size`` is 0); the last bucket may be partial, its padding
is never fitted, assigned or stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pf_ray.errors import ConfigError, ModelError
from pf_ray.ops.bits import MAX_BITS  # codes are uint8 while training; 256 shared values are near float precision
from pf_ray.packing import PackedTensor

INITS = ("kmeans", "quantile", "linear")
OPTIMIZE = ("weights", "centroids", "both")
CENTROID_GRADIENTS = ("sum", "mean")


# --------------------------------------------------------------------------------------------------------------
# Buckets


def _rows(flat: torch.Tensor, bucket_size: int, fill: float = 0.0) -> torch.Tensor:
    """(buckets, S) view of a flat tensor, the last row padded with ``fill``."""
    size = flat.numel() if bucket_size == 0 else bucket_size
    size = max(size, 1)
    buckets = max(1, -(-flat.numel() // size))
    padding = buckets * size - flat.numel()
    if padding:
        flat = torch.cat([flat, flat.new_full((padding,), fill)])
    return flat.reshape(buckets, size)


def num_buckets(numel: int, bucket_size: int) -> int:
    """Codebooks for a tensor of ``numel`` elements: 1, or one per (possibly partial) bucket."""
    return 1 if bucket_size == 0 else max(1, -(-numel // bucket_size))


# --------------------------------------------------------------------------------------------------------------
# Initialisation


def init_centroids(weight: torch.Tensor, bits: int, *, init: str = "kmeans", bucket_size: int = 0,
                   mask: torch.Tensor | None = None, kmeans_iterations: int = 20) -> torch.Tensor:
    """(buckets, 2**bits) centroids fitted to ``weight``.

    Args:
        init: ``"quantile"``: centroid j is the (j + 1/2) / 2^k quantile (linear interpolation between order
            statistics), the median of the j-th of 2^k equal-count slices, so every centroid starts with about
            the same number of weights (PocketFlow's default); ``"linear"``: evenly spaced over [min, max]
            including both ends (Han et al.'s best: it keeps the rare large weights, which matter most);
            ``"kmeans"``: Lloyd iterations from the quantile start, minimising the squared error (Han et al.'s
            clustering; PocketFlow ran none).
        mask: True where a weight is fitted (e.g. the non-zeros of a sparse layer); None = all.
        kmeans_iterations: at most this many Lloyd steps; stops early once no assignment changes.

    A bucket with fewer weights than centroids gets repeated values (so fewer distinct ones); a bucket with
    nothing to fit gets zeros. Deterministic: no random start.
    """
    if init not in INITS:
        raise ConfigError(f"init: got {init!r}; allowed: {', '.join(INITS)}")
    _check_bits(bits)
    values = weight.detach().reshape(-1).float()
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    rows, keep = _rows(values, bucket_size), _rows(valid, bucket_size, fill=False)
    if init == "linear":
        low = rows.masked_fill(~keep, math.inf).amin(dim=1, keepdim=True)
        high = rows.masked_fill(~keep, -math.inf).amax(dim=1, keepdim=True)
        steps = torch.linspace(0.0, 1.0, 2**bits, dtype=rows.dtype, device=rows.device)
        centroids = low + (high - low) * steps
        return torch.where(keep.any(dim=1, keepdim=True), centroids, torch.zeros_like(centroids))
    levels = (torch.arange(2**bits, dtype=rows.dtype, device=rows.device) + 0.5) / 2**bits
    centroids = _quantiles(rows, keep, levels)
    if init == "kmeans":
        centroids = _lloyd(rows, keep, centroids, kmeans_iterations)
    return centroids


def _quantiles(rows: torch.Tensor, keep: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per row, the ``levels`` quantiles of its kept values (numpy's default 'linear' rule); 0 for empty rows.

    Sorting rather than ``torch.quantile``, which refuses tensors over 2^24 elements and knows no mask."""
    ordered = rows.masked_fill(~keep, math.inf).sort(dim=1).values  # kept values first, ascending
    count = keep.sum(dim=1, keepdim=True)  # (buckets, 1)
    position = levels * (count - 1).clamp(min=0)  # (buckets, K), in [0, count - 1]
    below = position.floor().long()
    above = (below + 1).clamp(max=(count - 1).clamp(min=0))
    fraction = position - below
    low, high = ordered.gather(1, below), ordered.gather(1, above)
    quantiles = low + (high - low) * fraction
    return torch.where(count > 0, quantiles, torch.zeros_like(quantiles))


def _lloyd(rows: torch.Tensor, keep: torch.Tensor, centroids: torch.Tensor, iterations: int) -> torch.Tensor:
    """Lloyd's k-means per row: assign to the nearest centroid, move each centroid to its weights' mean.
    A centroid that wins no weight stays where it is."""
    codes = None
    for _ in range(iterations):
        new_codes = _nearest(rows, centroids)
        if codes is not None and torch.equal(new_codes[keep], codes[keep]):
            break
        codes = new_codes
        weights = keep.to(rows.dtype)
        sums = torch.zeros_like(centroids).scatter_add_(1, codes, rows * weights)
        counts = torch.zeros_like(centroids).scatter_add_(1, codes, weights)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


# --------------------------------------------------------------------------------------------------------------
# Assignment and look-up


def _nearest(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(buckets, S) index of each value's nearest centroid in its row's (buckets, K) table.

    Binary search between the midpoints of the sorted centroids: O(n log K) time and O(n) memory, where the
    n x K distance matrix would need 256 floats per weight at 8 bits. A value exactly on a midpoint goes to
    the smaller centroid; among equal centroids, to the lowest index (stable sort)."""
    ordered, order = centroids.sort(dim=1, stable=True)
    midpoints = ((ordered[:, 1:] + ordered[:, :-1]) / 2).contiguous()
    slot = torch.searchsorted(midpoints, rows.contiguous())  # index into the sorted centroids
    return order.gather(1, slot)


def nearest_codes(weight: torch.Tensor, centroids: torch.Tensor, *, bucket_size: int = 0) -> torch.Tensor:
    """int64 codes shaped like ``weight``: the index of each weight's nearest centroid in its bucket's table."""
    flat = weight.detach().reshape(-1)
    rows = _rows(flat.to(centroids.dtype), bucket_size)
    codes = _nearest(rows, centroids.detach().reshape(rows.shape[0], -1))
    return codes.reshape(-1)[: flat.numel()].reshape(weight.shape)


def lookup(codes: torch.Tensor, centroids: torch.Tensor, *, bucket_size: int = 0) -> torch.Tensor:
    """centroids[bucket(i), codes[i]] shaped like ``codes``; differentiable in ``centroids``: the gradient of
    a centroid is the sum of the gradients of the elements that point at it (the backward of a gather)."""
    flat = codes.reshape(-1).long()
    rows = _rows(flat, bucket_size)
    values = centroids.reshape(rows.shape[0], -1).gather(1, rows)
    return values.reshape(-1)[: flat.numel()].reshape(codes.shape)


def _cluster_sizes(codes: torch.Tensor, centroids: torch.Tensor, *, bucket_size: int,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """Shaped like ``codes``: how many unmasked elements share each element's centroid (at least 1)."""
    flat = codes.reshape(-1).long()
    rows = _rows(flat, bucket_size)
    valid = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1)
    weights = _rows(valid, bucket_size, fill=False).to(centroids.dtype)
    counts = torch.zeros(rows.shape[0], centroids.numel() // rows.shape[0], dtype=centroids.dtype,
                         device=centroids.device).scatter_add_(1, rows, weights)
    sizes = counts.gather(1, rows).clamp(min=1)
    return sizes.reshape(-1)[: flat.numel()].reshape(codes.shape)


def quantize(weight: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor, *, bucket_size: int = 0,
             mask: torch.Tensor | None = None, straight_through: bool = True,
             centroid_gradient: str = "sum") -> torch.Tensor:
    """Each weight replaced by its centroid; masked-out weights are exactly 0.

    Gradients: a centroid gets the sum of its weights' gradients (Han et al., eq. 3), or with
    ``centroid_gradient="mean"`` that sum divided by the number of (unmasked) weights sharing the centroid; a
    weight gets its own gradient unchanged (straight-through, if ``straight_through``), 0 where masked out.
    """
    if centroid_gradient not in CENTROID_GRADIENTS:
        raise ConfigError(f"centroid_gradient: got {centroid_gradient!r}; allowed: {', '.join(CENTROID_GRADIENTS)}")
    quantized = lookup(codes, centroids, bucket_size=bucket_size).to(weight.dtype)
    if centroid_gradient == "mean" and centroids.requires_grad:
        # value unchanged (x + 0 / s == x exactly); element i's gradient reaches its centroid times 1 / count
        shares = _cluster_sizes(codes, centroids, bucket_size=bucket_size, mask=mask).to(weight.dtype)
        quantized = quantized.detach() + (quantized - quantized.detach()) / shares
    if straight_through:
        quantized = quantized + (weight - weight.detach())  # value unchanged; d/d(weight) = identity
    if mask is not None:
        quantized = torch.where(mask, quantized, torch.zeros_like(quantized))
    return quantized


# --------------------------------------------------------------------------------------------------------------
# One fitted codebook, and its compact storage


@dataclass(frozen=True)
class Codebook:
    """A tensor as k-bit codes into per-bucket tables of 2^k centroids, plus the mask of its exact zeros."""

    centroids: torch.Tensor  # (buckets, 2**bits) float32
    codes: torch.Tensor  # int64, shaped like the tensor (meaningless where mask is False)
    bits: int
    bucket_size: int = 0
    mask: torch.Tensor | None = None  # bool, shaped like the tensor: False = an exact zero, not stored

    def values(self) -> torch.Tensor:
        """The float tensor this codebook stands for."""
        placeholder = torch.zeros(self.codes.shape, device=self.codes.device)  # only its shape and dtype count
        return quantize(placeholder, self.centroids, self.codes, bucket_size=self.bucket_size, mask=self.mask,
                        straight_through=False)

    def pack(self) -> PackedTensor:
        """ceil(stored * bits / 8) bytes of codes + 4 * 2^bits bytes per codebook (+ n / 8 of mask if sparse)."""
        return PackedTensor.codebook(self.codes, self.bits, self.centroids, bucket_size=self.bucket_size,
                                     mask=self.mask)


def fit_codebook(weight: torch.Tensor, bits: int, *, init: str = "kmeans", bucket_size: int = 0,
                 keep_zeros: bool = True, kmeans_iterations: int = 20) -> Codebook:
    """Cluster ``weight`` into a ``bits``-bit codebook (no training).

    Args:
        keep_zeros: exact zeros (a sparsified layer's pruned weights) stay exact zeros: they are left out of the
            clustering and stored by the mask, so all 2^k centroids go to the non-zeros. Off: zeros are
            ordinary weights, and a cluster that holds them generally has a non-zero mean.
    """
    mask = sparsity_mask(weight) if keep_zeros else None
    centroids = init_centroids(weight, bits, init=init, bucket_size=bucket_size, mask=mask,
                               kmeans_iterations=kmeans_iterations)
    codes = nearest_codes(weight, centroids, bucket_size=bucket_size)
    return Codebook(centroids, codes, bits, bucket_size, mask)


def sparsity_mask(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight != 0`` if the tensor has an exact zero, else None (a dense tensor needs no mask)."""
    nonzero = weight.detach() != 0
    return None if bool(nonzero.all()) else nonzero


def codebook_of_values(weight: torch.Tensor, bits: int, *, bucket_size: int = 0,
                       keep_zeros: bool = True) -> Codebook:
    """Recover the codebook of a tensor that already holds at most 2^bits distinct values per bucket (a
    finalized layer): the table is each bucket's distinct values, ascending, padded with its largest.

    Raises:
        ModelError: a bucket holds more distinct values than 2^bits (the tensor was not quantized so).
    """
    _check_bits(bits)
    mask = sparsity_mask(weight) if keep_zeros else None
    flat = weight.detach().reshape(-1).float()
    valid = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1)
    rows, keep = _rows(flat, bucket_size), _rows(valid, bucket_size, fill=False)
    ordered, order = rows.masked_fill(~keep, math.inf).sort(dim=1, stable=True)
    fresh = torch.ones_like(ordered, dtype=torch.bool)
    fresh[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    fresh &= keep.gather(1, order)  # padding and masked-out elements (sorted last) found no value
    rank = fresh.long().cumsum(dim=1) - 1  # index of each sorted element's distinct value
    distinct = fresh.sum(dim=1)
    if int(distinct.max()) > 2**bits:
        raise ModelError(f"a codebook of this tensor holds {int(distinct.max())} distinct values; {bits} bits "
                         f"index at most {2**bits} (quantize the layer first, e.g. with the learner's finalize)")
    rank = rank.clamp(min=0, max=2**bits - 1)
    # each distinct value written once, to its rank; everything else to a spare last column, then dropped
    table = torch.zeros(rows.shape[0], 2**bits + 1, device=rows.device)
    table.scatter_(1, rank.masked_fill(~fresh, 2**bits), ordered.masked_fill(~fresh, 0.0))
    centroids = table[:, : 2**bits]
    # pad unused entries with the bucket's largest value (never pointed at), not with an arbitrary 0
    largest = centroids.gather(1, (distinct - 1).clamp(min=0)[:, None])
    unused = torch.arange(2**bits, device=rows.device)[None, :] >= distinct[:, None]
    centroids = torch.where(unused, largest, centroids)
    codes = torch.empty_like(rank).scatter_(1, order, rank)
    codes = codes.reshape(-1)[: flat.numel()].reshape(weight.shape)
    return Codebook(centroids, codes, bits, bucket_size, mask)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"bits: got {bits!r}; allowed: whole numbers from 1 to {MAX_BITS}")


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning a codebook (as a torch parametrization of a layer's weight)


class CodebookWeight(nn.Module):
    """Parametrization ``weight -> its codebook values`` (torch.nn.utils.parametrize), fitted at construction.

    How the assignment and the training work, by ``optimize``:

    - ``"centroids"`` (Han et al.): the assignment is fixed once, here, by the clustering (buffer ``codes``);
      only the centroids train, each by the sum of its weights' gradients; the float weights are frozen.
    - ``"weights"``: the centroids are fixed; the float weights train straight-through, and every forward
      re-assigns each weight to its nearest centroid, so a weight changes cluster once it crosses a midpoint.
    - ``"both"`` (PocketFlow's description): float weights straight-through and centroids by summed gradients,
      every forward re-assigning from the current float weights to the current centroids.

    Weights that are exact zeros at construction stay zero if ``keep_zeros`` (buffer ``mask``; their gradient
    is cut), so a sparsified model keeps its sparsity.
    """

    def __init__(self, weight: torch.Tensor, bits: int, *, init: str = "kmeans", bucket_size: int = 0,
                 kmeans_iterations: int = 20, keep_zeros: bool = True, optimize: str = "both",
                 centroid_gradient: str = "sum") -> None:
        super().__init__()
        if optimize not in OPTIMIZE:
            raise ConfigError(f"optimize: got {optimize!r}; allowed: {', '.join(OPTIMIZE)}")
        if centroid_gradient not in CENTROID_GRADIENTS:
            raise ConfigError(f"centroid_gradient: got {centroid_gradient!r}; allowed: "
                              f"{', '.join(CENTROID_GRADIENTS)}")
        self.centroid_gradient = centroid_gradient
        codebook = fit_codebook(weight, bits, init=init, bucket_size=bucket_size, keep_zeros=keep_zeros,
                                kmeans_iterations=kmeans_iterations)
        self.bits, self.bucket_size, self.optimize = bits, bucket_size, optimize
        self.centroids = nn.Parameter(codebook.centroids.to(weight.dtype), requires_grad=optimize != "weights")
        fixed = codebook.codes.to(torch.uint8) if optimize == "centroids" else None
        self.register_buffer("codes", fixed)
        self.register_buffer("mask", codebook.mask)

    def current_codes(self, weight: torch.Tensor) -> torch.Tensor:
        if self.codes is not None:
            return self.codes.long()
        return nearest_codes(weight, self.centroids, bucket_size=self.bucket_size)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return quantize(weight, self.centroids, self.current_codes(weight), bucket_size=self.bucket_size,
                        mask=self.mask, straight_through=self.optimize != "centroids",
                        centroid_gradient=self.centroid_gradient)


def codebook_quantize_(model: nn.Module, bits_per_layer: Mapping[str, int], *, init: str = "kmeans",
                       bucket_size: int = 0, keep_zeros: bool = True,
                       kmeans_iterations: int = 20) -> dict[str, PackedTensor]:
    """Replace, in place, the weight of each named layer by its ``bits``-bit codebook values (post-training).

    Meant to follow weight sparsification: with ``keep_zeros`` the centroids are fitted to the non-zeros only
    and the zeros stay exact zeros, stored by a 1-bit mask. Returns the compact form of every quantized weight,
    keyed like ``model.state_dict()`` (``"<layer>.weight"``), ready for ``pack_state_dict``.
    """
    packed = {}
    for name, bits in bits_per_layer.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"codebook_quantize_: the model has no layer {name!r}") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ModelError(f"codebook_quantize_: layer {name!r} ({type(module).__name__}) has no weight")
        codebook = fit_codebook(weight, bits, init=init, bucket_size=bucket_size, keep_zeros=keep_zeros,
                                kmeans_iterations=kmeans_iterations)
        with torch.no_grad():
            weight.copy_(codebook.values().to(weight.dtype))
        packed[f"{name}.weight"] = codebook.pack()
    return packed
