"""``pf-ray compress``: the stages in order, in one run folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pf_ray.candidate import search_space
from pf_ray.checkpoint import load_checkpoint, save_checkpoint
from pf_ray.config import ExperimentConfig
from pf_ray.data import DataBundle
from pf_ray.errors import AccuracyGuardError
from pf_ray.export.pipeline import LearnerModel, export_and_verify, summary_table
from pf_ray.files import atomic_write, write_json
from pf_ray.launch.baseline import train_baseline
from pf_ray.launch.cluster import check_storage, cpu_count, ray_for
from pf_ray.launch.preflight import Prepared, preflight
from pf_ray.launch.retrain import retrain
from pf_ray.launch.search import choose_best, run_search, search_epochs
from pf_ray.launch.target import measure_on_target, run_latency, save_table
from pf_ray.learners.base import ProposesStart
from pf_ray.metrics import ACCURACY, LAYER_VALUES, MACS_RATIO, model_stats
from pf_ray.report import COMMAND_FILE, SPACE_FILE, target_summary, write_report
from pf_ray.search_space import PerLayerSpace
from pf_ray.spec import RunSpec
from pf_ray.storage import is_remote, upload, write_run_config
from pf_ray.strict import to_dict

Log = Callable[[str], None]

CHOICE_FILE = "chosen_trial.json"  # the search's winner, written before the retrain starts


def compress(config: ExperimentConfig, *, log: Log = print, command: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the results dict (also written to ``results.json``)."""
    started = time.time()
    prepared = preflight(config, log=log)
    run_dir, run_storage = prepared.location
    with ray_for(prepared.config, log=log):
        check_storage(prepared.config)
        run_dir.mkdir(parents=True)
        write_run_config(run_dir, to_dict(prepared.config))
        if command:
            atomic_write(run_dir / COMMAND_FILE, command + "\n")
        if prepared.latency is not None:  # the budget this run projects onto, for a resume anywhere
            save_table(run_dir, prepared.latency)
        upload(run_dir, run_storage)
        log(f"run folder: {run_dir}" + (f" (uploaded to {run_storage})" if run_storage != str(run_dir) else ""))
        return run_stages(prepared, log=log, command=command, started=started, resume=False)


def run_stages(prepared: Prepared, *, log: Log, command: str | None, started: float, resume: bool
               ) -> dict[str, Any]:
    """Baseline -> search -> retrain -> export -> verify -> results.json and report, in an existing run folder
    (Ray already connected); the run folder is uploaded to its storage at the end if that is remote."""
    from pf_ray.export.verify import accuracy_guard

    spec, data = prepared.spec, prepared.data
    config = spec.experiment
    run_dir, run_storage = prepared.location
    try:
        baseline_path = prepared.baseline_path or train_baseline(config, data, log=log)
        baseline, baseline_info = load_checkpoint(baseline_path, expect_input_shape=data.input_shape,
                                                  expect_num_classes=data.num_classes, user_model=config.model.name)

        latency = prepared.latency or run_latency(run_dir, config, baseline, data.input_shape, log=log)
        space = search_space(spec, baseline, data.input_shape, (lambda: latency) if latency is not None else None)
        trials: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        chosen = spec  # without a search: the learner config as configured
        starts: list[tuple[float, ...]] = []
        if space is not None:
            write_json(run_dir / SPACE_FILE, {"field": space.field, "value_label": space.label,
                                              "layer_names": list(space.names)})
            starts = starting_proposals(spec, baseline, data, space, log=log)
            trials = run_search(spec, space, baseline_path, run_storage, log=log, resume=resume, starts=starts)
            best = _chosen(run_dir, trials) if resume else None
            if best is None:
                best = choose_best(trials, search_epochs(config))
                write_json(run_dir / CHOICE_FILE, {"trial_id": best["trial_id"]})
                # in the storage now: a resume from another machine must retrain this candidate, whose
                # checkpoints the retrain is about to write there, whatever ties the search has
                upload(run_dir, run_storage)
            else:  # the retrain may have checkpointed that candidate: continue it, whatever ties the search had
                log(f"search: keeping the candidate chosen before the interruption ({best['trial_id']})")
            chosen = spec.with_learner_config(space.apply(spec.learner_config, best["proposal"]))
            log(f"search: best trial {best['trial_id']}: validation accuracy {best[ACCURACY]:.4f}, "
                f"{best[MACS_RATIO]:.3f} of the baseline MACs; {space.label} per layer "
                f"{_short(best.get(LAYER_VALUES))} (budget use {_budget_use(space, best)})")
        model = retrain(chosen, baseline_path, prepared.location, log=log)

        artifacts_dir = run_dir / "artifacts"
        save_checkpoint(artifacts_dir / "compressed.pt", model, model_config=config.model,
                        input_shape=data.input_shape, num_classes=data.num_classes,
                        extra={"learner": config.learner.name, "learner_config": to_dict(chosen.learner_config),
                               "dataset": to_dict(config.dataset)})
        torch.set_num_threads(config.resources.num_cpus or cpu_count())
        reports = export_and_verify({"baseline": baseline, "compressed": model}, data, config, artifacts_dir,
                                    log=log, learner_model=LearnerModel("compressed", chosen.build_learner()))
        target = measure_on_target(config, reports, baseline, data.input_shape, space=space, trials=trials,
                                   chosen_values=best.get(LAYER_VALUES) if best else None, latency=latency,
                                   log=log)
        results = {
            "command": command,
            "config": to_dict(config),
            "resumed": resume,
            "baseline": {"checkpoint": str(baseline_path), "sha256": baseline_info.sha256,
                         **model_stats(baseline, data.input_shape).__dict__},
            "search": {"algorithm": config.search.algorithm.value if space else None,
                       "field": space.field if space else None, "value_label": space.label if space else None,
                       "layer_names": list(space.names) if space else [], "starts": [list(v) for v in starts],
                       "trials": trials, "best": best},
            "learner_config": to_dict(chosen.learner_config),
            "compressed": {"checkpoint": str(artifacts_dir / "compressed.pt"),
                           **model_stats(model, data.input_shape).__dict__},
            "artifacts": reports,
            "target": target,
            "accuracy_guard": {"max_accuracy_drop": config.export.max_accuracy_drop,
                               "failures": accuracy_guard(reports, config.export.max_accuracy_drop)},
            "seconds": round(time.time() - started, 1),
        }
        write_json(run_dir / "results.json", results)
        report_md, report_html = write_report(run_dir)
        if results["accuracy_guard"]["failures"]:
            raise AccuracyGuardError("; ".join(results["accuracy_guard"]["failures"]))
        log(summary_table(results, config))
        log(target_summary(target))
        log(f"artifacts: {artifacts_dir}")
        log(f"results:   {run_dir / 'results.json'}")
        log(f"report:    {report_html} (and {report_md.name})")
        return results
    except BaseException:
        log(f"run failed; partial run folder left for inspection (`pf-ray resume {run_dir}` continues it)")
        raise
    finally:
        if is_remote(run_storage):  # the run folder, finished or not, next to its search and retrain
            upload(run_dir, run_storage)
            log(f"uploaded {run_dir} to {run_storage}")


def starting_proposals(spec: RunSpec, baseline: torch.nn.Module, data: DataBundle, space: PerLayerSpace, *,
                       log: Log) -> list[tuple[float, ...]]:
    """The learner's heuristic allocation under the budget (channel pruning: the knapsack), which every searcher
    proposes right after the uniform candidate; none for a learner without one."""
    learner = spec.build_learner()
    if not isinstance(learner, ProposesStart):
        return []
    start = learner.starting_proposal(baseline, data, space)
    log(f"search: the knapsack start: {space.label} per layer {_short(start)} (budget use "
        f"{space.budget.cost(start):.3f} of {space.budget.target:.3f})")
    return [start]


def _short(values: Any) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]" if values else "-"


def _budget_use(space: PerLayerSpace, trial: dict[str, Any]) -> str:
    """``cost / target`` of a trial's projected per-layer values, e.g. "0.200 of 0.200"."""
    values = trial.get(LAYER_VALUES)
    if space.budget is None or not values:
        return "-"
    return f"{space.budget.cost(values):.3f} of {space.budget.target:.3f}"


def _chosen(run_dir: Path, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial record an interrupted run had chosen for its retrain (None if it had not chosen yet)."""
    path = run_dir / CHOICE_FILE
    if not path.is_file():
        return None
    chosen = json.loads(path.read_text())["trial_id"]
    return next((trial for trial in trials if trial["trial_id"] == chosen), None)
