"""Compact storage of compressed weights, with the real byte count: what a sparse or quantized model occupies.

A ``.pfpack`` file holds one ``PackedTensor`` per state-dict entry. A tensor is stored as

- an optional **mask**, one bit per element (True = stored): sparse tensors keep only their non-zeros;
- its stored elements, in one of three encodings:
  ``float`` (float32 values), ``int`` (k-bit codes, value = (code - zero_point) * scale, one scale and zero
  point per output channel or per tensor) or ``codebook`` (k-bit indices into 2^k float32 centroids, one
  codebook per tensor or per bucket of ``bucket_size`` consecutive elements).

Codes are bit-packed (k bits each, little-endian within a byte), so a 4-bit tensor takes half a byte per element
plus its scales. The file is a signature, a zlib-compressed JSON header (names, shapes, encodings, where each
array lies) and the raw arrays back to back, uncompressed: its size on disk is what is reported, and
``read_packed`` rebuilds a float state dict that loads into the model for ONNX export or evaluation.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pf_ray.files import atomic_path

SUFFIX = ".pfpack"
MAGIC = b"PFPACK\x00\x01"
FORMAT_VERSION = 1
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


def pack_state_dict(state: dict[str, torch.Tensor], packed: dict[str, PackedTensor]) -> dict[str, PackedTensor]:
    """Every floating entry of ``state``: the learner's ``packed`` form where given, else dense float32.
    Integer buffers (BatchNorm's step counter) are left out: inference does not read them."""
    out = {}
    for name, tensor in state.items():
        if name in packed:
            out[name] = packed[name]
        elif tensor.is_floating_point():
            out[name] = PackedTensor.dense(tensor)
    return out


def write_packed(path: str | Path, tensors: dict[str, PackedTensor], *, meta: dict[str, Any] | None = None
                 ) -> dict[str, int]:
    """Write ``tensors`` to ``path`` (``.pfpack``); returns its byte counts: ``file_bytes`` (on disk),
    ``payload_bytes`` (the arrays alone) and ``dense_bytes`` (the same tensors as float32)."""
    path = Path(path)
    entries: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.encoding not in ENCODINGS:
            raise ValueError(f"{name}: unknown encoding {tensor.encoding!r}; known: {', '.join(ENCODINGS)}")
        layout = {}
        for role, array in tensor.arrays.items():
            data = np.ascontiguousarray(array).tobytes()
            layout[role] = [array.dtype.str, list(array.shape), offset, len(data)]
            blobs.append(data)
            offset += len(data)
        entries[name] = {"shape": list(tensor.shape), "encoding": tensor.encoding, "bits": tensor.bits,
                         "bucket_size": tensor.bucket_size, "arrays": layout}
    header = zlib.compress(json.dumps({"version": FORMAT_VERSION, "meta": meta or {}, "tensors": entries},
                                      separators=(",", ":")).encode(), 9)
    with atomic_path(path) as partial, open(partial, "wb") as handle:
        handle.write(MAGIC + struct.pack("<I", len(header)) + header)
        for data in blobs:
            handle.write(data)
    return {"file_bytes": path.stat().st_size,
            "payload_bytes": sum(t.nbytes for t in tensors.values()),
            "dense_bytes": 4 * sum(t.size for t in tensors.values())}


def read_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The float state dict a ``.pfpack`` file stands for, and the ``meta`` it was written with."""
    raw = Path(path).read_bytes()
    try:
        if raw[: len(MAGIC)] != MAGIC:
            raise ValueError("it does not start with the pf-ray packed signature")
        (length,) = struct.unpack_from("<I", raw, len(MAGIC))
        start = len(MAGIC) + 4
        header = json.loads(zlib.decompress(raw[start : start + length]))
        blob = memoryview(raw)[start + length :]
        state = {}
        for name, entry in header["tensors"].items():
            arrays = {}
            for role, (dtype, shape, offset, size) in entry["arrays"].items():
                if offset + size > len(blob):
                    raise ValueError(f"{name}.{role} lies past the end of the file (truncated?)")
                arrays[role] = np.frombuffer(blob[offset : offset + size], dtype=np.dtype(dtype)).reshape(shape)
            tensor = PackedTensor(tuple(entry["shape"]), entry["encoding"], arrays, bits=entry["bits"],
                                  bucket_size=entry["bucket_size"])
            state[name] = torch.from_numpy(tensor.decode().copy())
    except (struct.error, zlib.error, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a readable pf-ray packed file ({type(error).__name__}: {error})") from None
    except ValueError as error:
        raise ValueError(f"{path}: not a readable pf-ray packed file ({error})") from None
    return state, header["meta"]


def verify_packed(path: str | Path, *, model: torch.nn.Module, data: Any,
                  reference_inputs: torch.Tensor | None = None):
    """Decode a ``.pfpack`` into a copy of ``model`` and measure it as ``verify_artifact`` measures a runtime file:
    test accuracy (PyTorch, on the decoded weights), top-1 agreement and largest logit difference with ``model``,
    size on disk. No latency: a packed file is a storage format, decoded to dense weights before any runtime
    executes it (no runtime here has kernels for bit-packed codebooks or bitmask-sparse convolutions)."""
    import copy

    from pf_ray.export.verify import ArtifactReport, dataset_inputs
    from pf_ray.train import ACCURACY, evaluate

    path = Path(path)
    state, _ = read_packed(path)
    decoded = copy.deepcopy(model).cpu().eval()
    missing, unexpected = decoded.load_state_dict(state, strict=False)
    floating = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    if unexpected or floating & set(missing):
        raise ValueError(f"{path}: does not match the model (missing {sorted(floating & set(missing))[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    if reference_inputs is None:
        reference_inputs = dataset_inputs(data.test, limit=256)
    with torch.no_grad():
        reference = copy.deepcopy(model).cpu().eval()(reference_inputs)
        got = decoded(reference_inputs)
    return ArtifactReport(
        path=path, format="pfpack", size_bytes=path.stat().st_size,
        test_accuracy=evaluate(decoded, data.test)[ACCURACY],
        top1_agreement=float((got.argmax(1) == reference.argmax(1)).float().mean()),
        max_abs_diff=float((got - reference).abs().max()),
    )
