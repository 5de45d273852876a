"""The command line: bad input ends as one line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pf_ray.cli import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.num_trails=3"], "unknown field search.num_trails; valid fields of search: algorithm"),
        (["search.num_trials=lots"], "search.num_trials: got 'lots' (str); expected an integer"),
        (["learner.options.keep_ratio=1.5"], "learner.options.keep_ratio: got 1.5; allowed range is (0, 1]"),
        (["learner.options.layer_keep_ratios=[0.5, 0]"], "learner.options.layer_keep_ratios"),
        (["search.target_macs_ratio=0"], "search.target_macs_ratio: got 0.0; allowed range is (0, 1]"),
        (["model.name=resnet21"], "unknown model 'resnet21'; known: mobilenet_v1, mobilenet_v2, resnet20"),
        (["dataset.name=mnist"], "unknown dataset 'mnist'; known: cifar10, digits, fashion_mnist"),
        (["learner.name=lasso"],
         "unknown learner 'lasso'; known: channel_pruning, discrimination_aware_pruning, full_precision"),
        (["dataset.name=fashion_mnist", "dataset.data_dir=/nonexistent/fmnist"],
         "dataset.data_dir: '/nonexistent/fmnist' does not exist"),
        (["resources.workers_per_trial=64"], "resources.workers_per_trial: one trial needs 64.25 CPUs"),
        (["baseline.checkpoint=/nonexistent/model.pt"], "checkpoint '/nonexistent/model.pt' does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, overrides, message):
    storage = tmp_path / "runs"
    args = ["compress", "--set", f"storage.path={storage}", "--set", "dataset.name=digits"]
    for override in overrides:
        args += ["--set", override]
    code, err = _run(args, capsys)
    assert code == EXIT_BAD_INPUT
    assert err.count("\n") == 1 and err.startswith("pf-ray: error: ")
    assert message in err
    assert not storage.exists()


def test_malformed_yaml_file(tmp_path, capsys):
    config = tmp_path / "experiment.yaml"
    config.write_text("search: {num_trials: 3\n")
    code, err = _run(["compress", str(config)], capsys)
    assert code == EXIT_BAD_INPUT
    assert "is not valid YAML at line" in err and err.count("\n") == 1


def test_unreachable_budget_is_refused_before_anything_runs(tmp_path, capsys):
    storage = tmp_path / "runs"
    code, err = _run(["compress", "--set", f"storage.path={storage}", "--set", "dataset.name=digits",
                      "--set", "search.target_macs_ratio=0.001"], capsys)
    assert code == EXIT_BAD_INPUT
    assert "search.target_macs_ratio: got 0.001; the smallest reachable" in err
    assert not storage.exists()


def test_console_script_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pf_ray.cli", "compress", "--set", "model.name=nope",
                             "--set", f"storage.path={tmp_path / 'runs'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown model 'nope'" in result.stderr
