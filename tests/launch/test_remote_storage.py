"""A remote storage.path: Ray writes search/ and retrain/ there; the driver stages its own files and uploads them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pf_ray.cli import main
from pf_ray.config import StorageConfig, load_experiment
from pf_ray.errors import ConfigError
from pf_ray.launch import resume
from pf_ray.launch.baseline import baseline_cache_path
from pf_ray.storage import join_uri, run_location
from tests.launch.test_compress import TINY


def test_a_local_storage_path_is_the_run_folder():
    folder, storage = run_location(StorageConfig(path="/data/runs", staging_path="/staging"), "tiny")
    assert folder == Path("/data/runs/tiny") and storage == "/data/runs/tiny"


def test_a_remote_storage_path_stays_a_uri_and_the_run_folder_is_staged():
    folder, storage = run_location(StorageConfig(path="s3://bucket/runs/", staging_path="/staging"), "tiny")
    assert folder == Path("/staging/tiny") and storage == "s3://bucket/runs/tiny"
    assert join_uri("s3://bucket/runs?region=eu-west-1", "tiny", "search") == \
        "s3://bucket/runs/tiny/search?region=eu-west-1"


def test_a_run_folder_is_named_after_a_model_files_stem_and_function(tmp_path, monkeypatch):
    from pf_ray.launch.preflight import preflight
    from pf_ray.models import run_name_prefix

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "user_model.py").write_text(
        "from torch import nn\n\n\ndef build(in_channels, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))\n")
    config = load_experiment(None, ["model.name=models/user_model.py:build", "dataset.name=digits",
                                    "learner.name=full_precision", f"storage.path={tmp_path / 'runs'}"])
    name = preflight(config, log=lambda line: None).location.folder.name
    assert re.fullmatch(r"user_model-build-full_precision-\d{8}-\d{6}", name), name
    assert not (tmp_path / "runs").exists()
    assert run_name_prefix("resnet20") == "resnet20"  # registered names and module references as before
    assert run_name_prefix("my_package.models:build") == "my_package.models_build"


def test_the_baseline_cache_of_a_remote_run_is_on_the_driver():
    from pf_ray.config import ExperimentConfig
    from pf_ray.strict import from_dict

    config = from_dict(ExperimentConfig, {"storage": {"path": "gs://bucket/runs", "staging_path": "/staging"}})
    assert baseline_cache_path(config).parent == Path("/staging/baselines")


def test_staging_path_must_be_local():
    with pytest.raises(ConfigError, match="storage.staging_path: got 's3://bucket/x'; expected a local folder"):
        StorageConfig(path="s3://bucket/runs", staging_path="s3://bucket/x")


def test_resume_of_a_uri_needs_a_run_folder_there(tmp_path):
    (tmp_path / "remote" / "tiny").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"run_dir: 'file://{tmp_path}/remote/tiny' is not a pf-ray run folder"):
        resume(f"file://{tmp_path}/remote/tiny", staging_path=str(tmp_path / "staging"))
    (tmp_path / "remote" / "tiny" / "config.yaml").write_text(f"storage: {{path: {tmp_path}/runs}}\n")
    with pytest.raises(ConfigError, match="storage.path is .*, not a URI; resume it from its local folder"):
        resume(f"file://{tmp_path}/remote/tiny", staging_path=str(tmp_path / "staging"))
    (tmp_path / "remote" / "tiny" / "config.yaml").write_text("storage: [")
    with pytest.raises(ConfigError, match="config.yaml is not valid YAML"):
        resume(f"file://{tmp_path}/remote/tiny", staging_path=str(tmp_path / "staging"))
    assert not (tmp_path / "staging").exists()



def test_fetching_a_remote_run_leaves_rays_folders_in_the_storage(tmp_path):
    from pf_ray.launch.resume import fetch_run

    remote = tmp_path / "remote" / "tiny"
    for folder in ("search", "search-1.5x", "search-2x", "retrain"):
        (remote / folder / "trial").mkdir(parents=True)
        (remote / folder / "trial" / "result.json").write_text("{}")
    (remote / "searched-notes").mkdir()
    (remote / "searched-notes" / "a.txt").write_text("kept")
    (remote / "command.txt").write_text("pf-ray compress")
    (remote / "config.yaml").write_text(f"storage: {{path: 'file://{tmp_path / 'remote'}'}}\n")
    local = fetch_run(f"file://{remote}", str(tmp_path / "staging"), log=lambda line: None)
    assert sorted(p.name for p in local.iterdir()) == ["command.txt", "config.yaml", "searched-notes"]

def test_staging_is_only_for_a_run_given_by_its_uri(tmp_path):
    with pytest.raises(ConfigError, match="--staging: got '/elsewhere' with the local run folder"):
        resume(tmp_path, staging_path="/elsewhere")


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



def test_the_report_of_an_interrupted_remote_pareto_run_reads_every_targets_search(tmp_path):
    from pf_ray.metrics import TARGET_SPEEDUP
    from pf_ray.report import load_run

    for folder, trial_id, accuracy in (("search-1.5x", "t15", 0.7), ("search-2x", "t20", 0.6),
                                       ("not-a-search", "tzz", 0.1)):
        trial = tmp_path / "remote" / "tiny" / folder / trial_id
        trial.mkdir(parents=True)
        (trial / "params.json").write_text(json.dumps({"layer_00": 0.5}))
        (trial / "result.json").write_text(json.dumps({"trial_id": trial_id, "epoch": 1,
                                                       "accuracy": accuracy}) + "\n")
    run = tmp_path / "staging" / "tiny"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"storage: {{path: 'file://{tmp_path / 'remote'}'}}\n")
    record = load_run(run)
    assert sorted((t["trial_id"], t[TARGET_SPEEDUP], t["accuracy"]) for t in record.trials) == [
        ("t15", 1.5, 0.7), ("t20", 2.0, 0.6)]

@pytest.mark.ray
def test_compress_to_a_remote_storage_path(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative folder named "file:" would appear here
    remote, staging = tmp_path / "remote", tmp_path / "staging"
    overrides = [o for o in TINY if not o.startswith("export.formats=")]
    overrides += ["export.formats=[onnx]", "search.num_trials=2", f"storage.path=file://{remote}",
                  f"storage.staging_path={staging}"]
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
    # The baseline cache: on the driver, and beside the runs in the storage for other machines.
    cached = baseline_cache_path(load_experiment(run / "config.yaml"))
    assert cached.parent == staging / "baselines"
    assert (remote / "baselines" / cached.name).read_bytes() == cached.read_bytes()
    # No URI was taken for a local path anywhere.
    assert not [p for p in tmp_path.rglob("*") if p.name in ("s3:", "file:", "gs:")]
    assert not [p for p in Path(__file__).parents[2].iterdir() if p.name in ("s3:", "file:", "gs:")]


    # The driver's machine is lost before results.json was uploaded: another machine resumes from the URI alone,
    # fetching the driver's files and the baseline from the storage.
    (uploaded / "results.json").unlink()
    elsewhere = tmp_path / "elsewhere"
    assert main(["resume", f"file://{uploaded}", "--staging", str(elsewhere)]) == 0
    resumed = json.loads((elsewhere / "tiny" / "results.json").read_text())
    assert resumed["resumed"] is True and resumed["baseline"]["checkpoint"] == str(elsewhere / "baselines" /
                                                                                   cached.name)
    assert {t["trial_id"] for t in resumed["search"]["trials"]} == {t["trial_id"] for t in results["search"]["trials"]}
    assert resumed["config"]["storage"]["staging_path"] == str(elsewhere)
    assert not (elsewhere / "tiny" / "search").exists() and (uploaded / "results.json").is_file()
