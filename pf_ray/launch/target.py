"""The deployment target on the run side (``target`` in the config): the latency table a latency budget projects
onto, and the measurement that ends every run.

- The table (``pf_ray.latency``) is built in preflight, only when a learner asks for it (``search.budget:
  latency``), cached per CPU, and kept in the run folder (``latency_table.json``): a resumed run, here or on
  another machine, projects onto the same budget.
- After the export, the shipped artifacts are timed side by side on the target (the baseline in FP32 ONNX Runtime,
  the reference of every speed-up; the baseline and the compressed model on the target), with every scored
  search candidate exported to the target's artifact and timed in the same rounds: ``results.json``'s ``target``
  section, and each trial's ``target_ms`` (and ``predicted_ms``, the table's figure), for the report.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from pf_ray.config import Budget, ExperimentConfig, Precision, Runtime, TargetConfig
from pf_ray.errors import ConfigError
from pf_ray.files import write_json
from pf_ray.latency import LatencyTable, TablePlan, latency_table, plan_for, pruned_copy
from pf_ray.latency.cache import cache_dir, cpu_summary
from pf_ray.latency.measure import Timing, export_artifact, open_artifact, time_sessions
from pf_ray.metrics import LAYER_VALUES, PREDICTED_MS, TARGET_MS
from pf_ray.ops.latency_budget import TargetLatency
from pf_ray.search_space import KeepsChannels, PerLayerSpace

Log = Callable[[str], None]

TABLE_FILE = "latency_table.json"  # in the run folder
TABLE_PLAN: TablePlan | None = None  # what a table measures: None = pf_ray.latency.plan_for(target) (tests: smaller)
TIMING = Timing(warmup=10, repeats=50, rounds=7)  # the end-of-run measurement: every model in every round
# The export format whose artifact runs on each target (pf_ray.export's names).
TARGET_FORMATS = {(Runtime.ONNXRUNTIME, Precision.FP32): "onnx", (Runtime.ONNXRUNTIME, Precision.INT8): "onnx_int8",
                  (Runtime.EXECUTORCH, Precision.FP32): "pte", (Runtime.EXECUTORCH, Precision.INT8): "pte_int8"}


def target_name(target: TargetConfig) -> str:
    """e.g. "onnxruntime int8, 1 thread, batch 1"."""
    return (f"{target.runtime} {target.precision}, {target.threads} thread{'s' if target.threads > 1 else ''}, "
            f"batch {target.batch_size}")


def target_format(target: TargetConfig) -> str:
    return TARGET_FORMATS[(target.runtime, target.precision)]


def check_target(config: ExperimentConfig) -> None:
    """A latency budget needs the target's artifact among the exported formats (the run ends by timing it)."""
    needed = target_format(config.target)
    if config.search.budget is Budget.LATENCY and needed not in config.export.formats:
        raise ConfigError(f"export.formats: got {list(config.export.formats)}; search.budget latency on "
                          f"{target_name(config.target)} needs {needed!r} among them (the run measures that artifact)")


@dataclass
class TableSource:
    """``LatencySource`` for a learner's ``search_space``: the target's table, built (or read from the cache) the
    first time it is asked for, then the same one; asked with ``depth``, a table that also measured removed
    residual blocks (``TablePlan.depth``); with ``precision``, one that also measured layers left in FP32
    (``TablePlan.precision``, INT8 targets)."""

    model: nn.Module
    input_shape: tuple[int, int, int]
    target: TargetConfig
    log: Log
    whole: tuple[str, ...] = ()  # channel groups timed unpruned (channel pruning's excluded_groups)
    built: TargetLatency | None = field(default=None, init=False)

    def __call__(self, *, depth: bool = False, precision: bool = False) -> TargetLatency:
        if precision and self.target.precision is not Precision.INT8:
            raise ConfigError(f"learner.options.mixed_precision: true needs an INT8 deployment target (layers left "
                              f"in FP32 inside an INT8 model); got target.precision {self.target.precision}")
        built = self.built.predictor if self.built is not None else None
        if (built is None or (depth and not getattr(built, "blocks", ()))
                or (precision and not getattr(built, "precision_layers", ()))):
            cpu = cpu_summary()
            extra = " and ".join(what for what, on in (("depth", depth), ("FP32 layers", precision)) if on)
            self.log(f"latency table: {target_name(self.target)}{f' with {extra}' if extra else ''} on "
                     f"{cpu['model_name']} ({' '.join(cpu['kernel_flags']) or 'no listed kernel flags'}); cached in "
                     f"{cache_dir()}")
            plan = replace(TABLE_PLAN or plan_for(self.target), depth=depth, precision=precision)
            table = latency_table(self.model, self.input_shape, self.target, plan=plan, log=self.log,
                                  whole=self.whole)
            self.built = as_target_latency(table)
        return self.built


def as_target_latency(table: LatencyTable) -> TargetLatency:
    target = TargetConfig(runtime=Runtime(table.target["runtime"]), precision=Precision(table.target["precision"]),
                          threads=table.target["threads"], batch_size=table.target["batch_size"])
    return TargetLatency(table, table.reference_ms, target_name(target), step=table.rounding_step())


def save_table(run_dir: Path, latency: TargetLatency) -> None:
    table = latency.predictor
    assert isinstance(table, LatencyTable), type(table)
    write_json(run_dir / TABLE_FILE, table.to_dict())


def run_latency(run_dir: Path, config: ExperimentConfig, model: nn.Module, input_shape: tuple[int, int, int], *,
                log: Log, whole: tuple[str, ...] = ()) -> TargetLatency | None:
    """The run's latency table for a resumed run: the one in its folder (the budget it started with), else built
    again (and kept there), with the channel groups ``whole`` timed unpruned (channel pruning's excluded groups).
    None without a latency budget."""
    if config.search.budget is not Budget.LATENCY:
        return None
    path = run_dir / TABLE_FILE
    if path.is_file():
        try:
            return as_target_latency(LatencyTable.from_dict(json.loads(path.read_text())))
        except (ValueError, KeyError, TypeError) as error:
            log(f"latency table: {path} cannot be read ({error}); building it again")
    # channel_pruning's depth search (depth true, or "auto" under this latency budget): a table with removed blocks
    depth = config.learner.options.get("depth", "auto") is not False
    precision = config.learner.options.get("mixed_precision", False) is True
    latency = TableSource(model, input_shape, config.target, log, whole)(depth=depth, precision=precision)
    save_table(run_dir, latency)
    return latency


def measure_on_target(config: ExperimentConfig, reports: Sequence[dict[str, Any]], baseline: nn.Module,
                      input_shape: tuple[int, int, int], *, space: PerLayerSpace | None,
                      trials: Sequence[dict[str, Any]], chosen_values: Sequence[float] | None,
                      latency: TargetLatency | None, log: Log) -> dict[str, Any]:
    """The baseline in FP32 ONNX Runtime (the reference), the baseline and the compressed model on the target (the
    artifacts in ``reports``) and every scored candidate of a channel-pruning search (its architecture exported
    to the target), timed side by side. Adds ``target_ms`` (and ``predicted_ms``) to the trial records; returns
    results.json's ``target`` section."""
    target = config.target
    fmt = target_format(target)
    paths = {(row["model"], row["format"]): row["path"] for row in reports}
    record: dict[str, Any] = {"runtime": str(target.runtime), "precision": str(target.precision),
                              "threads": target.threads, "batch_size": target.batch_size, "format": fmt,
                              "cpu": cpu_summary(), "timing": asdict(TIMING)}
    missing = [f"{model}.{name}" for model, name in (("baseline", "onnx"), ("baseline", fmt), ("compressed", fmt))
               if (model, name) not in paths]
    if missing:
        log(f"target: {target_name(target)} not measured: export.formats wrote no {', '.join(missing)}")
        return {**record, "measured": False, "why": f"no artifact {', '.join(missing)} (export.formats)"}
    started = time.perf_counter()
    budget = space.budget if space is not None else None
    counts = {trial["trial_id"]: (tuple(budget.counts(trial[LAYER_VALUES])), budget.removed(trial[LAYER_VALUES]),
                                  budget.fp32(trial[LAYER_VALUES]))
              for trial in trials if isinstance(budget, KeepsChannels) and trial.get(LAYER_VALUES)}
    architectures = list(dict.fromkeys(counts.values()))  # trials that kept the same counts are timed once
    log(f"target: timing the baseline, the compressed model and {len(architectures)} search candidate"
        f"{'s' if len(architectures) != 1 else ''} side by side on {target_name(target)} ({TIMING.rounds} rounds)")
    with tempfile.TemporaryDirectory(prefix="pf_ray_target_") as work:
        files = [paths[("baseline", "onnx")], paths[("baseline", fmt)], paths[("compressed", fmt)]]
        files += [candidate_artifact(baseline, input_shape, target, work, f"candidate{index}", *architecture)
                  for index, architecture in enumerate(architectures)]
        sessions = [open_artifact(path, target.threads) for path in files]
        timed = [t["median_ms"] for t in time_sessions(sessions, input_shape, target.batch_size, TIMING)]
        del sessions
    reference, baseline_ms, compressed_ms, *candidates = timed
    by_counts = dict(zip(architectures, candidates, strict=True))
    for trial in trials:
        if trial["trial_id"] in counts:
            trial[TARGET_MS] = by_counts[counts[trial["trial_id"]]]
            if latency is not None:
                kept, removed, fp32 = counts[trial["trial_id"]]
                trial[PREDICTED_MS] = latency.predictor.predict(kept, removed, *([fp32] if fp32 else []))
    record.update({"measured": True, "reference_ms": reference, "baseline_ms": baseline_ms,
                   "compressed_ms": compressed_ms, "speedup": reference / compressed_ms,
                   "baseline_speedup": reference / baseline_ms,
                   "target_speedup": config.search.target_speedup if latency is not None else None,
                   "candidates_measured": len(architectures), "seconds": round(time.perf_counter() - started, 1)})
    if latency is not None and isinstance(budget, KeepsChannels) and chosen_values:
        fp32 = budget.fp32(chosen_values)
        predicted = latency.predictor.predict(budget.counts(chosen_values), budget.removed(chosen_values),
                                              *([fp32] if fp32 else []))
        record["predicted_ms"] = predicted  # on the table's own scale: its reference was timed when it was built
        record["predicted_speedup"] = latency.reference_ms / predicted
        table = latency.predictor
        if isinstance(table, LatencyTable):
            record["table"] = {"median_error": table.median_error, "max_error": table.max_error,
                               "step": table.step, "reference_ms": table.reference_ms,
                               "features": table.features.describe(), "build_seconds": table.build_seconds}
    return record


def candidate_artifact(baseline: nn.Module, input_shape: tuple[int, int, int], target: TargetConfig, folder: str,
                       stem: str, kept: Sequence[int], removed: Sequence[str], fp32: Sequence[str]) -> Path:
    """A search candidate's architecture (weights do not change latency) as the target's artifact: the baseline
    pruned to ``kept`` with ``removed`` blocks gone, the ``fp32`` layers (those still there) left in FP32."""
    model = pruned_copy(baseline, input_shape, kept, removed=removed)
    present = {name for name, _ in model.named_modules()}
    return export_artifact(model, input_shape, target, folder, stem=stem,
                           fp32_layers=[name for name in fp32 if name in present])
