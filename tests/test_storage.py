"""A remote storage.path: Ray writes search/ and retrain/ there; the driver stages its own files and uploads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pf_ray.cli import main
from pf_ray.config import StorageConfig
from pf_ray.errors import ConfigError
from pf_ray.launch import baseline_cache_path, join_uri, resume, run_location
from tests.test_end_to_end import TINY


def test_a_local_storage_path_is_the_run_folder():
    folder, storage = run_location(StorageConfig(path="/data/runs", staging_path="/staging"), "tiny")
    assert folder == Path("/data/runs/tiny") and storage == "/data/runs/tiny"


def test_a_remote_storage_path_stays_a_uri_and_the_run_folder_is_staged():
    folder, storage = run_location(StorageConfig(path="s3://bucket/runs/", staging_path="/staging"), "tiny")
    assert folder == Path("/staging/tiny") and storage == "s3://bucket/runs/tiny"
    assert join_uri("s3://bucket/runs?region=eu-west-1", "tiny", "search") == \
        "s3://bucket/runs/tiny/search?region=eu-west-1"


def test_the_baseline_cache_of_a_remote_run_is_on_the_driver():
    from pf_ray.config import ExperimentConfig, from_dict

    config = from_dict(ExperimentConfig, {"storage": {"path": "gs://bucket/runs", "staging_path": "/staging"}})
    assert baseline_cache_path(config).parent == Path("/staging/baselines")


def test_staging_path_must_be_local():
    with pytest.raises(ConfigError, match="storage.staging_path: got 's3://bucket/x'; expected a local folder"):
        StorageConfig(path="s3://bucket/runs", staging_path="s3://bucket/x")


def test_resume_takes_the_local_run_folder_not_the_uri():
    with pytest.raises(ConfigError, match="run_dir: got 's3://bucket/runs/tiny'; pass the local run folder"):
        resume("s3://bucket/runs/tiny")


def test_the_report_of_an_interrupted_remote_run_reads_the_search_from_the_storage(tmp_path):
    from pf_ray.report import load_run

    trial = tmp_path / "remote" / "tiny" / "search" / "a1b2"
    trial.mkdir(parents=True)
    (trial / "params.json").write_text(json.dumps({"layer_00": 0.5, "layer_01": 0.75}))
    (trial / "result.json").write_text(json.dumps({"trial_id": "a1b2", "epoch": 1, "accuracy": 0.5}) + "\n")
    (trial / "checkpoint_000000").mkdir()  # not fetched
    run = tmp_path / "staging" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"storage: {{path: 'file://{tmp_path / 'remote'}'}}\n")
    record = load_run(run)
    assert [(t["trial_id"], t["proposal"], t["accuracy"]) for t in record.trials] == [("a1b2", [0.5, 0.75], 0.5)]
    assert record.layer_names == ["layer_00", "layer_01"]


@pytest.mark.ray
def test_compress_to_a_remote_storage_path(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative folder named "file:" would appear here
    remote, staging = tmp_path / "remote", tmp_path / "staging"
    overrides = [o for o in TINY if not o.startswith("export.formats=")]
    overrides += ["export.formats=[onnx]", f"storage.path=file://{remote}", f"storage.staging_path={staging}"]
    args = ["compress"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0

    run, uploaded = staging / "tiny", remote / "tiny"
    # The driver's files: written locally, then uploaded next to Ray's search/ and retrain/.
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["storage"]["path"] == f"file://{remote}"
    assert not (run / "search").exists()
    for name in ("config.yaml", "command.txt", "results.json", "report.md", "report.html",
                 "artifacts/compressed.pt", "artifacts/compressed.onnx", "artifacts/manifest.json"):
        assert (uploaded / name).read_bytes() == (run / name).read_bytes(), name
    # Ray's output went straight to the remote folder.
    assert list((uploaded / "search").glob("experiment_state-*.json"))
    assert {t["trial_id"] for t in results["search"]["trials"]} <= {p.name for p in (uploaded / "search").iterdir()}
    assert list((uploaded / "retrain").glob("**/checkpoint_*"))
    assert (staging / "baselines").is_dir() and not (remote / "baselines").exists()
    # No URI was taken for a local path anywhere.
    assert not [p for p in tmp_path.rglob("*") if p.name in ("s3:", "file:", "gs:")]
    assert not [p for p in Path(__file__).parents[1].iterdir() if p.name in ("s3:", "file:", "gs:")]

