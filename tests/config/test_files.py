"""The one atomic write (pf_ray.files) and the one reader of a run's config.yaml (pf_ray.storage), local and URI."""

from __future__ import annotations

import os

import pytest

from pf_ray.errors import ConfigError
from pf_ray.files import atomic_path, atomic_write
from pf_ray.storage import copy_file, read_run_config


def test_an_atomic_write_leaves_the_file_whole_and_no_temporary_file(tmp_path):
    target = tmp_path / "out" / "results.json"
    atomic_write(target, "first")
    atomic_write(target, b"second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user writes


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("the writer failed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_copy_to_a_local_path_is_written_whole(tmp_path):
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "baseline.pt").write_bytes(b"weights")
    copy_file(f"file://{tmp_path}/remote/baseline.pt", str(tmp_path / "cache" / "baseline.pt"))
    assert (tmp_path / "cache" / "baseline.pt").read_bytes() == b"weights"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["baseline.pt"]


@pytest.mark.parametrize("uri", [False, True])
def test_one_reader_of_a_run_config_with_one_set_of_errors(tmp_path, uri):
    run = tmp_path / "run"

    def where(path):
        return f"file://{path}" if uri else str(path)

    with pytest.raises(ConfigError, match="run_dir: .* is not a pf-ray run folder"):
        read_run_config(where(run))
    run.mkdir()
    with pytest.raises(ConfigError, match=r"run_dir: .*run' is not a pf-ray run folder \(it has no config.yaml\)"):
        read_run_config(where(run))
    (run / "config.yaml").write_text("storage: [\n")
    with pytest.raises(ConfigError, match=r"run_dir: .*run/config.yaml is not valid YAML at line 2, column 1: "):
        read_run_config(where(run))
    (run / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match=r"run/config.yaml is not a pf-ray run configuration \(got list; "
                                          "expected a mapping of sections\\)"):
        read_run_config(where(run))
    (run / "config.yaml").write_text("seed: 3\n")
    read = read_run_config(where(run))
    assert read.data == {"seed": 3} and read.text == "seed: 3\n" and read.location.endswith("run/config.yaml")
