"""The run report: rebuilt from fake run folders (no Ray, no training), finished, interrupted and search-free."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pf_ray.config import ExperimentConfig
from pf_ray.errors import ConfigError
from pf_ray.report import SPACE_FILE, _pareto_front, load_run, write_report
from pf_ray.strict import to_dict

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
LAYER_NAMES = ["conv1", "layer1", "layer2.0", "layer2", "layer3.0", "layer3"]


def _trial(index: int, score: float | None, macs_ratio: float | None, *, error: str | None = None) -> dict[str, Any]:
    values = [round(0.3 + 0.1 * ((index + k) % 6), 2) for k in range(len(LAYER_NAMES))]
    return {"trial_id": f"abc12_{index:05d}", "proposal": values, "layer_values": None if error else values,
            "score": score, "accuracy": score, "proxy_accuracy": None if score is None else score - 0.2,
            "epoch": 0 if error else 2, "macs_ratio": macs_ratio, "macs": None, "params": None, "error": error,
            "timestamp": 1_700_000_000.0 + 10 * index}


def _artifact(model: str, fmt: str, accuracy: float, median_ms: float) -> dict[str, Any]:
    latency = {"1": {"median_ms": median_ms, "p95_ms": 1.2 * median_ms, "mean_ms": 1.1 * median_ms},
               "32": {"median_ms": 20 * median_ms, "p95_ms": 22 * median_ms, "mean_ms": 21 * median_ms}}
    macs = 41_000_000 if model == "baseline" else 20_500_000
    return {"model": model, "format": fmt, "macs": macs, "params": 270_000 if model == "baseline" else 150_000,
            "path": f"/runs/x/artifacts/{model}.{fmt}", "size_bytes": 1_100_000 if fmt == "onnx" else 300_000,
            "test_accuracy": accuracy, "top1_agreement": 0.995, "max_abs_diff": 0.01, "latency": latency}


def make_trials() -> list[dict[str, Any]]:
    return [_trial(0, 0.81, 0.52), _trial(1, 0.84, 0.49), _trial(2, None, None, error="ValueError: <bad> | x"),
            _trial(3, 0.86, 0.50), _trial(4, 0.79, 0.41), _trial(5, 0.88, 0.62)]


def make_finished_run(root: Path, *, trials: list[dict[str, Any]] | None = None) -> Path:
    """A run folder as `pf-ray compress` leaves it, with 6 trials (one errored) and 4 artifact rows."""
    run = root / "finished-run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(ExperimentConfig()), sort_keys=False))
    if trials is None:
        trials = make_trials()
    best = max((t for t in trials if t["score"] is not None), key=lambda t: t["score"], default=None)
    results = {
        "command": "pf-ray compress examples/resnet20_fashion_mnist.yaml --set search.num_trials=6",
        "config": to_dict(ExperimentConfig()),
        "baseline": {"checkpoint": "/b.pt", "sha256": "00", "macs": 41_000_000, "params": 270_000,
                     "size_bytes": 1_100_000},
        "search": {"algorithm": "tpe" if trials else None, "layer_names": LAYER_NAMES if trials else [],
                   "field": "layer_keep_ratios" if trials else None, "value_label": "keep ratio" if trials else None,
                   "trials": trials, "best": best},
        "learner_config": {"mode": "auto", "layer_keep_ratios": best["layer_values"] if best else [],
                           "keep_ratio": 0.5},
        "compressed": {"checkpoint": "/c.pt", "macs": 20_500_000, "params": 150_000, "size_bytes": 600_000},
        "artifacts": [_artifact("baseline", "onnx", 0.9012, 2.0), _artifact("baseline", "onnx_int8", 0.8990, 1.0),
                      _artifact("compressed", "onnx", 0.8804, 1.0), _artifact("compressed", "onnx_int8", 0.8731, 0.5)],
        "seconds": 612.3,
    }
    (run / "results.json").write_text(json.dumps(results, indent=2))
    return run


def _write_trial_folder(search: Path, trial_id: str, values: list[float], results: list[dict[str, Any]]) -> None:
    folder = search / trial_id
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({f"layer_{i:02d}": v for i, v in enumerate(values)}))
    lines = [json.dumps({**r, "trial_id": trial_id, "layer_values": values}) for r in results]
    (folder / "result.json").write_text("".join(line + "\n" for line in lines))


def make_interrupted_run(root: Path) -> Path:
    """A run folder stopped during the search: config.yaml and Tune's folders, no results.json."""
    run = root / "interrupted-run"
    search = run / "search"
    search.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(ExperimentConfig()), sort_keys=False))
    epoch = lambda e, acc, t: {"epoch": e, "score": acc, "accuracy": acc, "macs_ratio": 0.5, "timestamp": t}
    _write_trial_folder(search, "f00d_00000", [0.5, 0.6, 0.7], [epoch(1, 0.70, 100), epoch(2, 0.80, 200)])
    _write_trial_folder(search, "f00d_00001", [0.4, 0.4, 0.9], [epoch(1, 0.75, 150)])
    _write_trial_folder(search, "f00d_00002", [0.9, 0.9, 0.9], [])  # started, reported nothing
    with (search / "f00d_00001" / "result.json").open("a") as file:
        file.write('{"epoch": 2, "sco')  # the line the interruption cut short
    (search / "experiment_state-2025-01-01.json").write_text("{}")  # Tune's own files: not trials
    (search / "basic-variant-state-2025-01-01.json").write_text("{}")
    (search / "searcher-state-2025-01-01.pkl").write_bytes(b"\x80")
    (search / "checkpoint_tmp").mkdir()
    return run


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in DATA_URI.findall(html)]


def test_finished_run_report_has_the_tables_and_embedded_plots(tmp_path):
    run = make_finished_run(tmp_path)
    markdown_path, html_path = write_report(run)
    assert (markdown_path, html_path) == (run / "report.md", run / "report.html")
    markdown, html = markdown_path.read_text(), html_path.read_text()

    images = _images(html)
    assert len(images) >= 3
    assert all(png.startswith(PNG_SIGNATURE) and len(png) > 5_000 for png in images)
    for name in ("pareto.png", "layers.png", "progress.png"):  # the markdown links its copies relatively
        assert f"(report_files/{name})" in markdown
        assert (run / "report_files" / name).read_bytes().startswith(PNG_SIGNATURE)

    compressed_int8 = next(line for line in markdown.splitlines() if line.startswith("| compressed onnx_int8"))
    assert "87.31%" in compressed_int8 and "20.50M" in compressed_int8 and "293.0 KiB" in compressed_int8
    assert "0.500 / 0.600 ms" in compressed_int8 and "4.00x" in compressed_int8  # b1: 2.0 ms / 0.5 ms
    assert "10.000 / 11.000 ms" in compressed_int8  # batch 32
    assert "pf-ray compress examples/resnet20_fashion_mnist.yaml --set search.num_trials=6" in markdown
    assert "learner:\n  name: channel_pruning" in markdown  # config.yaml verbatim
    assert "did not finish" not in markdown
    assert "Chosen keep ratio per layer" in markdown  # results.json's search says what a value is
    assert load_run(run).chosen_values == max((t for t in make_trials() if t["score"]), key=lambda t: t["score"])[
        "layer_values"]  # the learner config's searched field


def test_html_is_self_contained_and_escaped(tmp_path):
    _, html_path = write_report(make_finished_run(tmp_path))
    html = html_path.read_text()
    assert "<script" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', html))
    assert "ValueError: &lt;bad&gt; | x" in html and "<bad>" not in html


def test_rebuilding_gives_the_same_report(tmp_path):
    run = make_finished_run(tmp_path)
    first = [path.read_bytes() for path in write_report(run)]
    second = [path.read_bytes() for path in write_report(run)]
    assert first == second
    assert not list(run.glob(".*.tmp")) and not list((run / "report_files").glob(".*.tmp"))


def test_interrupted_run_is_rebuilt_from_the_trial_folders(tmp_path):
    run = make_interrupted_run(tmp_path)
    record = load_run(run)
    assert not record.finished
    assert [t["trial_id"] for t in record.trials] == ["f00d_00000", "f00d_00001", "f00d_00002"]
    assert record.trials[0]["score"] == 0.80 and record.trials[1]["epoch"] == 1  # last complete line
    assert record.trials[2]["error"] == "no result reported"
    assert record.best["trial_id"] == "f00d_00000"  # the only one that ran every epoch
    assert record.layer_names == ["layer_00", "layer_01", "layer_02"] and record.value_label == "value"
    assert record.command == f"pf-ray compress {run / 'config.yaml'}"
    # the space file written before the search names the layers and what a value is
    (run / SPACE_FILE).write_text(json.dumps({"field": "layer_sparsities", "value_label": "sparsity",
                                              "layer_names": ["conv1", "fc", "head"]}))
    record = load_run(run)
    assert record.layer_names == ["conv1", "fc", "head"] and record.value_label == "sparsity"

    markdown_path, html_path = write_report(run)
    markdown = markdown_path.read_text()
    assert "The run did not finish" in markdown and "Baseline vs compressed" not in markdown
    for trial_id in ("f00d_00000", "f00d_00001", "f00d_00002"):
        assert trial_id in markdown
    assert "failed: no result reported" in markdown
    assert len(_images(html_path.read_text())) == 3


def test_run_without_search_still_gets_a_report(tmp_path):
    run = make_finished_run(tmp_path, trials=[])
    results = json.loads((run / "results.json").read_text())
    results["accuracy_guard"] = {"max_accuracy_drop": 0.01, "failures": ["compressed.int8.onnx lost 2.00 pt"]}
    (run / "results.json").write_text(json.dumps(results))
    markdown_path, html_path = write_report(run)
    markdown = markdown_path.read_text()
    assert "No search: the learner's settings were given." in markdown
    assert "Accuracy guard failed: compressed.int8.onnx lost 2.00 pt" in markdown
    assert "pareto.png" not in markdown and "progress.png" not in markdown
    assert "87.31%" in markdown
    assert _images(html_path.read_text()) == []


def test_groups_the_safety_check_left_uncompressed_are_listed_with_why(tmp_path):
    run = make_finished_run(tmp_path)
    markdown = write_report(run)[0].read_text()
    assert "Left uncompressed" not in markdown  # nothing skipped: no section
    results = json.loads((run / "results.json").read_text())
    results["skipped_groups"] = [{"name": "mix.conv", "reason": "a channel shuffle after a split"}]
    (run / "results.json").write_text(json.dumps(results))
    markdown = write_report(run)[0].read_text()
    assert "## Left uncompressed" in markdown and "| mix.conv | a channel shuffle after a split |" in markdown


def test_trials_are_ordered_by_timestamp_else_by_trial_id(tmp_path):
    late, early = _trial(0, 0.8, 0.5), _trial(1, 0.7, 0.5)
    late["timestamp"], early["timestamp"] = 200.0, 100.0
    record = load_run(make_finished_run(tmp_path / "a", trials=[late, early]))
    assert [t["trial_id"] for t in record.trials] == ["abc12_00001", "abc12_00000"]
    del late["timestamp"]
    record = load_run(make_finished_run(tmp_path / "b", trials=[early, late]))
    assert [t["trial_id"] for t in record.trials] == ["abc12_00000", "abc12_00001"]


def test_trials_with_latency_get_a_second_pareto_panel(tmp_path):
    def pareto_width(run: Path) -> int:
        write_report(run)
        return int.from_bytes((run / "report_files" / "pareto.png").read_bytes()[16:20], "big")  # IHDR width

    trials = [_trial(i, 0.8 + 0.01 * i, 0.4 + 0.05 * i) for i in range(4)]
    without = pareto_width(make_finished_run(tmp_path / "a", trials=trials))
    with_latency = pareto_width(make_finished_run(tmp_path / "b", trials=[{**t, "latency_ms": 1.0 + i}
                                                                          for i, t in enumerate(trials)]))
    assert with_latency > 1.8 * without


def test_not_a_run_folder_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(ConfigError, match=f"{re.escape(str(tmp_path))}.*no config.yaml"):
        write_report(tmp_path)


def test_pareto_front_keeps_only_undominated_points():
    points = [(0.5, 0.80), (0.4, 0.78), (0.6, 0.79), (0.7, 0.85), (0.4, 0.70), (0.3, 0.60)]
    assert _pareto_front(points) == [(0.3, 0.60), (0.4, 0.78), (0.5, 0.80), (0.7, 0.85)]


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, pf_ray.report; assert 'matplotlib' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2], timeout=60)
