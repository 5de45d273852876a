"""Channel pruning on ResNet-20 / Fashion-MNIST: uniform L1, uniform LASSO, Torch-Pruning's magnitude pruner and
the four searchers (random, TPE, GP, DDPG), at each MACs target; then the main candidates retrained on one equal
budget, scored on the test set and timed side by side in ONNX Runtime.

Phases (progress on stderr; the JSON is rewritten after each phase, so an interrupted run keeps what it did):

1. Baseline: ResNet-20 trained ``--baseline-epochs`` on the whole training split (cached under ``--storage``
   like ``pf-ray train``'s baseline, so a re-run skips it).
2. Search scores, per target fraction of the baseline's MACs. Every method is scored the same way: the fast proxy
   (validation accuracy right after pruning + reconstruction, no fine-tuning, on a fixed ``--validation-subset``).
   - uniform L1 / uniform LASSO: the largest single keep ratio whose MACs (channels rounded to 8) fit the target;
   - uniform LASSO to budget: the same, topped up group by group to the target by the budget projection;
   - torch_pruning: Torch-Pruning's ``MagnitudePruner`` (L2 magnitude, one ratio for every layer, its own
     dependency groups, no channel rounding: how it is used out of the box), ratio bisected to the target;
   - random / tpe / gp / ddpg: ``--trials`` proposals each, driven through their Ray Tune ``Searcher`` interface
     one trial at a time (``suggest`` -> score -> ``on_trial_result`` + ``on_trial_complete``, what Tune does
     with one trial in flight), each proposal projected onto the budget as in ``pf-ray compress``.
3. Retraining with one equal budget (``--retrain-epochs`` of SGD, cosine learning rate from ``--retrain-lr``, on
   the whole training split): uniform LASSO, torch_pruning, the best searched candidate (best proxy score over all
   searchers and seeds), and that candidate pruned with group fine-tuning (``--group-size``; its Adam steps come on
   top of the equal budget). Test accuracy in PyTorch over the whole test set.
4. Latency: the baseline and every retrained model exported to ONNX and timed in ONNX Runtime (1 intra-op thread)
   at batch 1 and 32, models interleaved over ``--rounds`` rounds (median of the rounds' medians), so a change in
   machine load hits all of them alike.

The command behind docs/benchmarks.md's table::

    python bench/channel_pruning.py --baseline-epochs 5 --trials 16 --seeds 0 1 2 --seeds-per-target 0.25=0 \\
        --retrain-epochs 3 --out bench/results/channel_pruning.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import _common  # first: puts the repository root on sys.path
import torch
from _common import log
from torch import nn

from pf_ray.candidate import make_candidate, search_space
from pf_ray.config import ExperimentConfig, TrainConfig
from pf_ray.data import DataBundle, load_data
from pf_ray.metrics import ACCURACY, MACS_RATIO, PROXY_ACCURACY, model_stats
from pf_ray.ops.channel_groups import prunable_groups
from pf_ray.ops.macs_budget import macs_after
from pf_ray.spec import RunSpec
from pf_ray.train import evaluate, fit, subset

SEARCHERS = ("random", "tpe", "gp", "ddpg")
ROUND_TO = 8  # the learner's default channel multiple (ONNX Runtime's x86 convolutions use blocks of 8)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    result: dict[str, Any] = {**_common.result_header("channel_pruning.py", argv, args), "phases": {}}
    save = _common.Results(args.out, result, started=started).save

    experiment = _experiment(args)
    data = load_data(experiment.dataset, seed=experiment.seed)
    phase = time.time()
    baseline_path, baseline = _common.baseline_model(experiment, data)
    result["baseline"] = {"checkpoint": str(baseline_path), "seconds": round(time.time() - phase, 1),
                          **_describe(baseline, data)}
    log(f"baseline: test accuracy {result['baseline']['test_accuracy']:.4f}")
    save()

    result["targets"] = {}
    for target in args.targets:
        seeds = args.seeds_per_target.get(target, args.seeds)
        section = result["targets"][str(target)] = {"seeds": seeds}
        phase = time.time()
        section["search"] = _search_phase(args, experiment, baseline, data, target, seeds)
        section["search_seconds"] = round(time.time() - phase, 1)
        save()
        phase = time.time()
        section["retrained"] = _retrain_phase(args, experiment, baseline, data, target, section["search"])
        section["retrain_seconds"] = round(time.time() - phase, 1)
        save()

    phase = time.time()
    _latency_phase(args, baseline, data, result)
    result["latency_seconds"] = round(time.time() - phase, 1)
    save()
    print(markdown(result))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _common.learner_bench_parser(__doc__)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25],
                        help="fractions of the baseline's MACs")
    parser.add_argument("--trials", type=int, default=16, help="proposals per searcher and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds-per-target", type=_seeds_per_target, default={},
                        help="seeds for some targets only, e.g. 0.25=0 or 0.25=0,1 (others use --seeds)")
    parser.add_argument("--searchers", nargs="+", default=list(SEARCHERS), choices=SEARCHERS)
    parser.add_argument("--validation-subset", type=int, default=2000,
                        help="validation images behind every search score (the same fixed ones for all)")
    parser.add_argument("--retrain-epochs", type=int, default=3)
    parser.add_argument("--retrain-lr", type=float, default=0.02)
    parser.add_argument("--group-size", type=int, default=3, help="prunable groups per group fine-tuning step")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for pruning and training")
    parser.add_argument("--latency-batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--repeats", type=int, default=100, help="timed runs per model, batch and round")
    parser.add_argument("--out", type=Path, default=Path("bench/results/channel_pruning.json"))
    args = parser.parse_args(argv)
    for name in ("baseline_epochs", "trials", "retrain_epochs", "rounds", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; expected at least 1")
    for target in args.targets:
        if not 0.0 < target < 1.0:
            parser.error(f"--targets: got {target}; expected fractions in (0, 1)")
    return args


def _seeds_per_target(text: str) -> dict[float, list[int]]:
    result = {}
    for item in text.split():
        target, _, seeds = item.partition("=")
        try:
            result[float(target)] = [int(seed) for seed in seeds.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected TARGET=SEED[,SEED...], e.g. 0.25=0") from None
    return result


def _experiment(args: argparse.Namespace) -> ExperimentConfig:
    """The benchmarks' experiment with auto channel pruning and proxy scoring."""
    # proxy_bn_images=0: the proxy as this table was measured (BatchNorm statistics of the baseline kept);
    # re-estimating them (the default since) changes every score and has not been re-run here.
    return _common.bench_experiment(args, "channel_pruning", {"mode": "auto"}, proxy_bn_images=0)


def _with_target(experiment: ExperimentConfig, target: float, **options: Any) -> ExperimentConfig:
    return replace(experiment, search=replace(experiment.search, target_macs_ratio=target),
                   learner=replace(experiment.learner, options={**experiment.learner.options, **options}))


def _describe(model: nn.Module, data: DataBundle) -> dict[str, Any]:
    stats = model_stats(model, data.input_shape)
    return {"macs": stats.macs, "params": stats.params, "test_accuracy": evaluate(model, data.test)[ACCURACY]}


# --------------------------------------------------------------------------------------------------------------
# Phase 2: search scores.


def _search_phase(args, experiment, baseline, data, target, seeds) -> dict[str, Any]:
    shape = data.input_shape
    full_macs = model_stats(baseline, shape).macs
    validation = subset(data.validation, args.validation_subset)
    methods: dict[str, Any] = {}

    ratio = uniform_keep_ratio(baseline, shape, target)
    for criterion in ("l1", "lasso"):
        uniform = _with_target(experiment, target, mode="uniform", keep_ratio=ratio, criterion=criterion)
        tic = time.time()
        candidate = make_candidate(RunSpec.resolve(uniform), baseline, data)
        methods[f"uniform_{criterion}"] = {
            "keep_ratio": ratio, "macs_ratio": candidate.static_metrics[MACS_RATIO],
            "score": candidate.static_metrics[PROXY_ACCURACY], "seconds": round(time.time() - tic, 1)}
        log(f"target {target}: uniform {criterion} (keep {ratio:.4f}) proxy "
            f"{methods[f'uniform_{criterion}']['score']:.4f}")

    # Uniform, then topped up to the budget by the projection every searched proposal goes through (the
    # searchers' first trial): rounding to 8 leaves strict uniform short of the target.
    projected = RunSpec.resolve(_with_target(experiment, target))
    tic = time.time()
    candidate = make_candidate(projected, baseline, data, proposal=[1.0] * len(prunable_groups(baseline, shape)))
    methods["uniform_lasso_to_budget"] = {
        "macs_ratio": candidate.static_metrics[MACS_RATIO],
        "keep_ratios": list(candidate.spec.learner_config.layer_keep_ratios),
        "score": candidate.static_metrics[PROXY_ACCURACY], "seconds": round(time.time() - tic, 1)}

    tic = time.time()
    pruned, tp_ratio = torch_pruning_model(baseline, shape, target)
    methods["torch_pruning"] = {
        "pruning_ratio": tp_ratio, "macs_ratio": model_stats(pruned, shape).macs / full_macs,
        "score": evaluate(pruned, validation)[ACCURACY], "seconds": round(time.time() - tic, 1)}
    log(f"target {target}: torch_pruning (ratio {tp_ratio:.4f}) proxy {methods['torch_pruning']['score']:.4f}")

    searched = RunSpec.resolve(_with_target(experiment, target))
    for algorithm in args.searchers:
        runs = [run_searcher(algorithm, seed, args.trials, searched, baseline, data) for seed in seeds]
        bests = [run["best"]["score"] for run in runs]
        methods[algorithm] = {
            "runs": runs,
            "score_mean": statistics.fmean(bests),
            "score_std": statistics.stdev(bests) if len(bests) > 1 else 0.0,
            "score_best": max(bests),
            "seconds_mean": statistics.fmean(run["seconds"] for run in runs),
        }
        log(f"target {target}: {algorithm} best proxy {methods[algorithm]['score_mean']:.4f} "
            f"+- {methods[algorithm]['score_std']:.4f} over seeds {seeds}")
    return methods


def uniform_keep_ratio(model: nn.Module, input_shape, target: float) -> float:
    """The largest keep ratio that, applied to every group (counts rounded to 8), fits ``target`` of the MACs."""
    groups = len(prunable_groups(model, input_shape))
    full = macs_after(model, input_shape, [1.0] * groups, ROUND_TO)
    low, high = 1e-3, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if macs_after(model, input_shape, [middle] * groups, ROUND_TO) <= target * full:
            low = middle
        else:
            high = middle
    return low


def torch_pruning_model(baseline: nn.Module, input_shape, target: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's magnitude pruner, one ratio for every layer, bisected so the MACs fit ``target``."""
    import torch_pruning as tp

    full = model_stats(baseline, input_shape).macs
    example = torch.zeros(1, *input_shape)

    def pruned(ratio: float) -> nn.Module:
        model = copy.deepcopy(baseline).eval()
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[classifier])
        pruner.step()
        return model

    low, high = 0.0, 0.95
    for _ in range(14):
        middle = (low + high) / 2
        if model_stats(pruned(middle), input_shape).macs <= target * full:
            high = middle
        else:
            low = middle
    return pruned(high), high


def run_searcher(algorithm: str, seed: int, trials: int, spec: RunSpec, baseline: nn.Module,
                 data: DataBundle) -> dict[str, Any]:
    """One search: ``trials`` proposals, each projected, pruned and proxy-scored; the searcher learns from each."""

    def prune(values: tuple[float, ...]) -> dict[str, Any]:
        candidate = make_candidate(spec, baseline, data, proposal=values)
        return {"score": candidate.static_metrics[PROXY_ACCURACY], "macs_ratio": candidate.static_metrics[MACS_RATIO],
                "keep_ratios": list(candidate.spec.learner_config.layer_keep_ratios)}

    space = search_space(spec, baseline, data.input_shape)
    tic = time.time()
    history = _common.run_proposals(algorithm, space, seed=seed, trials=trials, trial_prefix=f"{algorithm}_{seed}",
                                    score=prune)
    best = max(history, key=lambda trial: trial["score"])
    log(f"  {algorithm} seed {seed}: best proxy {best['score']:.4f} at {best['macs_ratio']:.3f} of the MACs "
        f"({time.time() - tic:.0f} s)")
    return {"seed": seed, "seconds": round(time.time() - tic, 1), "best": best,
            "scores": [trial["score"] for trial in history]}


# --------------------------------------------------------------------------------------------------------------
# Phase 3: retraining on one budget.


def _retrain_phase(args, experiment, baseline, data, target, methods) -> dict[str, Any]:
    shape = data.input_shape
    full_macs = model_stats(baseline, shape).macs
    searched = [(run["best"]["score"], algorithm, run) for algorithm in args.searchers
                for run in methods[algorithm]["runs"]]
    best_score, best_algorithm, best_run = max(searched, key=lambda item: item[0])
    ratios = tuple(best_run["best"]["keep_ratios"])
    uniform_ratio = methods["uniform_lasso"]["keep_ratio"]

    def lasso(**options: Any) -> nn.Module:
        return make_candidate(RunSpec.resolve(_with_target(experiment, target, **options)), baseline, data).model

    builders = {
        "uniform_lasso": lambda: lasso(mode="uniform", keep_ratio=uniform_ratio),
        "torch_pruning": lambda: torch_pruning_model(baseline, shape, target)[0],
        "searched": lambda: lasso(mode="list", layer_keep_ratios=ratios),
        "searched_group_ft": lambda: lasso(mode="list", layer_keep_ratios=ratios, group_size=args.group_size),
    }
    schedule = TrainConfig(epochs=args.retrain_epochs, learning_rate=args.retrain_lr)
    retrained = {}
    for label, build in builders.items():
        tic = time.time()
        model = build()
        prune_seconds = time.time() - tic
        fit(model, data.train, schedule, seed=0, log=lambda line, label=label: log(f"  {label}: {line}"))
        retrained[label] = {"macs_ratio": model_stats(model, shape).macs / full_macs, **_describe(model, data),
                            "prune_seconds": round(prune_seconds, 1), "seconds": round(time.time() - tic, 1)}
        _MODELS[(target, label)] = model.eval()
        log(f"target {target}: {label} retrained, test accuracy {retrained[label]['test_accuracy']:.4f}")
    retrained["searched"]["from"] = {"searcher": best_algorithm, "seed": best_run["seed"], "score": best_score,
                                     "keep_ratios": list(ratios)}
    return retrained


_MODELS: dict[tuple[float, str], nn.Module] = {}  # the retrained models, for the latency phase


# --------------------------------------------------------------------------------------------------------------
# Phase 4: latency, side by side.


def _latency_phase(args, baseline, data, result) -> None:
    models = {"baseline": baseline.eval(), **{f"{target}/{label}": model for (target, label), model in
                                              _MODELS.items()}}
    with tempfile.TemporaryDirectory(prefix="pf_ray_bench_cp_") as work:
        sessions = _common.onnx_sessions(models, data.input_shape, Path(work))
        result["latency_ms"], result["latency_ms_rounds"] = _common.interleaved_latency(
            sessions, dict.fromkeys(sessions, args.latency_batch_sizes), data.input_shape, rounds=args.rounds,
            repeats=args.repeats)


# --------------------------------------------------------------------------------------------------------------
# Tables.


def markdown(result: dict[str, Any]) -> str:
    baseline = result["baseline"]
    lines = []
    for target, section in result.get("targets", {}).items():
        lines += [f"**Target {float(target):.0%} of the MACs** (search score: proxy validation accuracy, "
                  f"seeds {section['seeds']})", "",
                  "| method | search score | MACs reached | seconds per search |", "|---|---|---|---|"]
        for name, method in section["search"].items():
            if "runs" in method:
                ratios = [run["best"]["macs_ratio"] for run in method["runs"]]
                spread = f" ± {method['score_std']:.4f}" if len(method["runs"]) > 1 else ""
                lines.append(f"| {name} | {method['score_mean']:.4f}{spread} (best {method['score_best']:.4f}) | "
                             f"{min(ratios):.3f}-{max(ratios):.3f} | {method['seconds_mean']:.0f} |")
            else:
                lines.append(f"| {name} | {method['score']:.4f} | {method['macs_ratio']:.3f} | "
                             f"{method['seconds']:.0f} |")
        lines.append("")
    latency = result.get("latency_ms", {})
    batches = sorted({batch for per in latency.values() for batch in per}, key=int)
    header = "| model | MACs | params | test accuracy | " + " | ".join(f"ORT b{b} ms" for b in batches) + " |"
    lines += [header, "|" + "---|" * (4 + len(batches))]

    def row(name: str, entry: dict[str, Any], key: str) -> str:
        cells = [f"{latency[key][b]:.3f} ({latency['baseline'][b] / latency[key][b]:.2f}x)"
                 if key in latency else "-" for b in batches]
        delta = entry["test_accuracy"] - baseline["test_accuracy"]
        return (f"| {name} | {entry['macs'] / 1e6:.2f}M ({entry['macs'] / baseline['macs']:.1%}) | "
                f"{entry['params'] / 1e3:.1f}k | {entry['test_accuracy']:.2%} ({delta * 100:+.2f} pt) | "
                + " | ".join(cells) + " |")

    lines.append(row("baseline", baseline, "baseline"))
    for target, section in result.get("targets", {}).items():
        for label, entry in section.get("retrained", {}).items():
            lines.append(row(f"{float(target):.0%}: {label}", entry, f"{target}/{label}"))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
