"""A local pyarrow filesystem whose files appear whole or not at all: what Ray writes into a run folder on disk.

Ray Tune keeps the search's state (``experiment_state-*.json``, ``search_gen_state-*.json``, the searcher's
pickle, every trial's ``result.json``) in a staging folder and copies that folder into ``storage_path`` after
every event, rewriting each file in place. A driver killed during a copy (SIGKILL, an OOM kill, a lost head
node) leaves empty or truncated files in the run folder; ``Tuner.restore`` then fails to read the searcher's
state, logs "Failed to restore the run state" and starts a new search, losing every finished trial (seen in this
project's CI: a 0-byte ``search_gen_state``). Object stores (S3, GCS) replace an object atomically; a local or
NFS folder does not, unless every file is written under a temporary name and renamed into place, which is what
this filesystem does. Ray takes it through ``RunConfig(storage_filesystem=...)`` and ``Tuner.restore``.

It protects against a killed process, not a power cut (nothing is fsync'ed: that would cost a disk flush per
Tune event).
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import pyarrow
import pyarrow.fs

from pf_ray.storage import is_remote

PARTIAL = ".partial-"  # in the name of a file being written; listings leave these out


class _AtomicFile(io.FileIO):
    """Writes go to a hidden temporary file beside ``path``; ``close`` renames it to ``path``."""

    def __init__(self, path: str) -> None:
        directory, name = os.path.split(path)
        self._final = path
        self._partial = os.path.join(directory, f".{name}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        super().__init__(self._partial, "w")

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        os.replace(self._partial, self._final)  # atomic on POSIX (and NFS): readers see old or new, whole


class AtomicLocalHandler(pyarrow.fs.FileSystemHandler):
    """pyarrow's LocalFileSystem, except that output streams are written to a temporary file and renamed."""

    def __init__(self) -> None:
        self._local = pyarrow.fs.LocalFileSystem()

    def __reduce__(self):  # Ray pickles the storage filesystem to every trial and Train worker
        return AtomicLocalHandler, ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtomicLocalHandler)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "pf-ray-atomic-local"

    def normalize_path(self, path: str) -> str:
        return self._local.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pyarrow.fs.FileInfo]:
        return self._local.get_file_info(paths)

    def get_file_info_selector(self, selector: pyarrow.fs.FileSelector) -> list[pyarrow.fs.FileInfo]:
        return [info for info in self._local.get_file_info(selector) if PARTIAL not in info.base_name]

    def create_dir(self, path: str, recursive: bool) -> None:
        self._local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("pf-ray's atomic filesystem refuses to delete the contents of the root folder")

    def delete_file(self, path: str) -> None:
        self._local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        with self._local.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path: str) -> pyarrow.NativeFile:
        return self._local.open_input_stream(path)

    def open_input_file(self, path: str) -> pyarrow.NativeFile:
        return self._local.open_input_file(path)

    def open_output_stream(self, path: str, metadata) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_AtomicFile(path), mode="w")

    def open_append_stream(self, path: str, metadata) -> pyarrow.NativeFile:
        return self._local.open_append_stream(path, metadata=metadata)


def atomic_local_filesystem() -> pyarrow.fs.PyFileSystem:
    return pyarrow.fs.PyFileSystem(AtomicLocalHandler())


def ray_storage(location: str) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for a Ray ``RunConfig`` writing to ``location``: a URI goes as it is
    (object stores replace files atomically); a local folder goes through the atomic filesystem above, so a
    driver killed while Ray copies its state leaves no half-written file behind."""
    if is_remote(location):
        return location, None
    return str(Path(location).resolve()), atomic_local_filesystem()
