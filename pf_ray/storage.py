"""Where a run's files go: a local folder, or a URI (s3://, gs://, file://) that Ray and pyarrow write to; and the
one reader of a run folder's config.yaml, from either.

A location is a plain string. A URI is never made a ``Path`` (``Path("s3://b/x")`` becomes ``s3:/b/x``). pyarrow is
imported only by the functions that touch a filesystem, and Ray not at all.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import yaml

from pf_ray.errors import ConfigError
from pf_ray.files import atomic_path, atomic_write
from pf_ray.strict import parse_yaml

# The URI schemes pf-ray's storage supports: those pyarrow's FileSystem.from_uri opens with the pyarrow that Ray
# installs (S3, Google Cloud Storage under both its names, and the local filesystem as a URI).
URI_SCHEMES = ("s3://", "gs://", "gcs://", "file://")
RUN_CONFIG = "config.yaml"  # in every run folder: the resolved experiment
SEARCH_DIR = "search"  # a run's Tune experiment; a Pareto set has one search-<target>x per target
RETRAIN_DIR = "retrain"  # the Ray Train run of the retrain (and its progress log, TensorBoard files)


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


def search_dir_name(speedup: float | None, searches: int) -> str:
    """``search``, or ``search-2x`` for each search of a Pareto set (``searches`` > 1)."""
    return SEARCH_DIR if searches == 1 else f"{SEARCH_DIR}-{speedup:g}x"


def search_dir_target(name: str) -> float | None:
    """The target speed-up of a Pareto set's search folder ("search-2.5x" -> 2.5); None for any other name."""
    match = re.fullmatch(rf"{SEARCH_DIR}-([0-9.]+)x", name)
    return float(match.group(1)) if match else None


def is_search_dir(name: str) -> bool:
    """A run's search folder: ``search``, or a Pareto set's ``search-<target>x``."""
    return name == SEARCH_DIR or search_dir_target(name) is not None


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
    if isinstance(target_filesystem, pyarrow.fs.LocalFileSystem):
        with atomic_path(target_path) as written:
            pyarrow.fs.copy_files(source_path, str(written), source_filesystem=source_filesystem,
                                  destination_filesystem=target_filesystem)
        return
    target_filesystem.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
    pyarrow.fs.copy_files(source_path, target_path, source_filesystem=source_filesystem,
                          destination_filesystem=target_filesystem)


def set_aside(location: str) -> str:
    """Rename a folder to ``<name>.damaged-<time>`` (kept for inspection); returns the new location."""
    filesystem, path = filesystem_of(location)
    target = f"{path.rstrip('/')}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    filesystem.move(path, target)
    return target


@dataclass(frozen=True)
class RunConfigFile:
    """A run folder's config.yaml as read: where it is, its text (verbatim) and the mapping it holds."""

    location: str  # the file: a local path or a URI
    text: str
    data: dict[str, Any]

    def error(self, problem: str) -> ConfigError:
        """A ConfigError about this file: ``run_dir: <file>: <problem>``."""
        return ConfigError(f"run_dir: {self.location}: {problem}")


def write_run_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """A run folder's config.yaml (``config``: the experiment as ``to_dict`` gives it), written atomically."""
    return atomic_write(Path(run_dir) / RUN_CONFIG, yaml.safe_dump(config, sort_keys=False))


def read_run_config(run_dir: str | Path) -> RunConfigFile:
    """The config.yaml of a run folder given as a local folder or a URI (s3://bucket/runs/NAME).

    Raises ConfigError (``run_dir: ...``) naming the folder or file and the problem: no such folder, no
    config.yaml, unreadable, not valid YAML, not a mapping of sections."""
    if is_remote(str(run_dir)):
        location, text = _read_remote(str(run_dir))
    else:
        location, text = _read_local(Path(run_dir))
    data = parse_yaml(text, f"run_dir: {location}")
    if not isinstance(data, dict):
        raise ConfigError(f"run_dir: {location} is not a pf-ray run configuration (got {type(data).__name__}; "
                          "expected a mapping of sections)")
    return RunConfigFile(location, text, data)


def _read_local(run_dir: Path) -> tuple[str, str]:
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir: {str(run_dir)!r} is not a pf-ray run folder (it does not exist)")
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"run_dir: {str(run_dir)!r} is not a pf-ray run folder (it has no {RUN_CONFIG})")
    try:
        return str(path), path.read_text()
    except OSError as error:
        raise ConfigError(f"run_dir: {path} cannot be read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"run_dir: {path} is not UTF-8 text (byte {error.start})") from None


def _read_remote(uri: str) -> tuple[str, str]:
    import pyarrow.fs

    filesystem, root = filesystem_of(uri)
    path = f"{root.rstrip('/')}/{RUN_CONFIG}"
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise ConfigError(f"run_dir: {uri!r} is not a pf-ray run folder (it has no {RUN_CONFIG})")
    location = f"{uri.partition('?')[0].rstrip('/')}/{RUN_CONFIG}"
    with filesystem.open_input_stream(path) as stream:
        raw = stream.read()
    try:
        return location, raw.decode()
    except UnicodeDecodeError as error:
        raise ConfigError(f"run_dir: {location} is not UTF-8 text (byte {error.start})") from None
