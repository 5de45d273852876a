"""`pf-ray compress` end to end on the tiny synthetic set: search, retrain, export, verify, results.json."""

from __future__ import annotations

import json

import pytest

from pf_ray.checkpoint import sha256_of
from pf_ray.cli import main

pytestmark = pytest.mark.ray

TINY = [
    "dataset.name=synthetic",
    "baseline.train.epochs=2",
    "baseline.train.train_subset=null",
    "learner.options.round_to=4",
    "learner.options.num_batches=2",  # LASSO's feature batches: 2 of 64 images are plenty for the tiny set
    "search.num_trials=3",
    "search.budget=macs",  # the default (auto) is latency for channel pruning: tests/launch/test_target.py runs it
    "search.fine_tune.epochs=1",
    "search.fine_tune.train_subset=128",
    "search.validation_subset=64",
    "retrain.train.epochs=1",
    "retrain.train.train_subset=null",
    "export.calibration_samples=32",
    "export.latency_repeats=20",
    "export.formats=[onnx, onnx_int8, ort, ort_int8]",  # ExecuTorch's lowering is slow: tests/export/test_artifacts.py
    "storage.name=tiny",
]


def test_compress_writes_verified_artifacts_and_results(ray_session, tmp_path, capsys):
    args = ["compress"]
    for override in [*TINY, f"storage.path={tmp_path}"]:
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "tiny"
    results = json.loads((run / "results.json").read_text())

    trials = results["search"]["trials"]
    assert len(trials) == 3 and results["search"]["best"]["trial_id"] in {t["trial_id"] for t in trials}
    assert all(t["macs_ratio"] <= 0.5 for t in trials if t["error"] is None)
    assert results["compressed"]["macs"] <= 0.5 * results["baseline"]["macs"]
    assert len(results["baseline"]["sha256"]) == 64

    artifacts = {(a["model"], a["format"]): a for a in results["artifacts"]}
    assert set(artifacts) == {(model, fmt) for model in ("baseline", "compressed")
                              for fmt in ("onnx", "onnx_int8", "ort", "ort_int8")}
    manifest = json.loads((run / "artifacts" / "manifest.json").read_text())
    assert {entry["file"] for entry in manifest["artifacts"]} == {a["path"].split("/")[-1]
                                                                   for a in artifacts.values()}
    for entry in manifest["artifacts"]:
        assert entry["sha256"] == sha256_of(run / "artifacts" / entry["file"])
    for artifact in artifacts.values():
        assert (run / "artifacts" / artifact["path"].split("/")[-1]).is_file()
        assert 0.0 <= artifact["test_accuracy"] <= 1.0
        assert artifact["latency"]["1"]["median_ms"] > 0
    assert results["accuracy_guard"] == {"max_accuracy_drop": 0.02, "failures": []}
    report = (run / "report.md").read_text()
    assert "| compressed ort_int8 |" in report and (run / "report.html").stat().st_size > 10_000
    # TensorBoard: Tune's files per search trial, and the retrain's own (one scalar set per epoch).
    assert list((run / "search").glob("*/events.out.tfevents.*"))
    assert list((run / "retrain" / "tensorboard").glob("events.out.tfevents.*"))
    fp32 = artifacts[("compressed", "onnx")]
    assert fp32["top1_agreement"] == 1.0 and fp32["max_abs_diff"] < 1e-3
    assert artifacts[("compressed", "onnx")]["size_bytes"] < artifacts[("baseline", "onnx")]["size_bytes"]
    assert artifacts[("compressed", "onnx_int8")]["size_bytes"] < artifacts[("compressed", "onnx")]["size_bytes"]

    # The before/after table names every artifact, and the run says where things are.
    for name in ("baseline.onnx", "baseline.int8.onnx", "compressed.onnx", "compressed.int8.onnx"):
        assert f"| {name} |" in out
    assert f"artifacts: {run / 'artifacts'}" in out
    assert (run / "config.yaml").is_file() and (run / "artifacts" / "compressed.pt").is_file()


def _compress(tmp_path, *overrides: str) -> dict:
    args = ["compress"]
    tiny = [override for override in TINY if not override.startswith("learner.options.")]  # pruning's options
    for override in [*tiny, "export.formats=[onnx]", f"storage.path={tmp_path}", *overrides]:
        args += ["--set", override]
    assert main(args) == 0
    return json.loads((tmp_path / "tiny" / "results.json").read_text())


@pytest.mark.slow  # its pipeline checks (.pfpack verified decoded, in the manifest and the summary table, distillation)
# run by default in test_a_quantized_model_is_rebuilt_from_its_checkpoint_and_stored_packed; sparsity's packing in
# tests/learners/test_contract.py and test_weight_sparsification.py
def test_a_sparse_model_is_stored_packed_and_verified_decoded(ray_session, tmp_path, capsys):
    results = _compress(tmp_path, "learner.name=weight_sparsification", "learner.options={sparsity: 0.9}",
                        "search.algorithm=random", "search.num_trials=2", "learner.distillation={}")
    out = capsys.readouterr().out
    # every trial's projected per-layer sparsities keep 10% of the weights, and so does the retrained model
    for trial in results["search"]["trials"]:
        assert trial["error"] is None and len(trial["layer_values"]) == len(results["search"]["layer_names"])
    assert len(results["learner_config"]["layer_sparsities"]) == len(results["search"]["layer_names"])
    rows = {(a["model"], a["format"]): a for a in results["artifacts"]}
    assert set(rows) == {("baseline", "onnx"), ("compressed", "onnx"), ("compressed", "pfpack")}
    packed, dense = rows["compressed", "pfpack"], rows["compressed", "onnx"]
    # bitmask (1/32 of float32) + 10% of the values: well under a third of the dense file
    assert packed["size_bytes"] < dense["size_bytes"] / 3
    assert packed["top1_agreement"] == 1.0 and packed["max_abs_diff"] < 1e-4 and packed["latency"] == {}
    assert "compressed.pfpack" in out and "| - | - |" in out  # the summary table: no latency for a storage file
    manifest = json.loads((tmp_path / "tiny" / "artifacts" / "manifest.json").read_text())
    assert "compressed.pfpack" in {entry["file"] for entry in manifest["artifacts"]}


@pytest.mark.slow
def test_native_int8_writes_its_own_executorch_and_qdq_files(ray_session, tmp_path):
    results = _compress(tmp_path, "learner.name=native_int8", "learner.options={method: qat}")
    assert results["search"]["trials"] == []  # nothing per layer to search: straight to the retrain
    rows = {(a["model"], a["format"]): a for a in results["artifacts"]}
    native = [("compressed", "native_pte_int8"), ("compressed", "native_onnx_int8")]
    assert {*native, ("compressed", "pfpack")} <= set(rows)
    for key in native:  # a barely trained model has near-ties that INT8 may flip: agreement well above chance
        assert rows[key]["top1_agreement"] >= 0.5 and rows[key]["latency"]["1"]["median_ms"] > 0
    assert rows["compressed", "pfpack"]["size_bytes"] < rows["compressed", "onnx"]["size_bytes"] / 3


def test_a_quantized_model_is_rebuilt_from_its_checkpoint_and_stored_packed(ray_session, tmp_path, capsys):
    # uniform_quantization's finalized layers are not the zoo's: the retrain's model.pt and compressed.pt are
    # rebuilt by load_checkpoint through the learner's rebuild_finalized, and stored with 4-bit codes.
    # (It also distils from the baseline: distillation through the whole pipeline.)
    results = _compress(tmp_path, "learner.name=uniform_quantization", "learner.options={weight_bits: 4}",
                        "learner.distillation={}")
    out = capsys.readouterr().out
    rows = {(a["model"], a["format"]): a for a in results["artifacts"]}
    assert rows["compressed", "pfpack"]["top1_agreement"] == 1.0
    assert rows["compressed", "pfpack"]["max_abs_diff"] < 1e-4 and rows["compressed", "pfpack"]["latency"] == {}
    assert "compressed.pfpack" in out and "| - | - |" in out  # the summary table: no latency for a storage file
    manifest = json.loads((tmp_path / "tiny" / "artifacts" / "manifest.json").read_text())
    assert "compressed.pfpack" in {entry["file"] for entry in manifest["artifacts"]}
    assert results["config"]["learner"]["distillation"] == {"weight": 4.0, "temperature": 4.0}
    assert rows["compressed", "onnx"]["top1_agreement"] == 1.0
    # 4-bit codes (1/8 of float32) for the quantized layers; first conv, last linear and BN stay float
    assert rows["compressed", "pfpack"]["size_bytes"] < rows["compressed", "onnx"]["size_bytes"] / 4
    # pf-ray export on its own: the same model from compressed.pt, the same files and the same accuracy
    checkpoint = tmp_path / "tiny" / "artifacts" / "compressed.pt"
    out = tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(out), "--formats", "onnx", "--repeats", "5",
                 "--json"]) == 0
    exported = {row["format"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(exported) == {"onnx", "pfpack"}
    for fmt in ("onnx", "pfpack"):
        assert exported[fmt]["test_accuracy"] == rows["compressed", fmt]["test_accuracy"]
        assert exported[fmt]["size_bytes"] == rows["compressed", fmt]["size_bytes"]


@pytest.mark.slow  # about 3 min: `make test-slow`
def test_two_worker_trials_under_asha_leave_no_placement_group_behind(ray_session, tmp_path):
    # Tune ends each trial's actor when the trial stops; its Ray Train controller dies with it and, on Ray 2.60,
    # leaves its workers' placement group reserved (pf_ray.launch.orphans). Before the reaper, the third and fourth
    # trials' workers waited for those CPUs for ever. ray_session has 4 CPUs: one 2.25-CPU trial at a time.
    results = _compress(tmp_path, "search.num_trials=3", "search.fine_tune.epochs=2", "search.reduction_factor=2",
                        "resources.workers_per_trial=2", "resources.cpus_per_worker=1", "resources.num_cpus=4")
    assert len(results["search"]["trials"]) == 3
    assert all(trial["error"] is None for trial in results["search"]["trials"])
    from pf_ray.launch.orphans import job_placement_groups

    assert job_placement_groups() == []
