"""Quantization on ResNet-20 / Fashion-MNIST: uniform QAT at several widths, searched mixed precision, codebook
(non-uniform) quantization, the native INT8 path (PTQ and QAT), and 90% sparsity + a 4-bit codebook; test
accuracy, stored size and, for the INT8 files, latency on their runtimes.

Phases (progress on stderr; the JSON is rewritten after every row, so an interrupted run keeps what it did, and
``--rows ... --resume`` reruns some rows into an existing JSON):

1. Baseline: the cached ResNet-20 of bench/sparsity.py and bench/channel_pruning.py (``--baseline-epochs`` on the
   whole training split, lr 0.1, cached under ``--storage``), its FP32 ``.pfpack``, ONNX and ``.pte`` files.
2. Rows (``--rows``, in this order by default), every fine-tuning the same budget: ``--epochs`` of SGD (Nesterov,
   cosine learning rate from ``--lr``, batch 128) on the first ``--train-subset`` training images:
   - ``w8a8``: uniform_quantization, 8-bit per-channel weights (symmetric) and 8-bit activations, BN folded; its
     QDQ ONNX is run by ONNX Runtime for its runtime accuracy and latency;
   - ``int8_ptq`` / ``int8_qat``: native_int8, post-training (the baseline calibrated, no fine-tuning) and
     quantization-aware (fine-tuned); its ``.pte`` (ExecuTorch, XNNPACK) and QDQ ``.onnx`` files are run on
     their runtimes;
   - ``w4``, ``w2``: uniform_quantization, weights only (per-channel, activations float);
   - ``mixed4``: uniform_quantization, layer_bits searched at a 4-bit average (mode auto): ``--trials`` proposals
     of ``--searcher`` through its Ray Tune ``Searcher`` interface one trial at a time, scored by the proxy
     (validation accuracy right after quantization, ``--validation-subset`` images); the best is fine-tuned;
   - ``codebook4``, ``codebook2``: nonuniform_quantization, k-means codebooks per layer (weights only);
   - ``sparse90_cb4``: weight_sparsification, 90% with the size heuristic's per-layer sparsities
     (``--mask-update-steps``), fine-tuned with ``--sparse-epochs`` at ``--sparse-lr`` (a 90% sparse model needs
     more than one epoch; bench/sparsity.py's budget), then every
     conv/linear weight's non-zeros put on a 4-bit k-means codebook (``codebook_quantize_``, zeros kept as a
     1-bit mask), no further training;
   - ``w4a8``: uniform_quantization, 4-bit weights and 8-bit activations;
   - not run by default (``--rows ROW ... --resume`` adds them to an existing JSON):
     ``mixed2``: nonuniform_quantization, layer_bits in [1, 8] searched at a 2-bit average like mixed4 (uniform
     quantization's smallest width is 2 bits, so a 2-bit average leaves it nothing to trade), against codebook2;
     ``fp32_ft``: the baseline fine-tuned with the same budget, uncompressed (what the budget alone does);
     ``w8a8_unfolded``, ``w4_unfolded``: w8a8 and w4 with ``fold_batchnorm`` off (what folding costs).
   Test accuracy on all 10,000 test images (PyTorch, and the runtime's for the INT8 files); stored size: the
   ``.pfpack`` of the finalized model (the learner's compact tensors, everything else float32), against the
   baseline's.
3. Latency: the FP32 ONNX and ``.pte`` of the baseline and every INT8 file, one thread, batch 1 (and 32 for the
   ONNX files), interleaved over ``--rounds`` rounds (median of the rounds' medians).

Default budget, sized for about 45 minutes on two shared CPU cores: every fine-tuning 1 epoch on 10,000 training
images (79 steps of 128) from lr 0.01; each search 16 DDPG proposals on 2,000 validation images; all 10,000 test
images; latency 3 rounds of 100 timed runs. (bench/sparsity.py fine-tunes 2 epochs at lr 0.02: its rows and these
are not the same budget.) Measured: 47.7 minutes for the default rows, on a machine loaded by other work for the
first half (load average 5-8 on 2 cores: the w8a8 epoch took 635 s there, 33 s on the idle machine later).

The command behind bench/results/quantization.json::

    python bench/quantization.py --out bench/results/quantization.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import _common  # first: puts the repository root on sys.path
import torch
from _common import log, packed_sizes
from torch import nn

from pf_ray.candidate import Candidate, fine_tune, make_candidate, search_space
from pf_ray.config import ExperimentConfig, SearchAlgorithm, TrainConfig
from pf_ray.data import DataBundle, load_data
from pf_ray.export import export_onnx
from pf_ray.export.verify import open_session, runtime_accuracy
from pf_ray.metrics import ACCURACY, PROXY_ACCURACY
from pf_ray.spec import RunSpec
from pf_ray.train import evaluate, subset

UNIFORM, NONUNIFORM, SPARSIFICATION, NATIVE = ("uniform_quantization", "nonuniform_quantization",
                                               "weight_sparsification", "native_int8")
# Row name -> (learner, options, what it is). Rows with a search or special steps say so in _run_row.
ROWS: dict[str, tuple[str, dict[str, Any], str]] = {
    "w8a8": (UNIFORM, {"mode": "uniform", "weight_bits": 8, "activation_bits": 8}, "uniform W8A8 (QAT)"),
    "int8_ptq": (NATIVE, {"method": "ptq"}, "native_int8 PTQ (no fine-tuning)"),
    "int8_qat": (NATIVE, {"method": "qat"}, "native_int8 QAT"),
    "w4": (UNIFORM, {"mode": "uniform", "weight_bits": 4}, "uniform W4 (weights only)"),
    "mixed4": (UNIFORM, {"mode": "auto", "weight_bits": 4}, "uniform mixed, 4-bit average (searched)"),
    "w2": (UNIFORM, {"mode": "uniform", "weight_bits": 2}, "uniform W2 (weights only)"),
    "codebook4": (NONUNIFORM, {"mode": "uniform", "bits": 4}, "codebook 4-bit (weights only)"),
    "codebook2": (NONUNIFORM, {"mode": "uniform", "bits": 2}, "codebook 2-bit (weights only)"),
    "sparse90_cb4": (SPARSIFICATION, {"mode": "heuristic", "sparsity": 0.9}, "90% sparse + 4-bit codebook"),
    "w4a8": (UNIFORM, {"mode": "uniform", "weight_bits": 4, "activation_bits": 8}, "uniform W4A8 (QAT)"),
    "mixed2": (NONUNIFORM, {"mode": "auto", "bits": 2, "min_bits": 1}, "codebook mixed, 2-bit average (searched)"),
    # Controls, not run by default: what the fine-tuning budget alone does, and what folding BN costs.
    "fp32_ft": ("full_precision", {}, "FP32 fine-tuned, no compression (control)"),
    "w8a8_unfolded": (UNIFORM, {"mode": "uniform", "weight_bits": 8, "activation_bits": 8, "fold_batchnorm": False},
                      "uniform W8A8 (QAT), BN not folded"),
    "w4_unfolded": (UNIFORM, {"mode": "uniform", "weight_bits": 4, "fold_batchnorm": False},
                    "uniform W4, BN not folded"),
}
EXTRA_ROWS = ("mixed2", "fp32_ft", "w8a8_unfolded", "w4_unfolded")  # only if time allows
DEFAULT_ROWS = [name for name in ROWS if name not in EXTRA_ROWS]
INT8_MAX_DROP = 0.003  # the target: INT8 costs at most 0.3 pt of test accuracy
SPARSE_CODEBOOK_TARGET = 0.08  # the target: 90% sparsity + 4-bit codebook in at most 8% of the FP32 file
COMPARISONS = (("mixed4", "w4"), ("mixed2", "codebook2"))  # searched vs uniform at the same average bits


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    result: dict[str, Any] = {"rows": {}}
    if args.resume and args.out.exists():
        result = json.loads(args.out.read_text())
        result.pop("targets", None)
        result["runs"] = _common.earlier_runs(result)
    result.update({**_common.result_header("quantization.py", argv, args, work_dir=args.work_dir),
                   "budget": _budget_text(args)})
    previous_seconds = result.get("wall_seconds", 0.0) if args.resume else 0.0
    save = _common.Results(args.out, result, started=started, previous_seconds=previous_seconds).save

    experiment = _experiment(args, UNIFORM, {})
    data = load_data(experiment.dataset, seed=experiment.seed)
    data = replace(data, test=subset(data.test, args.test_subset))  # not in the dataset config: the baseline's key
    baseline_path, baseline = _common.baseline_model(experiment, data)
    baseline.eval()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    result["baseline"] = _baseline_row(args, baseline, data, baseline_path)
    log(f"baseline: test accuracy {result['baseline']['test_accuracy']:.4f}, "
        f"{result['baseline']['file_bytes'] / 1024:.0f} KiB")
    save()

    for name in args.rows:
        tic = time.time()
        log(f"row {name}: {ROWS[name][2]}")
        try:
            row = _run_row(args, name, baseline, data)
        except Exception as error:  # a failed row is recorded and the others still run
            traceback.print_exc()
            row = {"error": f"{type(error).__name__}: {error}"}
        row = {"label": ROWS[name][2], "learner": ROWS[name][0], **row, "seconds": round(time.time() - tic, 1)}
        result["rows"][name] = row
        if "test_accuracy" in row:
            log(f"row {name}: test accuracy {row['test_accuracy']:.4f}, {row['file_bytes'] / 1024:.0f} KiB "
                f"({row['seconds']:.0f} s)")
        else:
            log(f"row {name}: FAILED: {row['error']}")
        save()

    if args.rounds > 0:
        result["latency_ms"] = _latency(args, result, data.input_shape)
    result["targets"] = targets(result)
    save()
    print(markdown(result))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _common.learner_bench_parser(__doc__)
    parser.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS), metavar="ROW",
                        help=f"rows to run, in order (default: all but {', '.join(EXTRA_ROWS)}): {', '.join(ROWS)}")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of an existing --out file that this run does not redo")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs per row")
    parser.add_argument("--train-subset", type=int, default=10000, help="training images per fine-tuning epoch")
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate of the cosine schedule")
    parser.add_argument("--mask-update-steps", type=int, default=10, help="sparsification mask updates")
    parser.add_argument("--sparse-epochs", type=int, default=2, help="fine-tuning epochs of the sparse90_cb4 row")
    parser.add_argument("--sparse-lr", type=float, default=0.02, help="learning rate of the sparse90_cb4 row")
    parser.add_argument("--searcher", default="ddpg", choices=[a.value for a in SearchAlgorithm])
    parser.add_argument("--trials", type=int, default=16, help="search proposals per mixed-precision row")
    parser.add_argument("--validation-subset", type=int, default=2000, help="validation images behind the proxy")
    parser.add_argument("--check-subset", type=int, default=500,
                        help="validation images scored after each fine-tuning epoch (a progress check only)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training and evaluation")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (0: no latency phase)")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per file, batch and round")
    parser.add_argument("--test-subset", type=int, default=None,
                        help="test images scored (default: all 10,000; fewer only for a quick trial run)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_quantization"),
                        help="where the ONNX / .pte files are written (kept for --resume)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantization.json"))
    args = parser.parse_args(argv)
    for name in ("baseline_epochs", "epochs", "sparse_epochs", "train_subset", "mask_update_steps", "trials",
                 "validation_subset", "check_subset", "threads", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; expected at least 1")
    if args.test_subset is not None and args.test_subset < 1:
        parser.error(f"--test-subset: got {args.test_subset}; expected at least 1")
    if args.rounds < 0:
        parser.error(f"--rounds: got {args.rounds}; expected at least 0")
    if not 0.0 < args.lr <= 1.0:
        parser.error(f"--lr: got {args.lr}; expected a learning rate in (0, 1]")
    if len(set(args.rows)) != len(args.rows):
        parser.error(f"--rows: got {args.rows}; each row at most once")
    return args


def _budget_text(args: argparse.Namespace) -> str:
    return (f"every fine-tuning: {args.epochs} epoch(s) on {args.train_subset} training images, batch 128, SGD "
            f"Nesterov, cosine lr from {args.lr} (sparse90_cb4: {args.sparse_epochs} epoch(s) from lr "
            f"{args.sparse_lr}); searches: {args.trials} {args.searcher} proposals scored on "
            f"{args.validation_subset} validation images; test accuracy on "
            + ("all 10,000 test images" if args.test_subset is None else f"{args.test_subset} test images"))


def _experiment(args: argparse.Namespace, learner: str, options: dict[str, Any]) -> ExperimentConfig:
    """The benchmarks' experiment (bench/sparsity.py's cached baseline) with ``learner``."""
    return _common.bench_experiment(args, learner, options)


# --------------------------------------------------------------------------------------------------------------
# Rows


def _baseline_row(args, baseline: nn.Module, data: DataBundle, path: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"checkpoint": str(path), "test_accuracy": evaluate(baseline, data.test)[ACCURACY],
                           **packed_sizes(baseline, {})}
    files = {"fp32_onnx": str(export_onnx(baseline, data.input_shape, args.work_dir / "baseline.onnx"))}
    try:
        from pf_ray.export import export_pte

        files["fp32_pte"] = str(export_pte(baseline, data.input_shape, args.work_dir / "baseline.pte"))
    except Exception as error:  # ExecuTorch is an optional extra
        log(f"baseline: no .pte ({type(error).__name__}: {error})")
    row["files"] = files
    return row


def _run_row(args, name: str, baseline: nn.Module, data: DataBundle) -> dict[str, Any]:
    learner_name, options, _ = ROWS[name]
    spec = RunSpec.resolve(_experiment(args, learner_name, options))
    row: dict[str, Any] = {"options": dict(options)}
    learner_config = spec.learner_config
    if name in ("mixed4", "mixed2"):
        row["search"] = _search(args, spec, baseline, data)
        learner_config = replace(learner_config, layer_bits=tuple(row["search"]["best"]["layer_bits"]))
    if name == "sparse90_cb4":
        learner_config = replace(learner_config, mask_update_steps=args.mask_update_steps)
        row["options"]["mask_update_steps"] = args.mask_update_steps
    spec = spec.with_learner_config(learner_config)
    learner = spec.build_learner()
    # prepared here as the rows were measured, not by make_candidate: its MACs count is a forward pass, which on a
    # native_int8 graph switches the observers on and counts a BatchNorm batch (num_batches_tracked)
    model = learner.prepare(copy.deepcopy(baseline), data)
    if name == "int8_ptq":
        model = learner.finalize(model)  # post-training: the baseline's weights snapped, calibrated below
    else:
        model = _fine_tune(args, Candidate(spec, model, learner, {}), data, name)
    model.eval()
    if name == "sparse90_cb4":
        return row | _sparse_codebook(model, learner, data)
    row["test_accuracy"] = evaluate(model, data.test)[ACCURACY]
    row |= packed_sizes(model, learner.packed(model) if hasattr(learner, "packed") else {})
    bits = getattr(learner, "layer_bits", None)
    if bits:
        row["layer_bits"] = dict(bits)
    if name.startswith("w8a8"):
        path = export_onnx(model, data.input_shape, args.work_dir / f"uniform_{name}.int8.onnx")
        row["runtime"] = {"onnx_int8": _runtime(path, data)}
    elif learner_name == NATIVE:
        files = learner.int8_artifacts(model, data, args.work_dir, stem=f"native_{name}")
        row["runtime"] = {kind: _runtime(path, data) for kind, path in files.items()}
    return row


def _fine_tune(args, candidate: Candidate, data: DataBundle, name: str) -> nn.Module:
    epochs, lr = (args.sparse_epochs, args.sparse_lr) if name == "sparse90_cb4" else (args.epochs, args.lr)
    schedule = TrainConfig(epochs=epochs, learning_rate=lr, train_subset=args.train_subset)
    return fine_tune(candidate, data, schedule, validation_subset=args.check_subset,  # seed: experiment.seed (0)
                     log=lambda line: log(f"  {name}: {line}"))


def _runtime(path: Path, data: DataBundle) -> dict[str, Any]:
    """An INT8 file run by its own runtime over the whole test set."""
    session = open_session(path, threads=1)
    accuracy = runtime_accuracy(session, data.test, label=f"  {path.name}: test accuracy")
    log(f"  {path.name}: runtime test accuracy {accuracy:.4f}")
    return {"path": str(path), "test_accuracy": accuracy, "size_bytes": path.stat().st_size}


def _sparse_codebook(model: nn.Module, learner: Any, data: DataBundle) -> dict[str, Any]:
    """The fine-tuned sparse model, then its non-zeros on a 4-bit codebook per layer (zeros kept exactly)."""
    from pf_ray.learners.weight_sparsification import covered_layers
    from pf_ray.ops.codebook import codebook_quantize_

    layers = [name for name, _ in covered_layers(model, data.input_shape)]
    sparse = {"test_accuracy": evaluate(model, data.test)[ACCURACY], "sparsity": _common.weight_sparsity(model, layers),
              **packed_sizes(model, learner.packed(model))}
    log(f"  sparse90_cb4: sparse model test accuracy {sparse['test_accuracy']:.4f}, sparsity "
        f"{sparse['sparsity']:.4f}, {sparse['file_bytes'] / 1024:.0f} KiB")
    packed = codebook_quantize_(model, dict.fromkeys(layers, 4), keep_zeros=True)
    return {"sparse_only": sparse, "test_accuracy": evaluate(model, data.test)[ACCURACY],
            "codebook_bits": 4, **packed_sizes(model, packed)}


def _search(args, spec: RunSpec, baseline: nn.Module, data: DataBundle) -> dict[str, Any]:
    """``--trials`` proposals, each projected onto the average-bits budget and scored by the proxy."""
    space = search_space(spec, baseline, data.input_shape)
    scored: list[float] = []

    def quantize(values: tuple[float, ...]) -> dict[str, Any]:
        candidate = make_candidate(spec, baseline, data, proposal=values)
        bits = list(candidate.spec.learner_config.layer_bits)
        scored.append(candidate.static_metrics[PROXY_ACCURACY])
        record = {"score": scored[-1], "layer_bits": bits, "average_bits": 32 * space.budget.cost(bits)}
        log(f"  search {len(scored)}/{args.trials}: proxy {scored[-1]:.4f}, {record['average_bits']:.2f} bits")
        return record

    tic = time.time()
    history = _common.run_proposals(args.searcher, space, seed=0, trials=args.trials, trial_prefix=args.searcher,
                                    score=quantize)
    uniform = make_candidate(spec, baseline, data).static_metrics[PROXY_ACCURACY]  # auto, nothing searched: uniform
    best = max(history, key=lambda trial: trial["score"])
    log(f"  {args.searcher}: best proxy {best['score']:.4f} (uniform {uniform:.4f}), {time.time() - tic:.0f} s")
    return {"best": best, "uniform_proxy": uniform, "scores": [trial["score"] for trial in history],
            "layer_names": list(space.names), "seconds": round(time.time() - tic, 1)}


# --------------------------------------------------------------------------------------------------------------
# Latency, side by side


def _latency(args, result: dict[str, Any], shape: tuple[int, int, int]) -> dict[str, dict[str, float]]:
    files = {f"baseline {kind}": path for kind, path in result["baseline"]["files"].items()}
    for name, row in result["rows"].items():
        for kind, entry in row.get("runtime", {}).items():
            files[f"{name} {kind}"] = entry["path"]
    files = {label: path for label, path in files.items() if Path(path).is_file()}
    sessions = {label: open_session(path, threads=1) for label, path in files.items()}
    batches = {label: _batches(path) for label, path in files.items()}
    medians, result["latency_ms_rounds"] = _common.interleaved_latency(sessions, batches, shape, rounds=args.rounds,
                                                                      repeats=args.repeats)
    return medians


def _batches(path: str) -> tuple[int, ...]:
    return (1,) if path.endswith(".pte") else (1, 32)  # a .pte program has a fixed batch of 1


# --------------------------------------------------------------------------------------------------------------
# Targets and the table


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Hit or missed, for each target the rows that ran can answer."""
    base = result["baseline"]["test_accuracy"]
    rows = {name: row for name, row in result["rows"].items() if "test_accuracy" in row}
    found: dict[str, Any] = {}
    int8 = {f"{name} {kind}": entry["test_accuracy"] for name, row in rows.items()
            for kind, entry in row.get("runtime", {}).items()}
    if int8:
        found["int8_max_drop_0.3pt"] = {label: {"drop_pt": round(100 * (base - accuracy), 2),
                                                "hit": base - accuracy <= INT8_MAX_DROP}
                                        for label, accuracy in int8.items()}
    for searched, uniform in COMPARISONS:
        if searched in rows and uniform in rows:
            gain = rows[searched]["test_accuracy"] - rows[uniform]["test_accuracy"]
            found[f"{searched}_beats_{uniform}"] = {"gain_pt": round(100 * gain, 2), "hit": gain > 0}
    if "sparse90_cb4" in rows:
        fraction = rows["sparse90_cb4"]["file_bytes"] / result["baseline"]["file_bytes"]
        found["sparse90_cb4_at_most_8pct"] = {"fraction": round(fraction, 4),
                                              "hit": fraction <= SPARSE_CODEBOOK_TARGET}
    return found


def markdown(result: dict[str, Any]) -> str:
    base = result["baseline"]
    lines = [f"{_common.baseline_sentence(base)} (.pfpack). {result['budget'][0].upper()}{result['budget'][1:]}.",
             "",
             "| row | method | test accuracy | vs FP32 | stored size | of FP32 | runtime accuracy (INT8 files) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, row in result["rows"].items():
        if "test_accuracy" not in row:
            lines.append(f"| {name} | {row['label']} | failed: {row.get('error', '?')} | | | | |")
            continue
        runtime = ", ".join(f"{kind} {100 * entry['test_accuracy']:.2f}%"
                            for kind, entry in row.get("runtime", {}).items()) or "-"
        if "search" in row:
            search = row["search"]
            runtime = (f"proxy {100 * search['best']['score']:.2f}% vs uniform "
                       f"{100 * search['uniform_proxy']:.2f}%")
        if "sparse_only" in row:
            sparse = row["sparse_only"]
            runtime = (f"sparse float: {100 * sparse['test_accuracy']:.2f}%, "
                       f"{100 * sparse['file_bytes'] / base['file_bytes']:.1f}% of FP32")
        delta = 100 * (row["test_accuracy"] - base["test_accuracy"])
        lines.append(f"| {name} | {row['label']} | {100 * row['test_accuracy']:.2f}% | {delta:+.2f} pt | "
                     f"{row['file_bytes'] / 1024:.0f} KiB | {100 * row['file_bytes'] / base['file_bytes']:.1f}% | "
                     f"{runtime} |")
    latency = result.get("latency_ms")
    if latency:
        lines += ["", "| file (1 thread) | batch 1 | batch 32 |", "|---|---:|---:|"]
        reference = {kind: latency.get(f"baseline {kind}", {}).get("1") for kind in ("fp32_onnx", "fp32_pte")}
        for label, per_batch in latency.items():
            fp32 = reference["fp32_pte" if label.endswith("pte") or label.endswith("pte_int8") else "fp32_onnx"]
            speed = f" ({fp32 / per_batch['1']:.2f}x)" if fp32 and not label.startswith("baseline") else ""
            b32 = f"{per_batch['32']:.2f} ms" if "32" in per_batch else "-"
            lines.append(f"| {label} | {per_batch['1']:.3f} ms{speed} | {b32} |")
    found = result.get("targets", {})
    if found:
        lines += ["", "Targets:"]
        for label, value in found.get("int8_max_drop_0.3pt", {}).items():
            lines.append(f"- INT8 costs at most 0.3 pt, {label}: {-value['drop_pt']:+.2f} pt vs FP32: "
                         f"{'hit' if value['hit'] else 'missed'}")
        for searched, uniform in COMPARISONS:
            value = found.get(f"{searched}_beats_{uniform}")
            if value:
                lines.append(f"- searched {searched} beats {uniform}: {value['gain_pt']:+.2f} pt: "
                             f"{'hit' if value['hit'] else 'missed'}")
        value = found.get("sparse90_cb4_at_most_8pct")
        if value:
            lines.append(f"- 90% sparse + 4-bit codebook at most 8% of FP32: {100 * value['fraction']:.1f}%: "
                         f"{'hit' if value['hit'] else 'missed'}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
