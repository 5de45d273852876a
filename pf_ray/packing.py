"""Weights in compact form (``PackedTensor``: a bitmask, k-bit codes, scales or codebooks) and its bit packing.

A tensor is stored as

- an optional **mask**, one bit per element (True = stored): sparse tensors keep only their non-zeros;
- its stored elements, in one of three encodings:
  ``float`` (float32 values), ``int`` (k-bit codes, value = (code - zero_point) * scale, one scale and zero
  point per output channel or per tensor) or ``codebook`` (k-bit indices into 2^k float32 centroids, one
  codebook per tensor or per bucket of ``bucket_size`` consecutive elements).

Codes are bit-packed (k bits each, little-endian within a byte), so a 4-bit tensor takes half a byte per element
plus its scales. The ``.pfpack`` file that stores them is ``pf_ray.export.packed``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

ENCODINGS = ("float", "int", "codebook")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``codes`` (non-negative integers below 2**bits) as a uint8 array of ceil(n * bits / 8) bytes."""
    codes = np.asarray(codes).ravel()
    if not 1 <= bits <= 16:
        raise ValueError(f"bits: got {bits}; allowed: 1 to 16")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}] cannot be stored in {bits} bits")
    planes = (codes.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1  # (n, bits), LSB first
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` codes that ``pack_bits(codes, bits)`` stored, as int64."""
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")[: count * bits]
    planes = planes.reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits, dtype=np.int64)).sum(axis=1)


@dataclass
class PackedTensor:
    """One tensor in compact form; build it with ``dense``, ``sparse``, ``integer`` or ``codebook``."""

    shape: tuple[int, ...]
    encoding: str  # one of ENCODINGS
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # what is stored, by role
    bits: int = 32
    bucket_size: int = 0  # codebook: elements per codebook (0 = one codebook for the tensor)

    @staticmethod
    def dense(array: np.ndarray | torch.Tensor) -> PackedTensor:
        values = _numpy(array).astype(np.float32)
        return PackedTensor(tuple(values.shape), "float", {"values": values.ravel()})

    @staticmethod
    def sparse(array: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None) -> PackedTensor:
        """The non-zeros of ``array`` (or the elements where ``mask`` is True) as float32, plus a bitmask."""
        values = _numpy(array).astype(np.float32)
        keep = values != 0 if mask is None else _numpy(mask).astype(bool)
        return PackedTensor(tuple(values.shape), "float", {"mask": np.packbits(keep.ravel()),
                                                          "values": values.ravel()[keep.ravel()]})

    @staticmethod
    def integer(codes: np.ndarray | torch.Tensor, bits: int, scale: np.ndarray | torch.Tensor,
                zero_point: np.ndarray | torch.Tensor, *, mask: np.ndarray | torch.Tensor | None = None
                ) -> PackedTensor:
        """Element i = (codes[i] - zero_point[c]) * scale[c], c its output channel (axis 0), or one scale.

        ``codes``: shaped like the tensor (unsigned, below 2**bits); only the masked-in ones are stored."""
        codes = _numpy(codes).astype(np.int64)
        scale, zero_point = _numpy(scale).astype(np.float32).ravel(), _numpy(zero_point).astype(np.int32).ravel()
        if scale.size not in (1, codes.shape[0]) or zero_point.size != scale.size:
            raise ValueError(f"scale/zero_point: {scale.size}/{zero_point.size} values for a tensor of "
                             f"shape {codes.shape}; expected 1 or {codes.shape[0]} (one per output channel)")
        arrays = {"scale": scale, "zero_point": zero_point}
        stored = codes.ravel()
        if mask is not None:
            keep = _numpy(mask).astype(bool).ravel()
            arrays["mask"], stored = np.packbits(keep), stored[keep]
        arrays["codes"] = pack_bits(stored, bits)
        return PackedTensor(tuple(codes.shape), "int", arrays, bits=bits)

    @staticmethod
    def codebook(codes: np.ndarray | torch.Tensor, bits: int, centroids: np.ndarray | torch.Tensor, *,
                 bucket_size: int = 0, mask: np.ndarray | torch.Tensor | None = None) -> PackedTensor:
        """Element i = centroids[bucket(i), codes[i]]; ``centroids`` is (2**bits,) or (buckets, 2**bits),
        bucket(i) = i // bucket_size over the flattened tensor."""
        codes = _numpy(codes).astype(np.int64)
        centroids = _numpy(centroids).astype(np.float32)
        buckets = 1 if bucket_size == 0 else -(-codes.size // bucket_size)
        centroids = centroids.reshape(buckets, -1)
        if centroids.shape[1] > 2**bits:
            raise ValueError(f"centroids: {centroids.shape[1]} per codebook cannot be indexed with {bits} bits")
        arrays = {"centroids": centroids}
        stored = codes.ravel()
        if mask is not None:
            keep = _numpy(mask).astype(bool).ravel()
            arrays["mask"], stored = np.packbits(keep), stored[keep]
        arrays["codes"] = pack_bits(stored, bits)
        return PackedTensor(tuple(codes.shape), "codebook", arrays, bits=bits, bucket_size=bucket_size)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """The bytes of the stored arrays (the file adds a small header per array)."""
        return int(sum(array.nbytes for array in self.arrays.values()))

    def decode(self) -> np.ndarray:
        """The float32 tensor this stands for (zeros where the mask is off)."""
        if "mask" in self.arrays:
            keep = np.unpackbits(self.arrays["mask"], count=self.size).astype(bool)
        else:
            keep = np.ones(self.size, dtype=bool)
        positions = np.flatnonzero(keep)
        if self.encoding == "float":
            stored = self.arrays["values"]
        else:
            codes = unpack_bits(self.arrays["codes"], self.bits, positions.size)
            if self.encoding == "int":
                scale, zero_point = self.arrays["scale"], self.arrays["zero_point"]
                per_channel = self.size // self.shape[0] if scale.size > 1 else self.size
                channel = positions // per_channel if scale.size > 1 else np.zeros_like(positions)
                stored = (codes - zero_point[channel]) * scale[channel]
            else:
                bucket = positions // self.bucket_size if self.bucket_size else np.zeros_like(positions)
                stored = self.arrays["centroids"][bucket, codes]
        out = np.zeros(self.size, dtype=np.float32)
        out[positions] = stored
        return out.reshape(self.shape)


def _numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
