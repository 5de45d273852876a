"""Weight sparsification on ResNet-20 / Fashion-MNIST: uniform, heuristic and searched per-layer sparsity at each
global sparsity level, each fine-tuned with and without distillation; test accuracy, stored size, and what the
zeros do to ONNX Runtime's latency.

Phases (progress on stderr; the JSON is rewritten after each level, so an interrupted run keeps what it did):

1. Baseline: ResNet-20 trained ``--baseline-epochs`` on the whole training split, cached under ``--storage`` (the
   same cache key as bench/channel_pruning.py's, so the two benchmarks share one baseline).
2. Per level, three per-layer allocations of the global sparsity (the fraction of conv/linear weights that are 0):
   - uniform: every layer at the level;
   - heuristic: PocketFlow's rule, s_i proportional to ln(n_i), scaled to the level (pf_ray.ops.sparsity);
   - searched: ``--trials`` proposals of ``--searcher`` through its Ray Tune ``Searcher`` interface, one trial at a
     time, each projected onto the level (the weighted least-squares projection every search uses), scored by the
     fast proxy: validation accuracy right after one-shot magnitude pruning at those per-layer sparsities, on a
     fixed ``--validation-subset``, after BatchNorm statistics are re-estimated on ``--proxy-bn-images``
     training images (adaptive BN, what the library's proxy does); the best proposal wins.
3. Each allocation fine-tuned by the ``weight_sparsification`` learner itself (gradual magnitude pruning on the
   Zhu & Gupta schedule from the dense baseline, masks updated every ``--mask-update-steps``, exact sparsity at the
   end), ``--epochs`` of SGD on ``--train-subset`` training images, lr ``--lr`` cosine, without and with
   distillation from the baseline (weight 4, temperature 4: PocketFlow's). Test accuracy on all 10,000 test
   images; stored size: the ``.pfpack`` file (bitmask + float32 non-zeros), against the dense float32 weights.
4. Latency: the baseline and the highest-level searched model (its zeros stored densely, as ONNX holds them) in
   ONNX Runtime, 1 thread, batch 1 and 32, interleaved rounds: ONNX Runtime's CPU convolutions have no sparse
   kernels, so the zeros are expected to buy no time; this measures it.

The command behind docs/benchmarks.md's table::

    python bench/sparsity.py --out bench/results/sparsity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import _common  # first: puts the repository root on sys.path
import torch
from _common import log, packed_sizes
from torch import nn

from pf_ray.candidate import fine_tune, make_candidate, search_space
from pf_ray.config import DistillationConfig, ExperimentConfig, SearchAlgorithm, TrainConfig
from pf_ray.data import DataBundle, load_data
from pf_ray.learners.weight_sparsification import covered_layers
from pf_ray.metrics import ACCURACY
from pf_ray.ops.sparsity import heuristic_sparsities, magnitude_mask
from pf_ray.spec import RunSpec
from pf_ray.train import evaluate, recalibrate_batchnorm, subset

LEARNER = "weight_sparsification"
ALLOCATIONS = ("uniform", "heuristic", "searched")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    result: dict[str, Any] = {**_common.result_header("sparsity.py", argv, args), "levels": {}}
    previous_seconds = 0.0
    if args.resume and args.out.exists():  # keep the other allocations' rows; note every command that wrote some
        previous = json.loads(args.out.read_text())
        result["levels"] = previous.get("levels", {})
        result["latency_ms"] = previous.get("latency_ms")
        result["runs"] = _common.earlier_runs(previous)
        previous_seconds = previous.get("wall_seconds", 0.0)
    save = _common.Results(args.out, result, started=started, previous_seconds=previous_seconds).save

    experiment = _experiment(args)
    data = load_data(experiment.dataset, seed=experiment.seed)
    baseline_path, baseline = _common.baseline_model(experiment, data)
    result["baseline"] = {"checkpoint": str(baseline_path), "test_accuracy": evaluate(baseline, data.test)[ACCURACY],
                          **packed_sizes(baseline, {})}
    log(f"baseline: test accuracy {result['baseline']['test_accuracy']:.4f}")
    save()

    models: dict[str, nn.Module] = {}
    for level in args.levels:
        section = result["levels"].setdefault(str(level), {})
        allocations = {"uniform": None, "heuristic": _heuristic(baseline, data, level)}
        if "searched" in args.allocations:
            tic = time.time()
            section["search"] = _search(args, experiment, baseline, data, level)
            section["search"]["heuristic_proxy"] = evaluate(
                _one_shot(baseline, data, allocations["heuristic"], args.proxy_bn_images),
                subset(data.validation, args.validation_subset))[ACCURACY]
            allocations["searched"] = section["search"]["best"]["sparsities"]
            section["search_seconds"] = round(time.time() - tic, 1)
        section.setdefault("runs", {})
        for allocation in args.allocations:
            for distill in (False, True):
                label = f"{allocation}{'+distill' if distill else ''}"
                tic = time.time()
                model, run = _fine_tune(args, experiment, baseline, data, level, allocations[allocation], distill)
                run["seconds"] = round(time.time() - tic, 1)
                section["runs"][label] = run
                log(f"level {level}: {label}: test accuracy {run['test_accuracy']:.4f}, "
                    f"{run['file_bytes'] / 1024:.0f} KiB ({run['seconds']:.0f} s)")
                if allocation == "searched" and not distill:
                    models[str(level)] = model
                save()

    top = str(max(args.levels))
    if top in models:
        with tempfile.TemporaryDirectory(prefix="pf_ray_bench_sparsity_") as work:
            sessions = _common.onnx_sessions({"baseline": baseline, f"searched {top}": models[top]},
                                             data.input_shape, Path(work))
            result["latency_ms"], _ = _common.interleaved_latency(
                sessions, dict.fromkeys(sessions, (1, 32)), data.input_shape, rounds=args.rounds, repeats=args.repeats)
    save()
    print(markdown(result))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _common.learner_bench_parser(__doc__)
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95],
                        help="global sparsities (fraction of conv/linear weights set to 0)")
    parser.add_argument("--allocations", nargs="+", choices=ALLOCATIONS, default=list(ALLOCATIONS),
                        help="which allocations to run (default: all)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and (re)run only --allocations")
    parser.add_argument("--searcher", default="ddpg", choices=[a.value for a in SearchAlgorithm])
    parser.add_argument("--trials", type=int, default=24, help="search proposals per level")
    parser.add_argument("--validation-subset", type=int, default=2000)
    parser.add_argument("--proxy-bn-images", type=int, default=512,
                        help="training images that re-estimate BatchNorm statistics before the proxy (0: none)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per run")
    parser.add_argument("--train-subset", type=int, default=10000, help="training images per fine-tuning epoch")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--mask-update-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench/results/sparsity.json"))
    args = parser.parse_args(argv)
    if not all(0.0 < level < 1.0 for level in args.levels):
        parser.error(f"--levels: got {args.levels}; each must lie in (0, 1)")
    for name in ("baseline_epochs", "trials", "epochs", "train_subset", "mask_update_steps", "rounds", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; expected >= 1")
    return args


def _experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The benchmarks' experiment (bench/channel_pruning.py's cached baseline) with auto weight sparsification."""
    return _common.bench_experiment(args, LEARNER, {"mode": "auto"})


def _with_level(experiment: ExperimentConfig, level: float, **options: Any) -> ExperimentConfig:
    return replace(experiment, learner=replace(experiment.learner, options={
        **experiment.learner.options, "sparsity": level, **options}))


def _heuristic(baseline: nn.Module, data: DataBundle, level: float) -> tuple[float, ...]:
    sizes = [size for _, size in covered_layers(baseline, data.input_shape)]
    return heuristic_sparsities(sizes, level, 0.98)


def _one_shot(baseline: nn.Module, data: DataBundle, sparsities, bn_images: int) -> nn.Module:
    """The baseline with each covered layer's smallest weights zeroed at its sparsity, BatchNorm statistics
    re-estimated on ``bn_images`` training images (the search's proxy)."""
    import copy

    model = copy.deepcopy(baseline)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for (name, _), sparsity in zip(covered_layers(model, data.input_shape), sparsities, strict=True):
            weight = modules[name].weight
            weight.mul_(magnitude_mask(weight, sparsity).to(weight.dtype))
    return recalibrate_batchnorm(model, data.train, images=bn_images)


def _search(args, experiment, baseline, data, level) -> dict[str, Any]:
    space = search_space(RunSpec.resolve(_with_level(experiment, level)), baseline, data.input_shape)
    validation = subset(data.validation, args.validation_subset)

    def one_shot(proposal: tuple[float, ...]) -> dict[str, Any]:
        values = space.project(proposal)
        score = evaluate(_one_shot(baseline, data, values, args.proxy_bn_images), validation)[ACCURACY]
        return {"score": score, "sparsities": list(values), "kept": space.budget.cost(values)}

    tic = time.time()
    history = _common.run_proposals(args.searcher, space, seed=0, trials=args.trials,
                                    trial_prefix=f"{args.searcher}_{level}", score=one_shot)
    best = max(history, key=lambda trial: trial["score"])
    uniform = evaluate(_one_shot(baseline, data, [level] * len(space.names), args.proxy_bn_images),
                       validation)[ACCURACY]
    log(f"level {level}: {args.searcher} best one-shot proxy {best['score']:.4f} (uniform {uniform:.4f}), "
        f"{time.time() - tic:.0f} s")
    return {"best": best, "uniform_proxy": uniform, "scores": [trial["score"] for trial in history],
            "layer_names": list(space.names)}


def _fine_tune(args, experiment, baseline, data, level, sparsities, distill) -> tuple[nn.Module, dict[str, Any]]:
    options = {"mode": "uniform"} if sparsities is None else {"mode": "list", "layer_sparsities": list(sparsities)}
    leveled = _with_level(experiment, level, mask_update_steps=args.mask_update_steps, **options)
    leveled = replace(leveled, learner=replace(leveled.learner,
                                               distillation=DistillationConfig() if distill else None))
    # the proxy is measured as before (and not used): the timings stay comparable with the recorded ones
    candidate = make_candidate(RunSpec.resolve(leveled), baseline, data)
    schedule = TrainConfig(epochs=args.epochs, learning_rate=args.lr, train_subset=args.train_subset)
    model = fine_tune(candidate, data, schedule, validation_subset=None)  # seeded by experiment.seed (0)
    layers = [name for name, _ in covered_layers(model, data.input_shape)]
    return model, {"test_accuracy": evaluate(model, data.test)[ACCURACY],
                   "sparsity": _common.weight_sparsity(model, layers),
                   **packed_sizes(model, candidate.learner.packed(model))}


def markdown(result: dict[str, Any]) -> str:
    base = result["baseline"]
    lines = [f"{_common.baseline_sentence(base)}.", "",
             "| sparsity | allocation | test accuracy | + distillation | stored size | of float32 | search proxy |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for level, section in result["levels"].items():
        runs = section["runs"]
        for allocation in ALLOCATIONS:
            plain, distilled = runs[allocation], runs[f"{allocation}+distill"]
            proxy = section["search"]["best"]["score"] if allocation == "searched" else (
                section["search"].get(f"{allocation}_proxy"))
            lines.append(
                f"| {100 * float(level):.0f}% | {allocation} | {100 * plain['test_accuracy']:.2f}% | "
                f"{100 * distilled['test_accuracy']:.2f}% | {plain['file_bytes'] / 1024:.0f} KiB | "
                f"{100 * plain['file_bytes'] / base['file_bytes']:.1f}% | "
                + (f"{100 * proxy:.2f}% |" if proxy is not None else "- |"))
    latency = result.get("latency_ms")
    if latency:
        lines += ["", "| ONNX Runtime, 1 thread | batch 1 | batch 32 |", "|---|---:|---:|"]
        lines += [f"| {name} | {t['1']:.3f} ms | {t['32']:.2f} ms |" for name, t in latency.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
