"""The one atomic file write every writer uses (checkpoints, exported artifacts, results, reports, caches).

A file written with ``atomic_write`` or ``atomic_path`` appears whole or not at all: the bytes go to a hidden
temporary file in the same folder, which is renamed onto the target (``os.replace``, atomic on POSIX and NFS)
only once complete, and removed if writing fails. A reader (a resumed run, a browser refresh, a concurrent
trial) never sees half a file. Nothing is fsync'ed: this protects against a killed process, not a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (an empty file) to write to; it is moved onto ``path`` if the block
    succeeds and removed if it raises. For writers that need a path: ``torch.save``, ONNX export."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:  # O_EXCL: a name no concurrent writer holds; mode 0o666 less the umask, like any new file
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (a ``str`` as UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, payload: Any) -> Path:
    """``payload`` as indented JSON (values JSON lacks written as their ``str``), atomically."""
    return atomic_write(path, json.dumps(payload, indent=2, default=str))
