"""The aarch64 options and set-up that need no emulation: bad ``pf-ray verify --arch aarch64`` options fail in one
line before any data is loaded, and a cached environment is reused only when complete and built from the pinned
versions. (tests/export/test_aarch64.py runs artifacts on the emulated CPUs.)"""

from __future__ import annotations

import json

import pytest

from pf_ray.aarch64 import find_environment
from pf_ray.aarch64.environment import STAMP_FILE, Aarch64Environment, pinned_versions
from pf_ray.cli import EXIT_BAD_INPUT, main


@pytest.mark.parametrize(("argv", "message"), [
    (["--arch", "aarch64", "--cpu", "cortex-a9"], "cpu: got 'cortex-a9'; the emulated aarch64 CPUs are cortex-a53, "
                                                  "cortex-a72, cortex-a76, neoverse-n1, cortex-a710"),
    (["--cpu", "cortex-a53"], "--cpu: only with --arch aarch64"),
    (["--arch", "aarch64", "--subset", "0"], "--subset"),
])
def test_bad_aarch64_options_are_refused_in_one_line(argv, message, tmp_path, capsys) -> None:
    artifact = tmp_path / "m.int8.onnx"
    artifact.write_bytes(b"not read: the options fail first")
    assert main(["verify", str(artifact), "--dataset", "digits", *argv]) == EXIT_BAD_INPUT
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("pf-ray: error: ") and message in error


def test_a_cached_environment_is_used_only_when_complete_and_built_from_the_pinned_versions(tmp_path) -> None:
    stamp = {"pinned": pinned_versions(), "packages": {}}
    environment = Aarch64Environment(tmp_path, stamp)
    for path in environment.required_files():  # with the ExecuTorch runner where the host has ExecuTorch
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    (tmp_path / STAMP_FILE).write_text(json.dumps(stamp))
    assert find_environment(tmp_path) == environment
    environment.qemu.unlink()
    assert find_environment(tmp_path) is None  # a piece is missing
    environment.qemu.touch()
    (tmp_path / STAMP_FILE).write_text(json.dumps({**stamp, "pinned": {**stamp["pinned"], "onnxruntime": "0.1"}}))
    assert find_environment(tmp_path) is None  # built for another host version
