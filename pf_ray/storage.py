"""Where a run's files go: a local folder, or a URI (s3://, gs://, file://) that Ray and pyarrow write to.

A location is a plain string. A URI is never made a ``Path`` (``Path("s3://b/x")`` becomes ``s3:/b/x``). pyarrow is
imported only by the functions that touch a filesystem, and Ray not at all.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, NamedTuple, Protocol

# The URI schemes pf-ray's storage supports: those pyarrow's FileSystem.from_uri opens with the pyarrow that Ray
# installs (S3, Google Cloud Storage under both its names, and the local filesystem as a URI).
URI_SCHEMES = ("s3://", "gs://", "gcs://", "file://")


class StorageSettings(Protocol):
    """What the functions below read of ``pf_ray.config.StorageConfig``."""

    path: str
    staging_path: str


def is_remote(path: str) -> bool:
    """A URI (s3://bucket/runs, gs://..., file://...): not a path on this machine, so never a ``Path``."""
    return "://" in path


def unsupported_scheme(location: str) -> str | None:
    """The scheme of a URI pf-ray cannot write to (``"ftp://"``), or None for a supported URI or a local path."""
    if not is_remote(location) or location.startswith(URI_SCHEMES):
        return None
    return location.split("://", 1)[0] + "://"


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` for a URI, keeping its query (``s3://bucket/runs?region=eu-west-1``) at the end."""
    root, question, query = base.partition("?")
    return "/".join([root.rstrip("/"), *parts]) + question + query


def local_root(storage: StorageSettings) -> Path:
    """The driver's folder for run folders and the baseline cache: storage.path, or staging_path if remote."""
    return Path(storage.staging_path if is_remote(storage.path) else storage.path)


class RunLocation(NamedTuple):
    """Where a run's files go."""

    folder: Path  # the local run folder: config.yaml, artifacts/, results.json, the report
    storage: str  # where Ray writes search/ and retrain/: the folder itself, or its URI in a remote storage.path


def run_location(storage: StorageSettings, name: str) -> RunLocation:
    """The run's local folder, and where Ray writes its search/ and retrain/ (the same folder, or a URI)."""
    folder = local_root(storage) / name
    return RunLocation(folder, join_uri(storage.path, name) if is_remote(storage.path) else str(folder))


def filesystem_of(location: str) -> tuple[Any, str]:
    """pyarrow's filesystem and path for a URI or a local path."""
    import pyarrow.fs

    if is_remote(location):
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def exists(location: str) -> bool:
    """Whether a file or folder is at ``location`` (a URI or a local path)."""
    import pyarrow.fs

    filesystem, path = filesystem_of(location)
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def upload(run_dir: Path, run_storage: str) -> None:
    """Copy the local run folder into the remote one (Ray's search/ and retrain/ there are kept); nothing to do
    when ``run_storage`` is the local folder itself."""
    if is_remote(run_storage):
        import pyarrow.fs

        filesystem, path = pyarrow.fs.FileSystem.from_uri(run_storage)
        filesystem.create_dir(path, recursive=True)  # a no-op on object stores; file:// needs the folder
        pyarrow.fs.copy_files(str(run_dir), path, destination_filesystem=filesystem)


def copy_file(source: str, target: str) -> None:
    """Copy one file between a URI and a local path, either way; a local target is written whole (a temporary
    file renamed), an object store replaces its objects atomically itself."""
    import pyarrow.fs

    source_filesystem, source_path = filesystem_of(source)
    target_filesystem, target_path = filesystem_of(target)
    target_filesystem.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
    local = isinstance(target_filesystem, pyarrow.fs.LocalFileSystem)
    written = target_path + ".partial" if local else target_path
    pyarrow.fs.copy_files(source_path, written, source_filesystem=source_filesystem,
                          destination_filesystem=target_filesystem)
    if local:
        os.replace(written, target_path)


def set_aside(location: str) -> str:
    """Rename a folder to ``<name>.damaged-<time>`` (kept for inspection); returns the new location."""
    filesystem, path = filesystem_of(location)
    target = f"{path.rstrip('/')}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    filesystem.move(path, target)
    return target
