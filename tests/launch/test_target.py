"""The deployment target on the run side: the latency table asked for only by a learner that budgets latency, kept
in the run folder; the end-of-run measurement of the artifacts and candidates side by side; and a latency-budget
search under ASHA on Ray whose every candidate meets the budget by the table's prediction."""

from __future__ import annotations

import json

import pytest

import pf_ray.launch.target as target
from pf_ray.cli import main
from pf_ray.config import ExperimentConfig, Precision, Runtime, TargetConfig
from pf_ray.errors import ConfigError
from pf_ray.latency import TablePlan, latency_table, pruned_copy
from pf_ray.latency.measure import Timing, export_artifact
from pf_ray.launch.pipeline import choose_across
from pf_ray.launch.preflight import preflight
from pf_ray.metrics import ACCURACY, LAYER_VALUES, PREDICTED_MS, TARGET_MS, TARGET_SPEEDUP
from pf_ray.ops.latency_budget import LatencyBudget
from pf_ray.ops.macs_budget import MacsBudget, macs_table
from pf_ray.report import target_summary
from pf_ray.search_space import PerLayerSpace
from pf_ray.strict import from_dict, to_dict
from tests.latency.conftest import SHAPE, small_cnn
from tests.launch.test_compress import TINY

QUICK = Timing(warmup=2, repeats=10, rounds=2)
QUICK_PLAN = TablePlan(sweep_fractions=(0.5,), dense_groups=1, dense_window=8, num_random=16, num_holdout=6,
                       timing=QUICK)
INT8 = TargetConfig(runtime=Runtime.ONNXRUNTIME, precision=Precision.INT8)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("latency-cache")


@pytest.fixture
def quick_target(monkeypatch, cache_dir):
    """Small tables and short timings, cached in one folder for this module (digits' table is built once)."""
    monkeypatch.setattr(target, "TABLE_PLAN", QUICK_PLAN)
    monkeypatch.setattr(target, "TIMING", QUICK)
    monkeypatch.setenv("PF_RAY_LATENCY_CACHE", str(cache_dir))


def _experiment(tmp_path, **search) -> ExperimentConfig:
    return from_dict(ExperimentConfig, {"dataset": {"name": "digits"}, "storage": {"path": str(tmp_path / "runs")},
                                        "search": {"budget": "latency", "target_speedup": 1.02, **search}})


def test_the_table_is_built_only_for_a_learner_that_budgets_latency(tmp_path, quick_target, cache_dir,
                                                                   monkeypatch):
    built = []
    real = target.latency_table
    monkeypatch.setattr(target, "latency_table", lambda *a, **k: built.append(1) or real(*a, **k))
    config = _experiment(tmp_path)
    with pytest.raises(ConfigError, match="learner channel_pruning searches no per-layer values"):
        preflight(from_dict(ExperimentConfig, {**to_dict(config), "learner": {"options": {"mode": "uniform"}}}),
                  log=lambda line: None)
    with pytest.raises(ConfigError, match="weight_sparsification cannot be budgeted in latency"):
        preflight(from_dict(ExperimentConfig, {**to_dict(config), "learner": {"name": "weight_sparsification"}}),
                  log=lambda line: None)
    assert built == []  # refused before any measurement
    lines: list[str] = []
    prepared = preflight(config, log=lines.append)
    assert len(built) == 1 and prepared.latency is not None
    assert prepared.latency.name == "onnxruntime int8, 1 thread, batch 1"
    # depth "auto" (channel pruning's default) under a latency budget: the table measures removed blocks too
    assert any(line.startswith("latency table: onnxruntime int8, 1 thread, batch 1 with depth on ") for line in lines)
    assert prepared.latency.predictor.blocks
    assert not (tmp_path / "runs").exists()  # preflight writes no run folder
    preflight(config, log=lines.append)
    assert len(built) == 2 and len(list(cache_dir.glob("table-*.json"))) == 1  # cached


def test_an_unreachable_speedup_is_refused_with_the_reachable_one(tmp_path, quick_target, capsys):
    argv = ["compress", "--set", f"storage.path={tmp_path / 'runs'}", "--set", "dataset.name=digits",
            "--set", "search.budget=latency", "--set", "search.target_speedup=100"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "search.target_speedup: got 100; the fastest reachable on onnxruntime int8" in error[0]
    assert error[0].endswith("as the latency table predicts") and not (tmp_path / "runs").exists()


def test_a_resumed_run_keeps_the_table_in_its_folder(tmp_path, quick_target, monkeypatch):
    config = _experiment(tmp_path)
    table = latency_table(small_cnn(), SHAPE, INT8, plan=QUICK_PLAN, folder=tmp_path / "tables")
    target.save_table(tmp_path, target.as_target_latency(table))
    monkeypatch.setattr(target, "latency_table", lambda *a, **k: pytest.fail("built again"))
    again = target.run_latency(tmp_path, config, small_cnn(), SHAPE, log=print)
    assert again.predictor.predict(table.sizes) == table.predict(table.sizes)
    assert again.reference_ms == table.reference_ms and again.name == "onnxruntime int8, 1 thread, batch 1"
    macs_config = from_dict(ExperimentConfig, {**to_dict(config), "search": {"budget": "macs"}})
    assert target.run_latency(tmp_path, macs_config, small_cnn(), SHAPE, log=print) is None


def test_the_artifacts_and_candidates_are_timed_side_by_side(tmp_path, quick_target):
    model = small_cnn()
    table = macs_table(model, SHAPE)
    space = PerLayerSpace("layer_keep_ratios", tuple(table.names), low=0.1, high=1.0,
                          budget=MacsBudget(0.5, table, round_to=1, min_ratio=0.1))
    files = {("baseline", "onnx"): export_artifact(model, SHAPE, TargetConfig(precision=Precision.FP32), tmp_path,
                                                   stem="baseline"),
             ("baseline", "onnx_int8"): export_artifact(model, SHAPE, INT8, tmp_path, stem="baseline"),
             ("compressed", "onnx_int8"): export_artifact(pruned_copy(model, SHAPE, [4, 8]), SHAPE, INT8,
                                                          tmp_path, stem="compressed")}
    reports = [{"model": m, "format": f, "path": str(p)} for (m, f), p in files.items()]
    trials = [{"trial_id": "a", LAYER_VALUES: [0.5, 0.5]}, {"trial_id": "b", LAYER_VALUES: [0.5, 0.5]},
              {"trial_id": "c", LAYER_VALUES: [1.0, 0.25]}, {"trial_id": "failed", LAYER_VALUES: None}]
    config = ExperimentConfig()
    record = target.measure_on_target(config, reports, model, SHAPE, space=space, trials=trials,
                                      chosen_values=[0.5, 0.5], latency=None, log=print)
    assert record["measured"] and record["candidates_measured"] == 2  # a and b kept the same counts
    assert trials[0][TARGET_MS] == trials[1][TARGET_MS] != trials[2][TARGET_MS]
    assert TARGET_MS not in trials[3] and PREDICTED_MS not in trials[0]  # no table: no prediction
    assert record["speedup"] == pytest.approx(record["reference_ms"] / record["compressed_ms"])
    assert record["target_speedup"] is None and record["cpu"]["model_name"]
    assert "achieved" in target_summary(record) and "target 2x" not in target_summary(record)
    achieved = record["speedup"]
    assert "short of the target" not in target_summary({**record, "target_speedup": achieved * 1.04})
    assert "20% short of the target" in target_summary({**record, "target_speedup": achieved / 0.8})

    without = [r for r in reports if r["format"] != "onnx_int8" or r["model"] != "compressed"]
    skipped = target.measure_on_target(config, without, model, SHAPE, space=space, trials=[], chosen_values=None,
                                       latency=None, log=print)
    assert skipped == {**skipped, "measured": False, "why": "no artifact compressed.onnx_int8 (export.formats)"}
    assert target_summary(skipped).startswith("target: not measured (no artifact compressed.onnx_int8")


def test_a_pareto_set_retrains_the_fastest_target_within_the_accuracy_loss():
    def trial(trial_id, speedup, accuracy, epoch=2):
        return {"trial_id": trial_id, TARGET_SPEEDUP: speedup, "score": accuracy, ACCURACY: accuracy, "epoch": epoch,
                "error": None}

    trials = [trial("a", 1.5, 0.90), trial("b", 1.5, 0.91), trial("c", 2.0, 0.905), trial("d", 3.0, 0.89),
              trial("e", 3.0, 0.95, epoch=1)]  # e: stopped early by ASHA, not a candidate
    lines: list[str] = []
    assert choose_across(trials, 2, 0.01, log=lines.append)["trial_id"] == "c"  # 3x's best is 2 pt behind
    assert choose_across(trials, 2, 0.03, log=lines.append)["trial_id"] == "d"
    assert "retraining 3x, the fastest within 0.03 of the most accurate (0.9100)" in lines[-1]
    failed = [trial("a", 1.5, 0.90), {**trial("x", 3.0, 0.99), "error": "RuntimeError: lost", "epoch": 0}]
    assert choose_across(failed, 2, 0.01, log=lines.append)["trial_id"] == "a"
    assert any("target 3x has no candidate" in line for line in lines)
    assert choose_across([trial("m", None, 0.5)], 2, 0.0, log=lines.append)["trial_id"] == "m"  # one search


@pytest.mark.ray
def test_a_pareto_set_of_latency_budgets_under_asha_meets_each_budget(ray_session, tmp_path, quick_target,
                                                                      capsys):
    """Two targets, two searches under ASHA (2 trials each), one table: every candidate meets its own target by
    the table's prediction; the retrain takes the rule's choice; the run ends timed on the target."""
    args = ["compress"]
    overrides = [*TINY, f"storage.path={tmp_path}", "export.formats=[onnx, onnx_int8]", "search.num_trials=2",
                 "search.fine_tune.epochs=2", "search.budget=latency", "target.precision=fp32",
                 "search.target_speedup=[1.1, 1.05]", "search.max_accuracy_loss=1"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    run = tmp_path / "tiny"
    results = json.loads((run / "results.json").read_text())
    latency = target.run_latency(run, from_dict(ExperimentConfig, results["config"]), None, SHAPE, log=print)
    trials = [t for t in results["search"]["trials"] if t["error"] is None]
    assert sorted(t[TARGET_SPEEDUP] for t in trials) == [1.05, 1.05, 1.1, 1.1]
    assert results["search"]["targets"] == [1.05, 1.1] and (run / "search-1.05x").is_dir()
    assert any(t["macs_ratio"] < 0.99 for t in trials)
    for trial in trials:  # the table's prediction of every scored candidate meets its own target's budget
        budget = LatencyBudget(1 / trial[TARGET_SPEEDUP], latency.predictor, latency.reference_ms, round_to=4,
                               min_ratio=0.2, blocks=latency.predictor.blocks)  # depth "auto": blocks searched too
        assert budget.cost(trial[LAYER_VALUES]) <= 1 / trial[TARGET_SPEEDUP] + 1e-9
        assert trial[PREDICTED_MS] == pytest.approx(budget.predicted_ms(trial[LAYER_VALUES]))
        assert trial[TARGET_MS] > 0
    # max_accuracy_loss 1: any accuracy is close enough, so the fastest target's best is retrained
    assert results["search"]["best"][TARGET_SPEEDUP] == 1.1 and "retraining 1.1x" in out
    section = results["target"]
    assert section["measured"] and section["target_speedup"] == 1.1 and section["precision"] == "fp32"
    assert section["predicted_speedup"] >= 1.1 - 1e-9 and section["table"]["median_error"] < 0.5
    assert "target 1.1x, achieved" in out
    report = (run / "report.md").read_text()
    assert "## Deployment target" in report and "target ms (measured)" in report and "| 1.05x |" in report


@pytest.mark.ray
@pytest.mark.slow  # 50 s: the default run keeps its 8 minutes; tests/training/test_candidate.py scores INT8 fast
def test_a_precision_search_under_asha_scores_int8_and_exports_its_fp32_layers(ray_session, tmp_path, quick_target,
                                                                              capsys):
    """``learner.options.mixed_precision`` on an INT8 target: every candidate meets the budget by the table's
    prediction with its FP32 layers counted, every epoch is scored on the INT8 artifact's accuracy, and the
    retrained model's INT8 file keeps the chosen FP32 layers (its manifest says which)."""
    from pf_ray.metrics import FP32_LAYERS, INT8_ACCURACY

    args = ["compress"]
    overrides = [*TINY, f"storage.path={tmp_path}", "export.formats=[onnx, onnx_int8]", "search.num_trials=3",
                 "search.budget=latency", "search.target_speedup=1.02", "learner.options.depth=false",
                 "learner.options.mixed_precision=true", "search.algorithm=random"]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    run = tmp_path / "tiny"
    results = json.loads((run / "results.json").read_text())
    latency = target.run_latency(run, from_dict(ExperimentConfig, results["config"]), None, SHAPE, log=print)
    assert latency.predictor.precision_layers
    trials = [t for t in results["search"]["trials"] if t["error"] is None]
    assert len(trials) == 3 and any(t[FP32_LAYERS] for t in trials)  # random proposals leave layers in FP32
    for trial in trials:
        budget = LatencyBudget(1 / 1.02, latency.predictor, latency.reference_ms, round_to=4, min_ratio=0.2,
                               layers=latency.predictor.precision_layers)
        assert budget.fp32(trial[LAYER_VALUES]) == tuple(trial[FP32_LAYERS] or ())
        assert budget.cost(trial[LAYER_VALUES]) <= 1 / 1.02 + 1e-9
        assert trial["score"] == trial[INT8_ACCURACY] and 0 <= trial[INT8_ACCURACY] <= 1
    chosen = results["search"]["best"]
    manifest = json.loads((run / "artifacts" / "manifest.json").read_text())
    int8 = [entry for entry in manifest["artifacts"] if entry["format"] == "onnx_int8"
            and entry["model"] == "compressed"]
    assert int8 and int8[0].get("fp32_layers", []) == (chosen[FP32_LAYERS] or [])
