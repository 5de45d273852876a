"""The ``.pfpack`` file: compressed weights (``pf_ray.packing.PackedTensor``) with their real byte count.

A ``.pfpack`` file holds one ``PackedTensor`` per state-dict entry: a signature, a zlib-compressed JSON header
(names, shapes, encodings, where each array lies) and the raw arrays back to back, uncompressed: its size on disk
is what is reported, and ``read_packed`` rebuilds a float state dict that loads into the model for ONNX export or
evaluation (``pf_ray.export.verify.verify_packed`` measures it).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pf_ray.files import atomic_path
from pf_ray.packing import ENCODINGS, PackedTensor

SUFFIX = ".pfpack"
MAGIC = b"PFPACK\x00\x01"
FORMAT_VERSION = 1


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
