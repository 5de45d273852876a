"""``pf-ray compress``: the stages in order, in one run folder."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pf_ray.candidate import search_space
from pf_ray.checkpoint import load_checkpoint, save_checkpoint
from pf_ray.config import ExperimentConfig
from pf_ray.data import DataBundle
from pf_ray.errors import AccuracyGuardError, SearchError
from pf_ray.export.pipeline import LearnerModel, export_and_verify, summary_table
from pf_ray.files import atomic_write, write_json
from pf_ray.launch.baseline import train_baseline
from pf_ray.launch.cluster import check_cluster, check_storage, cpu_count, ray_for
from pf_ray.launch.preflight import Prepared, preflight
from pf_ray.launch.retrain import retrain
from pf_ray.launch.search import choose_best, run_search, search_epochs
from pf_ray.launch.target import measure_on_target, run_latency, save_table
from pf_ray.learners.base import ProposesStart
from pf_ray.metrics import ACCURACY, LAYER_VALUES, MACS_RATIO, TARGET_SPEEDUP, model_stats
from pf_ray.ops.latency_budget import TargetLatency
from pf_ray.report import COMMAND_FILE, SPACE_FILE, target_summary, write_report
from pf_ray.search_space import PerLayerSpace
from pf_ray.spec import RunSpec
from pf_ray.storage import is_remote, search_dir_name, upload, write_run_config
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
        check_cluster(prepared.config, log=log)  # a remote cluster's GPUs, known only now
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
    from pf_ray.export.pipeline import guard_rows
    from pf_ray.export.verify import accuracy_guard

    spec, data = prepared.spec, prepared.data
    config = spec.experiment
    run_dir, run_storage = prepared.location
    try:
        baseline_path = prepared.baseline_path or train_baseline(config, data, log=log)
        baseline, baseline_info = load_checkpoint(baseline_path, expect_input_shape=data.input_shape,
                                                  expect_num_classes=data.num_classes, user_model=config.model.name)

        latency = prepared.latency or run_latency(run_dir, config, baseline, data.input_shape, log=log,
                                                  whole=tuple(getattr(spec.learner_config, "excluded_groups", ())))
        searched = search_stage(prepared, baseline, baseline_path, latency, log=log, resume=resume)
        chosen = searched.chosen if searched else spec  # without a search: the learner config as configured
        trials = searched.trials if searched else []
        best = searched.best if searched else None
        model = retrain(chosen, baseline_path, prepared.location, log=log)

        artifacts_dir = run_dir / "artifacts"
        save_checkpoint(artifacts_dir / "compressed.pt", model, model_config=config.model,
                        input_shape=data.input_shape, num_classes=data.num_classes,
                        extra={"learner": config.learner.name, "learner_config": to_dict(chosen.learner_config),
                               "dataset": to_dict(config.dataset)})
        torch.set_num_threads(config.resources.num_cpus or cpu_count())
        reports = export_and_verify({"baseline": baseline, "compressed": model}, data, config, artifacts_dir,
                                    log=log, learner_model=LearnerModel("compressed", chosen.build_learner()))
        target = measure_on_target(chosen.experiment, reports, baseline, data.input_shape,
                                   space=searched.space if searched else None, trials=trials,
                                   chosen_values=best.get(LAYER_VALUES) if best else None, latency=latency,
                                   log=log)
        results = {
            "command": command,
            "config": to_dict(config),
            "resumed": resume,
            "baseline": {"checkpoint": str(baseline_path), "sha256": baseline_info.sha256,
                         **model_stats(baseline, data.input_shape).__dict__},
            "search": searched.record() if searched else {"algorithm": None, "field": None, "value_label": None,
                                                           "layer_names": [], "starts": [], "trials": [],
                                                           "best": None},
            "learner_config": to_dict(chosen.learner_config),
            "skipped_groups": skipped_groups(prepared),
            "compressed": {"checkpoint": str(artifacts_dir / "compressed.pt"),
                           **model_stats(model, data.input_shape).__dict__},
            "artifacts": reports,
            "target": target,
            "accuracy_guard": {"max_accuracy_drop": config.export.max_accuracy_drop,
                               "failures": accuracy_guard(guard_rows(reports), config.export.max_accuracy_drop)},
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


@dataclass(frozen=True)
class Searched:
    """What the search stage found: every trial (of every target), the chosen one and its spec."""

    algorithm: str
    space: PerLayerSpace  # the chosen target's (every target's space has the same layers and rounding)
    targets: tuple[float | None, ...]  # the searches' target speed-ups (None: a MACs budget)
    starts: dict[float | None, list[tuple[float, ...]]]
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    chosen: RunSpec  # the retrain's: the best trial's learner config, its target's search config

    def record(self) -> dict[str, Any]:
        """results.json's search section."""
        several = len(self.targets) > 1
        return {"algorithm": self.algorithm, "field": self.space.field, "value_label": self.space.label,
                "layer_names": list(self.space.names),
                "starts": [list(v) for values in self.starts.values() for v in values],
                **({"targets": list(self.targets)} if several else {}), "trials": self.trials, "best": self.best}


def skipped_groups(prepared: Prepared) -> list[dict[str, str]]:
    """results.json's ``skipped_groups``: what the learner's check left uncompressed, with the reason (channel groups
    whose pruning breaks the model); a resumed run, not checked again, has the names from its learner config."""
    if prepared.skipped_groups:
        return [{"name": name, "reason": reason} for name, reason in prepared.skipped_groups]
    excluded = getattr(prepared.spec.learner_config, "excluded_groups", ())
    return [{"name": name, "reason": "left unpruned by the run's preflight (learner.options.excluded_groups)"}
            for name in excluded]


def search_stage(prepared: Prepared, baseline: torch.nn.Module, baseline_path: Path,
                 latency: TargetLatency | None, *, log: Log, resume: bool) -> Searched | None:
    """One search per target (one, unless ``search.target_speedup`` lists a Pareto set), then the choice; None
    for a learner (or mode) with nothing to search."""
    spec, data = prepared.spec, prepared.data
    run_dir, run_storage = prepared.location
    # the learner checks the table's blocks and FP32 layers against its space
    source = (lambda *, depth=False, precision=False: latency) if latency is not None else None
    searches = []
    for speedup, target_spec in spec.per_target():
        space = search_space(target_spec, baseline, data.input_shape, source)
        if space is None:
            return None
        searches.append((speedup, target_spec, space))
    write_json(run_dir / SPACE_FILE, {"field": searches[0][2].field, "value_label": searches[0][2].label,
                                      "layer_names": list(searches[0][2].names)})
    trials: list[dict[str, Any]] = []
    starts = {}
    for number, (speedup, target_spec, space) in enumerate(searches, 1):
        if len(searches) > 1:
            log(f"search: target {speedup:g}x ({number} of {len(searches)})")
        starts[speedup] = starting_proposals(target_spec, baseline, data, space, log=log)
        found = run_search(target_spec, space, baseline_path, run_storage, log=log, resume=resume,
                           starts=starts[speedup], name=search_dir_name(speedup, len(searches)))
        for trial in found:
            trial[TARGET_SPEEDUP] = speedup
        trials += found
    config = spec.experiment
    best = _chosen(run_dir, trials) if resume else None
    if best is None:
        best = choose_across(trials, search_epochs(config), config.search.max_accuracy_loss, log=log)
        write_json(run_dir / CHOICE_FILE, {"trial_id": best["trial_id"]})
        # in the storage now: a resume from another machine must retrain this candidate, whose
        # checkpoints the retrain is about to write there, whatever ties the search has
        upload(run_dir, run_storage)
    else:  # the retrain may have checkpointed that candidate: continue it, whatever ties the search had
        log(f"search: keeping the candidate chosen before the interruption ({best['trial_id']})")
    _, target_spec, space = next(s for s in searches if s[0] == best[TARGET_SPEEDUP])
    chosen = target_spec.with_learner_config(space.apply(target_spec.learner_config, best["proposal"]))
    log(f"search: best trial {best['trial_id']}: validation accuracy {best[ACCURACY]:.4f}, "
        f"{best[MACS_RATIO]:.3f} of the baseline MACs; {space.label} per layer "
        f"{_short(best.get(LAYER_VALUES))} (budget use {_budget_use(space, best)})")
    return Searched(config.search.algorithm.value, space, tuple(s[0] for s in searches), starts, trials, best,
                    chosen)


def choose_across(trials: list[dict[str, Any]], max_epochs: int, max_accuracy_loss: float, *,
                  log: Log) -> dict[str, Any]:
    """The best trial of one search; of several targets (a Pareto set), the fastest target's best trial whose
    validation accuracy is within ``max_accuracy_loss`` of the most accurate target's best."""
    targets = sorted({trial[TARGET_SPEEDUP] for trial in trials}, key=lambda s: (s is None, s))
    if len(targets) == 1:
        return choose_best(trials, max_epochs)
    bests = {}
    for speedup in targets:
        try:
            bests[speedup] = choose_best([t for t in trials if t[TARGET_SPEEDUP] == speedup], max_epochs)
        except SearchError as error:
            log(f"search: target {speedup:g}x has no candidate ({error})")
    if not bests:
        raise SearchError("every trial of every target failed")
    top = max(best[ACCURACY] for best in bests.values())
    fastest = max(s for s, best in bests.items() if best[ACCURACY] >= top - max_accuracy_loss)
    log("search: best per target: " + ", ".join(f"{s:g}x {b[ACCURACY]:.4f}" for s, b in bests.items())
        + f"; retraining {fastest:g}x, the fastest within {max_accuracy_loss:g} of the most accurate ({top:.4f})")
    return bests[fastest]


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
