"""A run report people want to read (report.md + one self-contained report.html), rebuilt from a run folder.

A finished run is read from ``results.json``; an interrupted one from Ray Tune's trial folders under
``search/``, so a run stopped half-way can still be looked at. matplotlib is imported only when plotting, and
through its object API on the Agg canvas, so ``import pf_ray.report`` is cheap and no global backend changes.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pf_ray.candidate import best_trial
from pf_ray.errors import ConfigError, PfRayError
from pf_ray.files import atomic_write
from pf_ray.metrics import (
    ACCURACY,
    LATENCY_MS,
    LAYER_VALUES,
    MACS_RATIO,
    PREDICTED_MS,
    PROXY_ACCURACY,
    SCORE,
    TARGET_MS,
    TARGET_SPEEDUP,
    TRIAL_METRICS,
    finite_number,
)
from pf_ray.report_render import FILES_DIR, Block, html_page, markdown
from pf_ray.storage import RUN_CONFIG, is_remote, is_search_dir, join_uri, read_run_config, search_dir_target

COMMAND_FILE = "command.txt"  # the command that started the run (written by `pf-ray compress`)
# The searched space (its config field, what a value is, the layer names), written before the search starts: how
# the report of an interrupted run labels its per-layer values (a finished run has them in results.json).
SPACE_FILE = "search_space.json"
SHORT_OF_TARGET = 0.05  # a measured speed-up this far below its target is called out (timing noise: ~2%)
# What an interrupted run keeps of a trial's last result.json line: a finished run's trial keys, and the time.
TRIAL_KEYS = (*TRIAL_METRICS, "timestamp")



@dataclass
class RunRecord:
    """What a report shows, the same whether it came from results.json or from the trial folders."""

    run_dir: Path
    finished: bool  # results.json exists: the pipeline ran to the end
    config: dict[str, Any]
    config_text: str  # config.yaml verbatim: the exact experiment
    command: str  # how to run it again
    trials: list[dict[str, Any]]  # results.json's trial records, ordered by timestamp (else by trial id)
    best: dict[str, Any] | None  # the chosen trial (an interrupted run: the best so far)
    layer_names: list[str]
    chosen_values: list[float]  # per-layer values of the final model (or of the best trial); may be empty
    value_label: str  # what one per-layer value is: "keep ratio", "sparsity", "bits"
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    seconds: float | None = None
    guard_failures: list[str] = field(default_factory=list)  # artifacts that lost too much accuracy on export
    target: dict[str, Any] = field(default_factory=dict)  # results.json's target section (measured on it)
    # what the learner's safety check left uncompressed, with why (channel pruning: groups that pruning would break)
    skipped_groups: list[dict[str, Any]] = field(default_factory=list)


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a run folder: results.json when the run finished, else the search rebuilt from search/*/."""
    run_dir = Path(run_dir)
    run_config = read_run_config(run_dir)
    config, config_text, config_path = run_config.data, run_config.text, run_dir / RUN_CONFIG
    command_path = run_dir / COMMAND_FILE
    command = command_path.read_text().strip() if command_path.is_file() else f"pf-ray compress {config_path}"
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        storage_path = str((config.get("storage") or {}).get("path") or "")
        with tempfile.TemporaryDirectory() as directory:
            searches = sorted(p for p in run_dir.glob("search*") if p.is_dir() and is_search_dir(p.name))
            if is_remote(storage_path) and not searches:  # the searches are in the remote storage
                searches = _fetch_searches(join_uri(storage_path, run_dir.name), Path(directory))
            trials, names = [], []
            for folder in searches:
                found, found_names = _trials_from_tune(folder)
                speedup = search_dir_target(folder.name)
                trials += [{**trial, TARGET_SPEEDUP: speedup} for trial in found]
                names = names or found_names
        space = _read_json(run_dir / SPACE_FILE) if (run_dir / SPACE_FILE).is_file() else {}
        best = best_trial(trials, _max_epochs(config))
        chosen = (best or {}).get(LAYER_VALUES) or (best or {}).get("proposal") or []
        return RunRecord(run_dir, False, config, config_text, command, _ordered(trials), best,
                         list(space.get("layer_names") or names), [float(v) for v in chosen],
                         space.get("value_label") or "value")
    results = _read_json(results_path)
    search = results.get("search") or {}
    best = search.get("best")
    chosen = (results.get("learner_config") or {}).get(search.get("field") or "") or (best or {}).get(LAYER_VALUES)
    recorded = (best or {}).get(LAYER_VALUES) or []
    if len(recorded) == len(search.get("layer_names") or []) != len(chosen or []):
        chosen = recorded  # a depth search: the trial's vector also holds its block values (PerLayerSpace.recorded)
    return RunRecord(run_dir, True, config, config_text, results.get("command") or command,
                     _ordered(list(search.get("trials") or [])), best, list(search.get("layer_names") or []),
                     [float(v) for v in chosen or []], search.get("value_label") or "value",
                     list(results.get("artifacts") or []), results.get("seconds"),
                     list((results.get("accuracy_guard") or {}).get("failures") or []),
                     dict(results.get("target") or {}), list(results.get("skipped_groups") or []))


def target_summary(target: dict[str, Any]) -> str:
    """A run's last word on speed (results.json's ``target`` section): target vs achieved speed-up, measured on the
    deployment target side by side with the FP32 ONNX Runtime original."""
    if not target.get("measured"):
        return f"target: not measured ({target.get('why', 'no target section')})"
    threads = target["threads"]
    where = (f"{target['runtime']} {target['precision']}, {threads} thread{'s' if threads > 1 else ''}, "
             f"batch {target['batch_size']}")
    cpu = target["cpu"]
    wanted = f"target {target['target_speedup']:g}x, " if target.get("target_speedup") else ""
    predicted = (f"; the latency table predicted {target['predicted_speedup']:.2f}x"
                 if target.get("predicted_speedup") else "")
    short = (f". {1 - target['speedup'] / target['target_speedup']:.0%} short of the target: the table's prediction "
             "was off for this model" if (target.get("target_speedup") or 0) * (1 - SHORT_OF_TARGET) > target["speedup"]
             else "")
    return (f"target ({where}; {cpu['model_name']}, {' '.join(cpu['kernel_flags'])}): {wanted}achieved "
            f"{target['speedup']:.2f}x over the FP32 ONNX Runtime original ({target['reference_ms']:.3f} -> "
            f"{target['compressed_ms']:.3f} ms; the original on the target alone: "
            f"{target['baseline_speedup']:.2f}x){predicted}{short}")


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md (+ report_files/*.png) and a self-contained report.html; returns their paths."""
    record = load_run(run_dir)
    figures = _figures(record)
    (record.run_dir / FILES_DIR).mkdir(exist_ok=True)
    for name, png in figures.items():
        atomic_write(record.run_dir / FILES_DIR / name, png)
    blocks = _blocks(record, figures)
    markdown_path, html_path = record.run_dir / "report.md", record.run_dir / "report.html"
    atomic_write(markdown_path, markdown(blocks).encode())
    atomic_write(html_path, html_page(blocks, figures).encode())
    return markdown_path, html_path


# Reading.


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot be read as JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: got {type(data).__name__}; expected a JSON object")
    return data


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Tune's result.json: one JSON object per line; a line cut short by an interruption is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [row for row in rows if isinstance(row, dict)]


def _trials_from_tune(search_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One results.json-style record per trial folder (a folder with params.json or result.json)."""
    trials: list[dict[str, Any]] = []
    names: list[str] = []
    for folder in sorted(p for p in search_dir.glob("*") if p.is_dir()):
        if not ((folder / "params.json").is_file() or (folder / "result.json").is_file()):
            continue  # not a trial: Tune's own state or checkpoints
        try:
            params = _read_json(folder / "params.json")
        except ConfigError:  # missing or cut short: the trial is still listed, without its proposal
            params = {}
        keys = sorted(k for k in params if k.startswith("layer_"))
        names = names or keys
        lines = _json_lines(folder / "result.json")
        last = lines[-1] if lines else {}
        error_file = folder / "error.txt"  # Tune writes the traceback of a failed trial here
        error = error_file.read_text().strip().splitlines()[-1:] if error_file.is_file() else []
        trial = {key: last.get(key) for key in TRIAL_KEYS}
        trial.update(trial_id=str(last.get("trial_id") or folder.name),
                     proposal=[v for v in map(finite_number, (params[k] for k in keys)) if v is not None],
                     error=(error[0][:500] if error else None) or (None if lines else "no result reported"))
        trials.append(trial)
    return trials, names


def _fetch_searches(run_uri: str, into: Path) -> list[Path]:
    """Copy the files ``_trials_from_tune`` reads (each trial's params.json, result.json, error.txt) of a remote
    run's searches (``search/``, or one ``search-<target>x/`` per target) into ``into``; nothing else (checkpoints,
    Tune's pickled state) is fetched. Returns the local copies of the search folders."""
    import pyarrow.fs

    def folders(filesystem: pyarrow.fs.FileSystem, root: str) -> list[pyarrow.fs.FileInfo]:
        selector = pyarrow.fs.FileSelector(root, allow_not_found=True)
        return [info for info in filesystem.get_file_info(selector) if info.type == pyarrow.fs.FileType.Directory]

    filesystem, run_root = pyarrow.fs.FileSystem.from_uri(run_uri)
    searches = []
    for search in folders(filesystem, run_root):
        if not is_search_dir(search.base_name):
            continue
        searches.append(into / search.base_name)
        for folder in folders(filesystem, search.path):
            for name in ("params.json", "result.json", "error.txt"):
                source = f"{folder.path}/{name}"
                if filesystem.get_file_info(source).is_file:
                    target = into / search.base_name / folder.base_name / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with filesystem.open_input_stream(source) as stream:
                        target.write_bytes(stream.read())
    return sorted(searches)


def _ordered(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By timestamp when every trial has one; else by trial id (Tune numbers trials in creation order)."""
    if trials and all(finite_number(t.get("timestamp")) is not None for t in trials):
        return sorted(trials, key=lambda t: (finite_number(t["timestamp"]), str(t["trial_id"])))
    return sorted(trials, key=lambda t: str(t["trial_id"]))


def _max_epochs(config: dict[str, Any]) -> int:
    search = config.get("search") or {}
    return 1 if search.get("scoring") == "proxy" else int((search.get("fine_tune") or {}).get("epochs") or 1)


def _accuracy(trial: dict[str, Any]) -> float | None:
    value = finite_number(trial.get(ACCURACY))
    return value if value is not None else finite_number(trial.get(PROXY_ACCURACY))


# Plots.


def _figure(width: float, height: float, panels: int = 1) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PfRayError("the run report's plots need matplotlib: pip install matplotlib") from None

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})  # no version stamp: stable bytes
    return buffer.getvalue()


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both cost (x, lower is better) and accuracy (y, higher is better)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def _pareto_png(record: RunRecord) -> bytes | None:
    axes_keys = [(MACS_RATIO, "MACs ratio (of the baseline)")]
    if any(finite_number(t.get(LATENCY_MS)) is not None for t in record.trials):
        axes_keys.append((LATENCY_MS, "latency (ms)"))
    if any(finite_number(t.get(TARGET_MS)) is not None for t in record.trials):
        where = " ".join(str(record.target.get(key, "")) for key in ("runtime", "precision")).strip()
        axes_keys.append((TARGET_MS, f"latency on the target (ms, {where or 'measured'})"))
    figure, axes = _figure(5.5 * len(axes_keys), 4.2, len(axes_keys))
    plotted = False
    for ax, (key, label) in zip(axes, axes_keys, strict=True):
        points = [(finite_number(t.get(key)), _accuracy(t)) for t in record.trials]
        points = [(x, y) for x, y in points if x is not None and y is not None]
        if not points:
            continue
        plotted = True
        ax.scatter(*zip(*points, strict=True), s=22, color="0.55", label="trials")
        ax.step(*zip(*_pareto_front(points), strict=True), where="post", color="C0", label="Pareto front")
        best_x = finite_number((record.best or {}).get(key))
        best_y = _accuracy(record.best or {})
        if best_x is not None and best_y is not None:
            ax.scatter([best_x], [best_y], marker="*", s=220, color="C3", zorder=3,
                       label="chosen" if record.finished else "best so far")
        ax.set(xlabel=label, ylabel="validation accuracy", title=f"accuracy vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    return _png(figure) if plotted else None


def _layer_names(record: RunRecord) -> list[str]:
    if len(record.layer_names) == len(record.chosen_values):
        return record.layer_names
    return [f"layer {i}" for i in range(len(record.chosen_values))]


def _layers_png(record: RunRecord) -> bytes:
    values, names = record.chosen_values, _layer_names(record)
    figure, (ax,) = _figure(max(6.0, 0.4 * len(values) + 2), 4.2)
    ax.bar(range(len(values)), values, color="C0")
    ax.set_xticks(range(len(values)), names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel=record.value_label, title=f"chosen {record.value_label} per layer")
    ax.grid(axis="y", alpha=0.3)
    return _png(figure)


def _progress_png(record: RunRecord) -> bytes | None:
    scores = [finite_number(t.get(SCORE)) for t in record.trials]
    points = [(i + 1, s) for i, s in enumerate(scores) if s is not None]
    if not points:
        return None
    steps = [(i, max(s for _, s in points[:k + 1])) for k, (i, _) in enumerate(points)]
    steps.append((len(scores), steps[-1][1]))  # the best-so-far line runs to the last trial, failed or not
    figure, (ax,) = _figure(6.0, 3.8)
    ax.scatter(*zip(*points, strict=True), s=22, color="0.55", label="trial score", zorder=3)
    ax.step(*zip(*steps, strict=True), where="post", color="C0", label="best so far")
    failed = [i + 1 for i, s in enumerate(scores) if s is None]
    if failed:  # no score to plot: a cross on the x axis says the trial was there
        ax.scatter(failed, [0.02] * len(failed), marker="x", color="C3", transform=ax.get_xaxis_transform(),
                   label="failed / no score")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="trial number (in start order)", ylabel="score", title="search progress")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _png(figure)


def _figures(record: RunRecord) -> dict[str, bytes]:
    pngs = {"pareto.png": _pareto_png(record) if record.trials else None,
            "layers.png": _layers_png(record) if record.chosen_values else None,
            "progress.png": _progress_png(record) if record.trials else None}
    return {name: png for name, png in pngs.items() if png is not None}


# Content, shared by both formats.


def _fmt(value: Any, pattern: str = "{:.4f}", scale: float = 1.0) -> str:
    number = finite_number(value)
    return "-" if number is None else pattern.format(number * scale)


def _size(num_bytes: Any) -> str:
    number = finite_number(num_bytes)
    return "-" if number is None else f"{number / 2**20:.2f} MiB" if number >= 2**20 else f"{number / 1024:.1f} KiB"


def _artifact_table(artifacts: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    batches = sorted({b for row in artifacts for b in (row.get("latency") or {})}, key=int)
    reference = next((r for r in artifacts if r.get("model") == "baseline" and r.get("format") == "onnx"), None)
    arm = any(row.get("aarch64") for row in artifacts)  # export.aarch64_cpus: verified on emulated ARM kernels too
    headers = ["artifact", "test accuracy", "top-1 agreement", "MACs", "params", "file size"] + ["on aarch64"] * arm
    for batch in batches:
        headers += [f"latency b{batch} median / p95", f"speed-up b{batch}"]
    rows = []
    for row in artifacts:
        cells = [f"{row.get('model')} {row.get('format')}", _fmt(row.get("test_accuracy"), "{:.2f}%", 100),
                 _fmt(row.get("top1_agreement"), "{:.2f}%", 100), _fmt(row.get("macs"), "{:.2f}M", 1e-6),
                 _fmt(row.get("params"), "{:.1f}k", 1e-3), _size(row.get("size_bytes"))]
        arms = row.get("aarch64") or ()  # accuracy on the ARM runtime, top-1 agreement with the x86 runtime's
        cells += ["; ".join(f"{a['cpu']} {100 * a['test_accuracy']:.2f}% (agrees {100 * a['top1_agreement_x86']:.1f}%)"
                            for a in arms) or "-"] * arm
        for batch in batches:
            stats = (row.get("latency") or {}).get(batch) or {}
            base = finite_number(((reference or {}).get("latency") or {}).get(batch, {}).get("median_ms"))
            median = finite_number(stats.get("median_ms"))
            cells += [f"{_fmt(median, '{:.3f}')} / {_fmt(stats.get('p95_ms'), '{:.3f}')} ms",
                      f"{base / median:.2f}x" if base and median else "-"]
        rows.append(cells)
    return headers, rows


def _trial_table(record: RunRecord) -> tuple[list[str], list[list[str]]]:
    timed = [key for key in (TARGET_MS, PREDICTED_MS) if any(t.get(key) is not None for t in record.trials)]
    names = {TARGET_MS: "target ms (measured)", PREDICTED_MS: "target ms (table)"}
    several = len({t.get(TARGET_SPEEDUP) for t in record.trials}) > 1  # a Pareto set: one search per target
    headers = ["#", "trial", *(["target"] if several else []), "score", "accuracy", "MACs ratio",
               *(names[key] for key in timed), "epochs", "status"]
    rows = []
    for number, trial in enumerate(record.trials, start=1):
        chosen = record.best and trial["trial_id"] == record.best.get("trial_id")
        status = ("chosen" if record.finished else "best so far") if chosen else "ok"
        target = [_fmt(trial.get(TARGET_SPEEDUP), "{:g}x")] if several else []
        rows.append([str(number), str(trial["trial_id"]), *target, _fmt(trial.get("score")), _fmt(_accuracy(trial)),
                     _fmt(trial.get("macs_ratio"), "{:.3f}"), *(_fmt(trial.get(key), "{:.3f}") for key in timed),
                     _fmt(trial.get("epoch"), "{:.0f}"),
                     f"failed: {trial['error']}" if trial.get("error") else status])
    return headers, rows


def _blocks(record: RunRecord, figures: dict[str, bytes]) -> list[Block]:
    run_name = (record.config.get("storage") or {}).get("name") or record.run_dir.name
    blocks: list[Block] = [("h1", f"pf-ray run report: {run_name}")]
    if record.finished:
        took = f" in {record.seconds:.0f} s" if finite_number(record.seconds) is not None else ""
        blocks += [("h2", "Baseline vs compressed"),
                   ("p", f"The run finished{took}. Accuracy and latency are measured on each file's own runtime "
                         "(ONNX Runtime for .onnx/.ort, ExecuTorch for .pte); speed-up is against the baseline "
                         "FP32 ONNX model. Latency depends on the machine that measured it."),
                   ("table", *_artifact_table(record.artifacts))]
        if record.target:
            blocks += [("h2", "Deployment target"),
                       ("p", target_summary(record.target) + ". The reference, the original and the compressed "
                             "model (its shipped file), and every scored search candidate were timed side by side "
                             "in interleaved rounds on this machine.")]
        blocks += [("warn", f"Accuracy guard failed: {failure}") for failure in record.guard_failures]
        if record.skipped_groups:
            blocks += [("h2", "Left uncompressed"),
                       ("p", "Parts of the model the learner's check found unsafe to compress (pruned, the model "
                             "would not run, keep its output shape or export), left as they were:"),
                       ("table", ["group", "why"], [[str(group.get("name")), str(group.get("reason") or "-")]
                                                    for group in record.skipped_groups])]
    else:
        blocks.append(("warn", "The run did not finish (no results.json): only the search is shown, rebuilt "
                               "from the trial folders under search/. The chosen trial is the best so far."))
    blocks.append(("h2", "Search"))
    if not record.trials:
        blocks.append(("p", "No search: the learner's settings were given." if record.finished
                       else "No trial reported a result before the run stopped."))
    else:
        failed = sum(1 for t in record.trials if t.get("error"))
        chosen = "chosen" if record.finished else "best so far"
        best = f"; {chosen}: trial {record.best['trial_id']}" if record.best else "; no trial succeeded"
        blocks.append(("p", f"{len(record.trials)} trials ({failed} failed or reported nothing){best}."))
        if "pareto.png" in figures:
            blocks.append(("img", "pareto.png", "Accuracy vs cost of every trial, Pareto front, chosen trial"))
        if "progress.png" in figures:
            blocks.append(("img", "progress.png", "Best score so far vs trial number"))
        blocks.append(("table", *_trial_table(record)))
    blocks.append(("h2", "Chosen per-layer values"))
    if "layers.png" in figures:
        label = record.value_label
        pairs = zip(_layer_names(record), record.chosen_values, strict=True)
        blocks += [("img", "layers.png", f"Chosen {label} per layer"),
                   ("table", ["layer", label], [[name, f"{value:.4g}"] for name, value in pairs])]
    else:
        blocks.append(("p", "No per-layer values: the learner used one setting for every layer."))
    blocks += [("h2", "Reproduce"), ("p", "Command:"), ("code", record.command, "bash")]
    if (record.config.get("storage") or {}).get("name"):  # preflight refuses a run folder that exists
        blocks.append(("p", "This config fixes storage.name: add --set storage.name=NEW to run it again."))
    blocks += [("p", "The exact config (config.yaml):"), ("code", record.config_text, "yaml")]
    return blocks
