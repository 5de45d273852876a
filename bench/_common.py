"""Shared helpers of the bench scripts; importing this module makes the repository's ``pf_ray`` importable.

pf_ray, torch and ONNX Runtime are imported inside the helpers that need them: importing this module stays cheap,
and bench/scale.py can import it before it has set Ray's environment variables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # `python bench/x.py` puts bench/, not the repository root, on sys.path.
    sys.path.insert(0, str(REPO_ROOT))

if TYPE_CHECKING:
    from torch import nn

    from pf_ray.config import ExperimentConfig
    from pf_ray.data import DataBundle
    from pf_ray.search_space import PerLayerSpace


def environment() -> dict[str, object]:
    """Where a figure was measured: versions, processor, cores, and how busy the machine was."""
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "processor": processor(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],  # other work on the machine skews latency
    }


def processor() -> str:
    """The CPU's model name (Linux), else whatever the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def log(message: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that ran ``bench/<script>``, as the results record it."""
    return " ".join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])])


# --------------------------------------------------------------------------------------------------------------
# The results file: rewritten after every phase, so an interrupted run keeps what it did.


def result_header(script: str, argv: Sequence[str] | None, args: argparse.Namespace,
                  **settings: Any) -> dict[str, Any]:
    """What every results file starts with: the command, the machine, and the arguments (``settings`` added)."""
    return {"command": command_line(script, argv), "environment": environment(),
            "settings": vars(args) | {"out": str(args.out)} | {key: str(value) for key, value in settings.items()}}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A results file, indented, its folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


class Results:
    """A bench's JSON ``data``, written to ``out`` with the wall time since ``started`` (default: now), plus that of
    the runs it resumes."""

    def __init__(self, out: Path, data: dict[str, Any], *, started: float | None = None,
                 previous_seconds: float = 0.0) -> None:
        self.out, self.data, self.previous_seconds = out, data, previous_seconds
        self.started = time.time() if started is None else started

    def save(self) -> None:
        self.data["wall_seconds"] = round(self.previous_seconds + time.time() - self.started, 1)
        write_json(self.out, self.data)


def earlier_runs(previous: dict[str, Any]) -> list[dict[str, Any]]:
    """Every command that wrote into a results file being resumed, with its wall time."""
    return [*previous.get("runs", [{"command": previous.get("command"), "wall_seconds": previous.get("wall_seconds")}])]


# --------------------------------------------------------------------------------------------------------------
# The learner benches' experiment and baseline (bench/channel_pruning.py, sparsity.py and quantization.py share one
# cached baseline: the same experiment fields make the same cache key).


def learner_bench_parser(doc: str) -> argparse.ArgumentParser:
    """A learner bench's argument parser: described by its docstring's first paragraph (the whole docstring shown
    raw after it), with --dataset, --model, --baseline-epochs and --storage, as ``bench_experiment`` reads them."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--baseline-epochs", type=int, default=5)
    parser.add_argument("--storage", default="runs", help="where the baseline is cached")
    return parser


def bench_experiment(args: argparse.Namespace, learner: str, options: Mapping[str, Any],
                     **search: Any) -> ExperimentConfig:
    """The embedded default with the benchmarks' baseline schedule (``--baseline-epochs`` at lr 0.1), ``learner``
    with ``options``, the proxy on ``--validation-subset`` images (and the other ``search`` fields given), and a
    MACs budget unless ``search`` names one: the benchmarks' figures were measured on the MACs default of
    sessions 1-8 (since session 9 the default, ``auto``, budgets channel pruning in latency)."""
    from pf_ray.config import BaselineConfig, Budget, ExperimentConfig, LearnerConfig, StorageConfig, TrainConfig

    default = ExperimentConfig()
    return replace(
        default,
        model=replace(default.model, name=args.model),
        dataset=replace(default.dataset, name=args.dataset),
        baseline=BaselineConfig(train=TrainConfig(epochs=args.baseline_epochs, learning_rate=0.1)),
        learner=LearnerConfig(name=learner, options=dict(options)),
        search=replace(default.search, validation_subset=args.validation_subset, **{"budget": Budget.MACS, **search}),
        storage=StorageConfig(path=str(Path(args.storage).resolve())),
    )


def baseline_model(experiment: ExperimentConfig, data: DataBundle) -> tuple[Path, nn.Module]:
    """The experiment's baseline checkpoint (trained now unless cached under its storage) and its model."""
    from pf_ray.checkpoint import load_checkpoint
    from pf_ray.launch.baseline import train_baseline

    path = train_baseline(experiment, data, log=log)
    return path, load_checkpoint(path)[0]


def baseline_sentence(baseline: dict[str, Any]) -> str:
    """The tables' first words: the baseline's test accuracy and float32 ``.pfpack`` size."""
    return (f"Baseline: test accuracy {100 * baseline['test_accuracy']:.2f}%, "
            f"{baseline['file_bytes'] / 1024:.0f} KiB as float32")


# --------------------------------------------------------------------------------------------------------------
# Searches: a searcher driven through its Ray Tune interface one trial at a time.


def run_proposals(algorithm: str, space: PerLayerSpace, *, seed: int, trials: int, trial_prefix: str,
                  score: Callable[[tuple[float, ...]], dict[str, Any]],
                  starts: Sequence[Sequence[float]] = ()) -> list[dict[str, Any]]:
    """``trials`` proposals of ``algorithm`` (``search_algs.make_searcher``'s settings, with the learner's
    ``starts`` proposed right after the uniform point, as ``pf-ray compress`` passes the knapsack start): each
    suggested, handed to ``score`` (the proposal's per-layer values, unprojected) and reported back to the searcher
    (``on_trial_result`` then ``on_trial_complete``: what Tune does with one trial in flight). Returns ``score``'s
    records, each with its ``"score"``."""
    from pf_ray.config import SearchAlgorithm
    from pf_ray.metrics import EPOCH, SCORE
    from search_algs import make_searcher

    searcher, _ = make_searcher(SearchAlgorithm(algorithm), space, metric=SCORE, mode="max", seed=seed,
                                num_trials=trials, max_epochs=1, starts=starts)
    history = []
    for index in range(trials):
        trial_id = f"{trial_prefix}_{index:03d}"
        record = score(space.values_from(searcher.suggest(trial_id)))
        report = {SCORE: record["score"], EPOCH: 1, "training_iteration": 1}
        searcher.on_trial_result(trial_id, report)
        searcher.on_trial_complete(trial_id, result=report)
        history.append(record)
    return history


# --------------------------------------------------------------------------------------------------------------
# Models: stored size and sparsity.


def packed_sizes(model: nn.Module, packed: dict[str, Any]) -> dict[str, int]:
    """What writing the model's ``.pfpack`` (``packed``: its learner's compact tensors) returns: its sizes."""
    from pf_ray.export.packed import pack_state_dict, write_packed

    with tempfile.TemporaryDirectory(prefix="pf_ray_bench_") as work:
        return write_packed(Path(work) / "model.pfpack", pack_state_dict(model.state_dict(), packed))


def weight_sparsity(model: nn.Module, layers: Iterable[str]) -> float:
    """The fraction of zeros among the weights of the named layers."""
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in layers]
    return sum(int((weight == 0).sum()) for weight in weights) / sum(weight.numel() for weight in weights)


# --------------------------------------------------------------------------------------------------------------
# Latency side by side.


def onnx_sessions(models: Mapping[str, nn.Module], input_shape: Sequence[int], work: Path) -> dict[str, Any]:
    """Each model exported to ONNX under ``work`` and opened in ONNX Runtime with 1 intra-op thread."""
    from pf_ray.export import export_onnx, onnx_session

    return {name: onnx_session(export_onnx(model, input_shape, work / f"model{index}.onnx"), threads=1)
            for index, (name, model) in enumerate(models.items())}


def interleaved_latency(sessions: Mapping[str, Any], batches: Mapping[str, Sequence[int]],
                        input_shape: Sequence[int], *, rounds: int,
                        repeats: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """Median batch latency (ms) of every session at each of its ``batches``, the sessions interleaved over
    ``rounds`` rounds so that a change in machine load hits all of them alike: the median of the rounds' medians,
    and each round's median (label -> batch, as a string -> ms)."""
    from pf_ray.export import measure_latency

    timings: dict[str, dict[str, list[float]]] = {label: {str(b): [] for b in batches[label]} for label in sessions}
    for round_index in range(rounds):
        log(f"latency round {round_index + 1}/{rounds}")
        for label, session in sessions.items():
            for batch in timings[label]:
                timed = measure_latency(session, input_shape, int(batch), repeats=repeats, label=f"  {label} b{batch}")
                timings[label][batch].append(timed["median_ms"])
    medians = {label: {batch: statistics.median(values) for batch, values in per_batch.items()}
               for label, per_batch in timings.items()}
    return medians, timings
