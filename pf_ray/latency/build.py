"""Building a ``LatencyTable``: candidates measured *in context* (the whole model, pruned), a model fitted to them,
checked on random candidates it never saw.

What is measured, in this order (``TablePlan``):

1. sweeps: every group alone at ``sweep_fractions`` of its channels, and one channel fewer (misaligned), the rest
   of the model unpruned;
2. dense sweeps: the ``dense_groups`` groups whose sweeps moved latency most, at every count of the top
   ``dense_window`` counts: where latency steps (``pf_ray.latency.steps``), and training data;
3. random candidates, training and held out: per candidate one channel multiple of ``grids``; each group kept
   whole with probability ``keep_full``, else a keep ratio uniform in [``min_ratio``, 1] rounded to that multiple.

With ``depth`` (and a model with removable residual blocks, ``pf_ray.ops.blocks``), also every block removed alone
and all of them together (the rest unpruned), and each random candidate removes each block with probability
``remove_probability`` (held-out candidates too): the table then predicts joint depth-and-width candidates.

With ``precision`` (an INT8 target), also every conv/linear layer in FP32 alone and all of them together (the rest
INT8 and unpruned), and a ``mixed_fraction`` of the random candidates runs each layer in FP32 with probability
``fp32_probability`` (held-out candidates too): the table then predicts which layers stay in FP32 as well
(``predict(..., fp32=...)``).

Layer times measured alone do not add up to the whole model's (the issue measured a per-layer table's error at
12% in FP32 and 52% in INT8), hence whole candidates only. Candidates are timed ``batch`` at a time side by side
with the unpruned model; each figure is scaled by the unpruned model's time in its own batch over that of the first
batch, so a change of load on the machine between batches cancels out.
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pf_ray.config import Precision, Runtime, TargetConfig
from pf_ray.errors import ConfigError, ModelError
from pf_ray.latency import cache
from pf_ray.latency.features import FeatureSet, Layout
from pf_ray.latency.fit import choose_features, fit_weights, relative_errors
from pf_ray.latency.measure import Timing, export_artifact, open_artifact, reference_target, time_sessions
from pf_ray.latency.steps import step_from_sweeps
from pf_ray.latency.table import LatencyTable, Measured
from pf_ray.ops.blocks import removable_blocks
from pf_ray.ops.depth import apply_joint_
from pf_ray.ops.macs_budget import MacsTable, macs_table
from pf_ray.ops.pruning import group_multiples, kept_channel_count, prune_channels_

Log = Callable[[str], None]
Kept = tuple[int, ...]
Removed = tuple[str, ...]  # removed residual blocks, in forward order
Floats = tuple[str, ...]  # layers run in FP32 (an INT8 target's precision table), in forward order
Candidate = tuple[Kept, Removed, Floats]
# kept-count vectors -> ms; with blocks (a depth table), (kept, removed) pairs -> ms; with precision layers,
# (kept, removed, fp32) triples -> ms
Measure = Callable[[Sequence[Any]], list[float]]


@dataclass(frozen=True)
class TablePlan:
    """What a table's measurements are (part of its cache key)."""

    sweep_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    dense_groups: int = 3
    dense_window: int = 64
    num_random: int = 160  # training
    num_holdout: int = 60  # never seen by the fit
    grids: tuple[int, ...] = (1, 2, 4, 8, 16)
    keep_full: float = 0.25
    min_ratio: float = 0.1
    batch: int = 64  # candidates timed side by side (plus the unpruned model)
    step_tolerance: float = 0.01  # timing noise allowed when deciding where latency steps
    folds: int = 5
    seed: int = 0
    timing: Timing = field(default_factory=lambda: Timing(warmup=5, repeats=30, rounds=5))
    depth: bool = False  # also measure removed residual blocks (where the model has removable ones)
    remove_probability: float = 0.25  # depth: each block removed from a random candidate with this probability
    precision: bool = False  # also measure layers left in FP32 inside the INT8 model (INT8 targets)
    mixed_fraction: float = 0.5  # precision: the random candidates with any FP32 layer (the rest all INT8)
    fp32_probability: float = 0.15  # precision: in those, each layer in FP32 with this probability


# ExecuTorch INT8 programs take 7-13 s each to export here (ONNX Runtime INT8: 0.3 s): a smaller plan, about 165
# candidates instead of 400 (half an hour on a 2-core machine, once per CPU: tables are cached).
EXECUTORCH_PLAN = TablePlan(sweep_fractions=(0.5,), dense_groups=1, dense_window=32, num_random=80, num_holdout=30)


def plan_for(target: TargetConfig) -> TablePlan:
    """The measurements a target's table is built from: the full plan, or the smaller one for ExecuTorch."""
    return EXECUTORCH_PLAN if target.runtime is Runtime.EXECUTORCH else TablePlan()


def fit_table(macs: MacsTable, measure: Measure, plan: TablePlan = TablePlan(), *, log: Log | None = None,
              feature_sets: Sequence[FeatureSet] | None = None, blocks: Sequence[str] = (),
              precision_layers: Sequence[str] = (), multiples: Sequence[int] | None = None,
              **fields: Any) -> LatencyTable:
    """Measure the plan's candidates with ``measure`` (kept-count vectors -> ms), fit, hold out, find the step.
    Needs no model: ``measure`` may be any function (tests pass a synthetic runtime). ``fields`` fill the table's
    descriptive fields (target, environment, reference_ms: a number or a function asked once everything is measured;
    by default the unpruned model's time). ``blocks``: removable residual blocks (qualified names, forward order)
    to measure removed; then ``measure`` is given (kept, removed block names) pairs. ``precision_layers``: layers
    (module names of ``macs.layers``) to measure in FP32; then ``measure`` is given (kept, removed, fp32 layer
    names) triples. ``multiples``: per group, the multiple its kept count must be (a grouped convolution's groups
    keep equal shares: ``pruning.group_multiples``); every candidate's counts are rounded to it."""
    say = log or (lambda message: None)
    started = time.perf_counter()
    if not macs.names:
        raise ModelError("a latency table needs prunable channel groups; the model has none")
    sizes, rng, blocks, floats = tuple(macs.sizes), random.Random(plan.seed), tuple(blocks), tuple(precision_layers)
    layout = Layout.of(macs.layers, sizes, blocks, precision=bool(floats))
    steps = tuple(multiples) if multiples is not None else (1,) * len(sizes)

    def aligned(kept: Kept) -> Kept:  # each count rounded to its group's multiple (kept whole stays whole)
        return tuple(k if m == 1 or k == n else kept_channel_count(n, k / n, m)
                     for k, n, m in zip(kept, sizes, steps, strict=True))

    seen: dict[Candidate, float] = {}
    training: list[Measured] = []

    def run(kind: str, candidates: Sequence[Candidate], held: frozenset[Candidate] = frozenset()) -> list[float]:
        fresh = list(dict.fromkeys(c for c in candidates if c not in seen))
        note = f", {len(held)} of them held out" if held else ""
        say(f"latency table: measuring {len(fresh)} {kind} candidates{note} ({time.perf_counter() - started:.0f}s)")
        if floats:
            asked: list[Any] = fresh
        else:
            asked = [(kept, removed) for kept, removed, _ in fresh] if blocks else [kept for kept, _, _ in fresh]
        timed = measure(asked) if fresh else []
        for candidate, ms in zip(fresh, timed, strict=True):
            seen[candidate] = ms
            if candidate not in held:
                training.append(Measured(candidate[0], float(ms), kind, removed=candidate[1], fp32=candidate[2]))
        return [seen[c] for c in candidates]

    (full_ms,) = run("full", [(sizes, (), ())])
    sweeps = [aligned(_with(sizes, g, count)) for g, n in enumerate(sizes) for f in plan.sweep_fractions
              for count in dict.fromkeys((max(1, round(n * f)), max(1, round(n * f) - 1))) if count < n]
    sweeps = [v for v in dict.fromkeys(sweeps) if v != sizes]
    run("sweep", [(v, (), ()) for v in sweeps])
    dense = [g for g in _dense_groups(sizes, training, plan) if steps[g] == 1]  # every count: not when aligned
    dense_sweeps = {g: [_with(sizes, g, c) for c in range(max(1, sizes[g] - plan.dense_window + 1), sizes[g])]
                    for g in dense}
    run("dense", [(v, (), ()) for vectors in dense_sweeps.values() for v in vectors])
    step, evidence = step_from_sweeps(
        {macs.names[g]: {v[g]: seen[v, (), ()] for v in [*vectors, sizes]} for g, vectors in dense_sweeps.items()},
        {macs.names[g]: sizes[g] for g in dense}, tolerance=plan.step_tolerance)
    say(f"latency table: step {step} ({evidence['rule']})")
    if blocks:
        run("block", [(sizes, (b,), ()) for b in blocks] + [(sizes, blocks, ())])
    if floats:
        run("precision", [(sizes, (), (name,)) for name in floats] + [(sizes, (), floats)])

    randoms = [(aligned(kept), removed, fp32)
               for kept, removed, fp32 in _random_candidates(sizes, layout, blocks, rng, plan, floats, macs.layers)]
    held = frozenset(randoms[plan.num_random:]) - set(randoms[: plan.num_random]) - set(seen)
    order = list(dict.fromkeys(randoms))
    rng.shuffle(order)  # training and held-out candidates timed side by side, in the same batches
    run("random", order, held)
    holdout_candidates = [c for c in order if c in held]
    holdout_ms = [seen[c] for c in holdout_candidates]
    holdout_vectors = [kept for kept, _, _ in holdout_candidates]

    reference = fields.pop("reference_ms", full_ms)
    kept = np.array([m.kept for m in training], float)
    removed = _mask(blocks, [m.removed for m in training]) if blocks else None
    held_removed = _mask(blocks, [r for _, r, _ in holdout_candidates]) if blocks else None
    fp32 = _layer_mask(macs.layers, [m.fp32 for m in training]) if floats else None
    held_fp32 = _layer_mask(macs.layers, [f for _, _, f in holdout_candidates]) if floats else None
    measured = np.array([m.ms for m in training])
    choices = choose_features(layout, kept, measured, folds=plan.folds, candidates=feature_sets, log=say,
                              removed=removed, fp32=fp32)
    weights = fit_weights(layout.design(kept, choices[0].features, removed, fp32), measured)
    predicted = layout.design(np.array(holdout_vectors, float).reshape(-1, len(sizes)), choices[0].features,
                              held_removed, held_fp32) @ weights
    errors = relative_errors(predicted, np.array(holdout_ms))
    evidence["fitted_table"] = _fitted_step(layout, choices[0].features, weights, macs.names, sizes, plan)
    holdout = tuple(Measured(c[0], float(ms), "holdout", float(p), removed=c[1], fp32=c[2])
                    for c, ms, p in zip(holdout_candidates, holdout_ms, predicted, strict=True))
    notes = {"baseline_model": _baseline_model(layout, kept, measured, holdout_vectors, holdout_ms, choices,
                                               removed, held_removed, fp32, held_fp32),
             "holdout_by_grid": _errors_by_grid(holdout_vectors, errors, sizes)}
    if blocks:
        notes["holdout_by_depth"] = _errors_by_depth(holdout_candidates, errors)
    if floats:
        notes["holdout_by_precision"] = _errors_by(holdout_candidates, errors, 2, ("all_int8", "with_fp32_layers"))
    table = LatencyTable(
        names=tuple(macs.names), sizes=sizes, layers=tuple(macs.layers), features=choices[0].features,
        weights=tuple(float(w) for w in weights), step=step, step_evidence=evidence, full_ms=float(full_ms),
        reference_ms=float(reference() if callable(reference) else reference), target=fields.pop("target", {}),
        environment=fields.pop("environment", {}), training=tuple(training), holdout=holdout,
        median_error=float(np.median(errors)) if len(errors) else float("nan"),
        max_error=float(errors.max()) if len(errors) else float("nan"),
        cross_validation=tuple(_choice_record(c) for c in choices), notes=notes, blocks=blocks,
        precision_layers=floats,
    )
    table = replace(table, build_seconds=round(time.perf_counter() - started, 1), **fields)
    say(f"latency table: {table.summary()} ({table.build_seconds:.0f}s)")
    return table


class CandidateTimer:
    """The real ``measure``: each count vector pruned from a copy of ``model`` (L1 criterion; weights do not change
    latency), exported to the target's artifact and timed ``plan.batch`` at a time beside the unpruned model (and
    the unpruned FP32 ONNX Runtime reference, unless that is the target). With ``depth``, each candidate is a
    (kept, removed blocks) pair: the blocks removed first (``pf_ray.ops.depth.apply_joint_``); with ``precision``,
    a (kept, removed blocks, FP32 layers) triple: those layers left in FP32 by the INT8 exporter."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], target: TargetConfig, plan: TablePlan,
                 log: Log | None = None, *, depth: bool = False, precision: bool = False,
                 whole: Collection[str] = ()) -> None:
        self.model, self.shape, self.target, self.plan, self.log = model, tuple(input_shape), target, plan, log
        self.depth, self.precision = depth, precision
        table = macs_table(model, self.shape)
        self.sizes = tuple(table.sizes)
        # groups left unpruned (channel pruning's excluded_groups: pruning them may break the model): always timed
        # whole, whatever count a vector gives them, so the table learns that they cost what they cost unpruned
        self.whole = tuple(i for i, name in enumerate(table.names) if name in set(whole))
        self.scale: float | None = None  # the unpruned model's time in the first batch
        self.references: list[float] = []  # the reference's time in each batch, scaled like the candidates
        self._work = tempfile.TemporaryDirectory(prefix="pf_ray_latency_table_")
        work = Path(self._work.name)
        self._anchors = [open_artifact(export_artifact(model, self.shape, target, work, stem="unpruned"),
                                       target.threads)]
        if reference_target(target) != target:
            self._anchors.append(open_artifact(export_artifact(model, self.shape, reference_target(target), work,
                                                               stem="reference"), target.threads))

    def __call__(self, vectors: Sequence[Kept]) -> list[float]:
        results: list[float] = []
        batches = range(0, len(vectors), self.plan.batch)
        for number, start in enumerate(batches, 1):
            chunk = vectors[start : start + self.plan.batch]
            with tempfile.TemporaryDirectory(prefix="pf_ray_latency_batch_", dir=self._work.name) as work:
                sessions = [open_artifact(self._export(v, work, stem=f"candidate{i}"), self.target.threads)
                            for i, v in enumerate(chunk)]
                timed = time_sessions([*self._anchors, *sessions], self.shape, self.target.batch_size,
                                      self.plan.timing, seed=start)
                del sessions
            anchor = timed[0]["median_ms"]
            self.scale = self.scale or anchor
            factor = self.scale / anchor
            self.references.append(timed[len(self._anchors) - 1]["median_ms"] * factor)  # the anchor if FP32 ORT
            results += [t["median_ms"] * factor for t in timed[-len(chunk):]]
            if self.log is not None and len(batches) > 1:
                self.log(f"  batch {number}/{len(batches)}: {len(chunk)} candidates timed; unpruned "
                         f"{anchor:.3f} ms (scaled by {factor:.3f})")
        return results

    def reference_ms(self) -> float:
        return float(np.median(self.references)) if self.references else float("nan")

    def _export(self, candidate: Any, folder: str, *, stem: str) -> Path:
        """The candidate (a count vector, a pair or a triple, see the class) as the target's artifact."""
        if self.precision:
            kept, removed, floats = candidate
        elif self.depth:
            (kept, removed), floats = candidate, ()
        else:
            kept, removed, floats = candidate, (), ()
        kept = [self.sizes[i] if i in self.whole else count for i, count in enumerate(kept)]
        pruned = pruned_copy(self.model, self.shape, kept, self.sizes, removed=removed)
        present = {name for name, _ in pruned.named_modules()}  # a removed block's layers are gone
        return export_artifact(pruned, self.shape, self.target, folder, stem=stem,
                               fp32_layers=[name for name in floats if name in present])

    def close(self) -> None:
        self._anchors.clear()
        self._work.cleanup()


def pruned_copy(model: nn.Module, input_shape: Sequence[int], kept: Sequence[int],
                sizes: Sequence[int] | None = None, *, removed: Sequence[str] = ()) -> nn.Module:
    """A copy of ``model`` with ``kept[i]`` channels in prunable group i (L1 criterion: which channels go does not
    change latency). ``sizes``: the groups' channels, if known (else traced). ``removed``: residual blocks removed
    first (``pf_ray.ops.blocks``); ``kept`` is still one count per group of ``model``, and the counts of the groups
    that go with the removed blocks are not used."""
    if removed:
        candidate = copy.deepcopy(model)
        apply_joint_(candidate, input_shape, removed, [int(k) for k in kept])
        return candidate
    sizes = tuple(sizes) if sizes is not None else tuple(macs_table(model, input_shape).sizes)
    candidate = copy.deepcopy(model)
    got = prune_channels_(candidate, input_shape, [c / n for c, n in zip(kept, sizes, strict=True)], round_to=1,
                          criterion="l1")
    if tuple(got.values()) != tuple(kept):
        raise ModelError(f"pruning kept {tuple(got.values())} channels; asked for {tuple(kept)}")
    return candidate


def latency_table(model: nn.Module, input_shape: Sequence[int], target: TargetConfig, *,
                  plan: TablePlan = TablePlan(), folder: str | Path | None = None,
                  log: Log | None = None, whole: Collection[str] = ()) -> LatencyTable:
    """The model's latency table on ``target`` (channel pruning's candidates), built once per architecture,
    target, runtime version, CPU and plan, then read from the cache (``pf_ray.latency.cache``). ``whole``: groups
    (by name) timed unpruned in every candidate (channel pruning's excluded groups)."""
    model = copy.deepcopy(model).cpu().eval()
    key = table_key(model, input_shape, target, plan)
    if whole:
        key = cache.cache_key("table", key, sorted(whole))
    entry = Path(folder or cache.cache_dir()) / f"table-{key}.json"
    stored = cache.read_entry(entry, "table")
    if stored is not None:
        try:
            table = LatencyTable.from_dict(stored)
        except (TypeError, ValueError, KeyError):
            pass  # damaged or from an older layout: build again
        else:
            if log is not None:
                log(f"latency table: {table.summary()} (cached: {entry.name})")
            return table
    blocks = [block.name for block in removable_blocks(model, input_shape)] if plan.depth else []
    macs = macs_table(model, input_shape)
    floats = macs.layer_names() if plan.precision else []
    if floats and target.precision is not Precision.INT8:
        raise ConfigError(f"a latency table with layers in FP32 needs an INT8 target; got {target.precision}")
    timer = CandidateTimer(model, input_shape, target, plan, log,
                           **({"depth": True} if blocks else {}), **({"precision": True} if floats else {}),
                           **({"whole": whole} if whole else {}))
    try:
        table = fit_table(macs, timer, plan, log=log, target=_target_record(target),
                          environment=environment(target), reference_ms=timer.reference_ms, blocks=blocks,
                          precision_layers=floats, multiples=group_multiples(model, input_shape))
    finally:
        timer.close()
    cache.write_entry(entry, {"table": table.to_dict()})
    return table


def table_key(model: nn.Module, input_shape: Sequence[int], target: TargetConfig, plan: TablePlan) -> str:
    parts = asdict(plan)
    if not plan.precision:  # the key of a plan without precision is what it was before precision existed
        del parts["precision"], parts["mixed_fraction"], parts["fp32_probability"]
    return cache.cache_key("table", cache.architecture(model, input_shape), cache.target_parts(target), parts)


def environment(target: TargetConfig) -> dict[str, Any]:
    import torch

    return {"cpu": cache.cpu_summary(), "runtime": cache.runtime_version(target.runtime), "torch": torch.__version__}


def _target_record(target: TargetConfig) -> dict[str, Any]:
    return {"runtime": str(target.runtime), "precision": str(target.precision), "threads": target.threads,
            "batch_size": target.batch_size}


def _with(sizes: Kept, group: int, count: int) -> Kept:
    return sizes[:group] + (count,) + sizes[group + 1 :]


def _random(sizes: Kept, rng: random.Random, plan: TablePlan) -> Kept:
    grid = rng.choice(plan.grids)
    return tuple(n if rng.random() < plan.keep_full else kept_channel_count(n, rng.uniform(plan.min_ratio, 1.0), grid)
                 for n in sizes)


def _random_candidates(sizes: Kept, layout: Layout, blocks: Removed, rng: random.Random, plan: TablePlan,
                       floats: Floats = (), layers: Sequence[Any] = ()) -> list[Candidate]:
    """The plan's random candidates (training, then held out). Widths are drawn from ``rng`` as without depth;
    removals and FP32 layers from generators of their own. The counts of groups that go with removed blocks are
    set to the full size, and the layers inside removed blocks are not FP32 (neither matters: one candidate, one
    measurement)."""
    widths = [_random(sizes, rng, plan) for _ in range(plan.num_random + plan.num_holdout)]
    depth_rng, precision_rng = random.Random(plan.seed + 1), random.Random(plan.seed + 2)
    candidates = []
    for kept in widths:
        removed: Removed = ()
        if blocks:
            removed = tuple(b for b in blocks if depth_rng.random() < plan.remove_probability)
            vanished = layout.vanished(_mask(blocks, [removed]))[0]
            kept = tuple(n if gone else k for k, n, gone in zip(kept, sizes, vanished, strict=True))
        mixed = bool(floats) and precision_rng.random() < plan.mixed_fraction
        fp32 = tuple(name for name in floats if mixed and precision_rng.random() < plan.fp32_probability
                     and not any(name.startswith(f"{block}.") for block in removed))
        candidates.append((kept, removed, fp32))
    return candidates


def _layer_mask(layers: Sequence[Any], fp32: Sequence[Floats]) -> np.ndarray:
    """(candidates, layers): 1 where a candidate runs the layer (every call of it) in FP32."""
    return np.array([[layer.name in names for layer in layers] for names in fp32], float).reshape(len(fp32), -1)


def _mask(blocks: Removed, removed: Sequence[Sequence[str]]) -> np.ndarray:
    index = {name: b for b, name in enumerate(blocks)}
    mask = np.zeros((len(removed), len(blocks)))
    for row, names in enumerate(removed):
        mask[row, [index[name] for name in names]] = 1.0
    return mask


def _dense_groups(sizes: Kept, training: Sequence[Measured], plan: TablePlan) -> list[int]:
    """The groups whose single-group sweeps moved latency most, among those of at least 32 channels (where steps of
    up to 32 show; all groups when none is that wide)."""
    full = next(m.ms for m in training if m.kind == "full")
    wide = min(32, max(sizes))
    moved = {g: 0.0 for g, n in enumerate(sizes) if n >= wide}
    for m in training:
        if m.kind == "sweep":
            (group,) = [g for g, (k, n) in enumerate(zip(m.kept, sizes, strict=True)) if k != n]
            if group in moved:
                moved[group] = max(moved[group], abs(full - m.ms))
    return sorted(moved, key=lambda g: (-moved[g], g))[: plan.dense_groups]


def _fitted_step(layout: Layout, features: FeatureSet, weights: np.ndarray, names: Sequence[str], sizes: Kept,
                 plan: TablePlan) -> dict[str, Any]:
    """The step rule applied to the fitted table's in-context sweeps of every group of 8 channels or more, every
    count (a check on the measured sweeps: the fit pools all measurements, so its sweeps carry less noise)."""
    sweeps = {}
    for g, n in enumerate(sizes):
        if n >= 8:
            counts = range(max(1, n - plan.dense_window + 1), n + 1)
            predicted = layout.design(np.array([_with(sizes, g, c) for c in counts], float), features) @ weights
            sweeps[names[g]] = dict(zip(counts, predicted.tolist(), strict=True))
    step, evidence = step_from_sweeps(sweeps, {name: sizes[names.index(name)] for name in sweeps},
                                      tolerance=plan.step_tolerance)
    return {"step": step, "per_group": {name: record.get("step", record["shape"])
                                        for name, record in evidence["sweeps"].items()}}


def _choice_record(choice: Any) -> dict[str, Any]:
    return {"features": choice.features.describe(), "median_error": round(choice.median_error, 5),
            "p90_error": round(choice.p90_error, 5), "max_error": round(choice.max_error, 5),
            "columns": choice.columns}


def _baseline_model(layout: Layout, kept: np.ndarray, measured: np.ndarray, holdout: Sequence[Kept],
                    holdout_ms: Sequence[float], choices: Sequence[Any], removed: np.ndarray | None = None,
                    held_removed: np.ndarray | None = None, fp32: np.ndarray | None = None,
                    held_fp32: np.ndarray | None = None) -> dict[str, Any]:
    """The held-out errors of the simplest model tried (base + per-layer MACs rounded up to a block: no alignment
    or activation terms, its block chosen by cross-validation), for comparison."""
    plain = [c for c in choices if not c.features.aligns and not c.features.activations]
    if not plain or not holdout:
        return {}
    best = min(plain, key=lambda c: c.median_error)
    weights = fit_weights(layout.design(kept, best.features, removed, fp32), measured)
    errors = relative_errors(layout.design(np.array(holdout, float), best.features, held_removed, held_fp32) @ weights,
                             np.array(holdout_ms))
    return {"features": best.features.describe(), "median_error": round(float(np.median(errors)), 5),
            "max_error": round(float(errors.max()), 5)}


def _errors_by_grid(holdout: Sequence[Kept], errors: np.ndarray, sizes: Kept) -> dict[str, Any]:
    """Held-out errors of the candidates whose pruned counts are all multiples of each grid."""
    result = {}
    for grid in (1, 4, 8, 16):
        on = [e for v, e in zip(holdout, errors, strict=True)
              if all(k % grid == 0 or k == n for k, n in zip(v, sizes, strict=True))]
        if on:
            result[str(grid)] = {"count": len(on), "median_error": round(float(np.median(on)), 5),
                                 "max_error": round(float(np.max(on)), 5)}
    return result



def _errors_by_depth(holdout: Sequence[Candidate], errors: np.ndarray) -> dict[str, Any]:
    """Held-out errors of the candidates that remove no block, and of those that remove some."""
    return _errors_by(holdout, errors, 1, ("width_only", "with_removed_blocks"))


def _errors_by(holdout: Sequence[Candidate], errors: np.ndarray, part: int, labels: tuple[str, str]) -> dict[str, Any]:
    """Held-out errors of the candidates whose ``part`` (1: removed blocks, 2: FP32 layers) is empty, and of those
    whose is not, under ``labels``."""
    result = {}
    for label, wanted in zip(labels, (False, True), strict=True):
        on = [e for candidate, e in zip(holdout, errors, strict=True) if bool(candidate[part]) == wanted]
        if on:
            result[label] = {"count": len(on), "median_error": round(float(np.median(on)), 5),
                             "max_error": round(float(np.max(on)), 5)}
    return result
