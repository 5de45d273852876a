"""One of each: the atomic file write every writer uses, and the one reader of a run folder's config.yaml.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pf_ray.errors import ConfigError
from pf_ray.storage import filesystem_of, is_remote

RUN_CONFIG = "config.yaml"  # in every run folder: the resolved experiment


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


def write_run_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """A run folder's config.yaml (``config``: the experiment as ``to_dict`` gives it), atomically."""
    return atomic_write(Path(run_dir) / RUN_CONFIG, yaml.safe_dump(config, sort_keys=False))


@dataclass(frozen=True)
class RunConfigFile:
    """A run folder's config.yaml as read: where it is, its text (verbatim) and the mapping it holds."""

    location: str  # the file: a local path or a URI
    text: str
    data: dict[str, Any]

    def error(self, problem: str) -> ConfigError:
        """A ConfigError about this file: ``run_dir: <file>: <problem>``."""
        return ConfigError(f"run_dir: {self.location}: {problem}")


def read_run_config(run_dir: str | Path) -> RunConfigFile:
    """The config.yaml of a run folder given as a local folder or a URI (s3://bucket/runs/NAME).

    Raises ConfigError (``run_dir: ...``) naming the folder or file and the problem: no such folder, no
    config.yaml, unreadable, not valid YAML, not a mapping of sections."""
    if is_remote(str(run_dir)):
        location, text = _read_remote(str(run_dir))
    else:
        location, text = _read_local(Path(run_dir))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "malformed YAML"
        raise ConfigError(f"run_dir: {location} is not valid YAML{where}: {problem}") from None
    except (ValueError, RecursionError) as error:  # a scalar YAML accepts but Python cannot build: 2026-13-45
        first = str(error).splitlines()[0] if str(error) else ""
        raise ConfigError(f"run_dir: {location} is not valid YAML: {type(error).__name__}: {first}") from None
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
