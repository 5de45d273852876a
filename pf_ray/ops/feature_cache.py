"""What LASSO channel pruning computes from the baseline alone (its sampled targets, or every layer's refit
statistics), kept across the trials of a search: in memory for the trials of one process, on disk for the others
(each trial runs in its own process).

An entry is keyed by everything it is computed from: the model (its ``repr``, every parameter's and buffer's name,
shape and bytes), the input batches' bytes, and the sampling settings; so a different baseline, data sample or
setting is a miss, never a wrong hit. Files are ``torch.save`` dicts of tensors, written atomically
(``pf_ray.files.atomic_path``) and read with ``weights_only=True``; a file that cannot be read back whole is
computed again and rewritten. ``PF_RAY_FEATURE_CACHE`` sets the folder (default ``~/.cache/pf_ray/features``;
``off``: memory only).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pf_ray.files import atomic_path

CACHE_ENV = "PF_RAY_FEATURE_CACHE"
KEY_VERSION = 1  # bumped when what an entry holds, or how it is computed, changes
MEMORY_ENTRIES = 2  # entries kept in this process (a ResNet-18's refit statistics are ~400 MB)

Entry = dict[str, Any]  # tensors, None, numbers and strings, nested in dicts: what weights_only loads
_memory: OrderedDict[str, Entry] = OrderedDict()


def cache_dir() -> Path | None:
    """The folder of the disk cache, or None when ``PF_RAY_FEATURE_CACHE`` is ``off``."""
    value = os.environ.get(CACHE_ENV)
    if value == "off":
        return None
    return Path(value) if value else Path.home() / ".cache" / "pf_ray" / "features"


def fingerprint(model: nn.Module, batches: Iterable[torch.Tensor], settings: Mapping[str, Any]) -> str:
    """A key for what ``model`` computes on ``batches`` under ``settings`` (JSON-like values)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{KEY_VERSION}|{sorted(settings.items())!r}|{model!r}".encode())
    for name, tensor in [*model.state_dict().items()]:
        digest.update(f"|{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(_bytes(tensor))
    for batch in batches:
        digest.update(f"|batch:{tuple(batch.shape)}:{batch.dtype}".encode())
        digest.update(_bytes(batch))
    return digest.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def cached(key: str, compute: Callable[[], Entry]) -> tuple[Entry, str]:
    """The entry under ``key`` and where it came from: "memory", "disk" or "computed" (then stored in both)."""
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key], "memory"
    folder = cache_dir()
    path = folder / f"{key}.pt" if folder is not None else None
    entry = _read(path) if path is not None else None
    where = "disk"
    if entry is None:
        entry, where = compute(), "computed"
        if path is not None:
            _write(path, key, entry)
    _remember(key, entry)
    return entry, where


def _read(path: Path) -> Entry | None:
    """The entry in ``path``, or None if it is missing or cannot be read back whole (then it is rewritten)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # truncated, corrupted or from another torch: compute again
        return None
    if not isinstance(saved, dict) or saved.get("key") != path.stem or not isinstance(saved.get("entry"), dict):
        return None
    return saved["entry"]


def _write(path: Path, key: str, entry: Entry) -> None:
    try:
        with atomic_path(path) as temporary:
            torch.save({"key": key, "entry": entry}, temporary)
    except OSError:  # a full or read-only disk costs the next trials time, not this one its result
        pass


def _remember(key: str, entry: Entry) -> None:
    _memory[key] = entry
    _memory.move_to_end(key)
    while len(_memory) > MEMORY_ENTRIES:
        _memory.popitem(last=False)


def clear_memory() -> None:
    """Forget the entries held in this process (tests; the disk cache stays)."""
    _memory.clear()
