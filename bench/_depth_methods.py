"""bench/latency_search.py's depth comparison (``--depth-targets``): methods that remove whole residual blocks as well
as channels, on a depth latency table (``TablePlan(depth=True)``), for the runtimes and speed-ups named there.

- uniform_depth: no search. Removable blocks removed in a fixed order (``removal_order``: round robin over the
  stages, each stage's last removable block first; on ResNet-20 the first six leave ResNet-8's depth), the fewest
  for which one keep ratio (counts rounded like the latency searches') reaches the target by the table, then the
  largest such keep ratio (``uniform_with_blocks``);
- knapsack_depth: the learner's ``starting_proposal`` on the depth space (blocks ranked by importance per latency
  saved, the knapsack filled with none, one, two ... removed) and the uniform point, both projected (two proposals);
- tpe_depth, ddpg_depth: TPE and DDPG over the depth space (``learner.options.depth: true``), knapsack-started.

Candidates go through the bench's pool keyed by (kept counts, removed blocks), pruned with the blocks removed first
(mode list, ``removed_blocks``, round_to 1), and then retrained, exported, timed and checked with the other rows.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from _common import log

from pf_ray.candidate import search_space
from pf_ray.config import Budget
from pf_ray.latency import LatencyTable, latency_table, plan_for
from pf_ray.latency.build import table_key
from pf_ray.launch.target import as_target_latency
from pf_ray.ops.pruning import kept_channel_count
from pf_ray.spec import RunSpec

if TYPE_CHECKING:  # the bench's classes (no import cycle at run time)
    from latency_search import Bench, Pruned

UNIFORM = "uniform_depth"
SEARCHED = ("knapsack_depth", "tpe_depth", "ddpg_depth")
METHODS = (UNIFORM, *SEARCHED)
UNIFORM_RULE = ("no search: blocks removed round robin over the stages, each stage's last removable block first, "
                "the fewest that let one keep ratio reach the target by the depth table, then the largest such ratio")


def removal_order(blocks: Sequence[str]) -> tuple[str, ...]:
    """``blocks`` (forward order) in uniform_depth's removal order: round robin over the stages (a block's parent
    module, e.g. ``layer2``), each stage's last removable block first."""
    stages: dict[str, list[str]] = {}
    for name in blocks:
        stages.setdefault(name.rpartition(".")[0], []).append(name)
    queues = [list(reversed(names)) for names in stages.values()]
    order: list[str] = []
    while any(queues):
        order += [queue.pop(0) for queue in queues if queue]
    return tuple(order)


def uniform_with_blocks(table: LatencyTable, speedup: float, round_to: int, min_ratio: float,
                        order: Sequence[str]) -> tuple[tuple[str, ...], float, tuple[int, ...]]:
    """The fewest blocks of ``order`` (a prefix) for which one keep ratio (grid of 0.001, counts rounded to
    ``round_to``) is predicted at least ``speedup`` times faster than the reference, and the largest such ratio:
    (removed blocks in forward order, ratio, kept counts)."""
    for count in range(len(order) + 1):
        removed = tuple(name for name in table.blocks if name in set(order[:count]))
        for step in range(1000, int(min_ratio * 1000) - 1, -1):
            kept = tuple(kept_channel_count(n, step / 1000, round_to) for n in table.sizes)
            if table.speedup(kept, removed) >= speedup:
                return removed, step / 1000, kept
    raise ValueError(f"no uniform keep ratio reaches {speedup}x even with every block removed")


def depth_table(bench: Bench, runtime: str, speedups: Sequence[float], folder: Path) -> None:
    """The runtime's depth latency table (the bench's plan with ``depth=True``), its channel multiple and reach."""
    bench_module = _module(bench)
    target = bench_module.target_config(runtime)
    plan = replace(bench_module.QUICK_PLAN if bench.args.quick else plan_for(target), depth=True)
    tic, load = time.time(), os.getloadavg()[0]
    cached = (folder / f"table-{table_key(bench.baseline, bench.shape, target, plan)}.json").is_file()
    table = latency_table(bench.baseline, bench.shape, target, plan=plan, folder=folder, log=log)
    bench.depth_tables[runtime] = table
    round_to, reach = bench_module.rounding_for(table, bench.min_ratio)
    bench.depth_round_to[runtime] = round_to
    floor = [kept_channel_count(n, bench.min_ratio, round_to) for n in table.sizes]
    order = removal_order(table.blocks)
    by_blocks = {len(order[:k]): table.speedup(floor, [b for b in table.blocks if b in order[:k]])
                 for k in range(len(order) + 1)}
    described = bench_module.describe_table(table, time.time() - tic, load)
    bench.result["runtimes"][runtime].update({
        "depth_table": described | {"cached": cached, "blocks": list(table.blocks),
                                    "holdout_by_depth": table.notes.get("holdout_by_depth")},
        "depth_round_to": round_to, "depth_reach_by_round_to": reach, "depth_removal_order": list(order),
        "depth_floor_by_blocks_removed": by_blocks, "depth_max_predicted_speedup": max(by_blocks.values()),
        "depth_speedups": list(speedups)})
    log(f"{runtime} depth table: {len(table.blocks)} blocks ({', '.join(table.blocks)}), step {table.step}, "
        f"rounding to {round_to}; every group at the floor with the first k blocks of {list(order)} removed: "
        f"{', '.join(f'{k}: {v:.2f}x' for k, v in by_blocks.items())}")
    bench.save()


def _module(bench: Bench) -> Any:
    """bench/latency_search.py as loaded (``__main__`` when run as a script): its helpers, without importing it
    a second time."""
    return sys.modules[type(bench).__module__]


def search_depth_target(bench: Bench, runtime: str, speedup: float) -> None:
    """uniform_depth, knapsack_depth, tpe_depth and ddpg_depth at ``speedup`` on ``runtime``, into the bench's
    result (the target's ``methods``, beside any width methods) and shipped candidates."""
    bench_module = _module(bench)
    tic0 = time.time()
    runtime_section = bench.result["runtimes"][runtime]
    section = runtime_section["targets"].setdefault(str(speedup), {})
    reach = runtime_section["depth_max_predicted_speedup"]
    if speedup > reach:
        section["depth_skipped"] = f"the depth table predicts at most {reach:.2f}x"
        log(f"{runtime} {speedup}x depth: skipped ({section['depth_skipped']})")
        return
    table = bench.depth_tables[runtime]
    round_to = bench.depth_round_to[runtime]
    latency = as_target_latency(table)
    spec = RunSpec.resolve(replace(bench_module.with_options(bench.experiment, round_to=round_to, depth=True),
                                   target=bench_module.target_config(runtime),
                                   search=replace(bench.experiment.search, budget=Budget.LATENCY,
                                                  target_speedup=speedup)))
    space = search_space(spec, bench.baseline, bench.shape, lambda depth=False: latency)
    learner = spec.build_learner()
    methods = section.setdefault("methods", {})

    def done(method: str, pruned: Pruned, record: dict[str, Any], tic: float, fresh: int) -> None:
        bench.shipped[(runtime, str(speedup), method)] = pruned
        methods[method] = {"kept": list(pruned.kept), "removed_blocks": list(pruned.removed), "proxy": pruned.proxy,
                           "macs_ratio": pruned.macs_ratio,
                           "predicted_speedup": table.speedup(pruned.kept, pruned.removed), **record,
                           "seconds": round(time.time() - tic, 1), "fresh": fresh, "depth": True}
        log(f"{runtime} {speedup}x {method}: proxy {pruned.proxy:.4f}, {pruned.macs_ratio:.3f} of the MACs, "
            f"predicted {methods[method]['predicted_speedup']:.2f}x, removed {list(pruned.removed)}, kept "
            f"{list(pruned.kept)} ({methods[method]['seconds']:.0f} s)")

    tic, fresh = time.time(), bench.pool.fresh
    removed, ratio, kept = uniform_with_blocks(table, speedup, round_to, bench.min_ratio,
                                               runtime_section["depth_removal_order"])
    done(UNIFORM, bench.pool.get(kept, removed), {"keep_ratio": ratio, "round_to": round_to, "rule": UNIFORM_RULE},
         tic, bench.pool.fresh - fresh)

    tic, fresh = time.time(), bench.pool.fresh
    start = learner.starting_proposal(bench.baseline, bench.data, space)
    done("knapsack_depth", *bench.search("knapsack", space, spec, trials=2, starts=[start]), tic,
         bench.pool.fresh - fresh)
    for method, algorithm in (("tpe_depth", "tpe"), ("ddpg_depth", "ddpg")):
        tic, fresh = time.time(), bench.pool.fresh
        done(method, *bench.search(algorithm, space, spec, trials=bench.args.trials, starts=[start]), tic,
             bench.pool.fresh - fresh)
    section["depth_seconds"] = round(time.time() - tic0, 1)
