"""Check and reconcile a saved Tune search before ``pf-ray resume`` restores it.

Tune saves three files per driver session into the search folder (``experiment_state-<s>.json``: the trials and
their statuses; ``search_gen_state-<s>.json``: the trial counter and the concurrency limiter's live trials;
``searcher-state-<s>.pkl``: the searcher itself), then copies them to storage one by one. pf-ray writes each
file atomically (``pf_ray.launch.atomic_fs``), but a driver killed between two of them leaves a set from two moments:
e.g. a counter that already counts a trial the trial list does not hold. Restored as is, Tune would then run
one trial too few (or too many), or keep a slot of the concurrency limit for a trial that no longer exists.
The trial list is the truth; ``reconcile`` makes the other two agree with it.

A file that cannot be read at all (written by an older pf-ray, or a disk that filled up) makes the search
unresumable: ``Tuner.restore`` would log "Failed to restore the run state" and quietly start a fresh search.
``reconcile`` says so instead, and the caller keeps the damaged folder aside and starts the search again.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from dataclasses import dataclass

import pyarrow.fs

EXPERIMENT_STATE = "experiment_state-*.json"
SEARCH_GEN_STATE = "search_gen_state-*.json"
SEARCHER_STATE = "searcher-state-*.pkl"
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")
LIMITER_KEYS = ("name:ClusterConcurrency", "name:ConcurrencyLimiter")


@dataclass(frozen=True)
class SearchState:
    trials: dict[str, str]  # trial id -> status, as the newest experiment state has them
    changed: list[str]  # what reconcile corrected, for the log


class DamagedSearchState(Exception):
    """A saved search file is missing or unreadable: the search cannot be resumed from it."""


def _newest(filesystem: pyarrow.fs.FileSystem, folder: str, pattern: str) -> str | None:
    """Tune's choice among a folder's state files: the greatest name (names end in the session's timestamp)."""
    names = [info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder))]
    matching = fnmatch.filter(names, pattern)
    return posixpath.join(folder, max(matching)) if matching else None


def _read(filesystem: pyarrow.fs.FileSystem, path: str) -> bytes:
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


def reconcile(filesystem: pyarrow.fs.FileSystem, folder: str) -> SearchState:
    """Make the newest saved search state consistent with its trial list (rewriting files atomically where the
    filesystem does); raises DamagedSearchState if a file Tune needs is missing or unreadable."""
    import ray.cloudpickle as cloudpickle

    paths = {pattern: _newest(filesystem, folder, pattern)
             for pattern in (EXPERIMENT_STATE, SEARCH_GEN_STATE, SEARCHER_STATE)}
    for pattern, path in paths.items():
        if path is None:
            raise DamagedSearchState(f"{folder} has no {pattern} file")
    try:
        experiment = json.loads(_read(filesystem, paths[EXPERIMENT_STATE]))
        trials = {}
        for entry in experiment["trial_data"]:
            trial = json.loads(entry[0])
            trials[trial["trial_id"]] = trial["status"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise DamagedSearchState(f"{paths[EXPERIMENT_STATE]} is unreadable ({type(error).__name__}: {error})"
                                 ) from None
    try:
        generator = cloudpickle.loads(_read(filesystem, paths[SEARCH_GEN_STATE]))
        cloudpickle.loads(_read(filesystem, paths[SEARCHER_STATE]))
    except Exception as error:  # unpickling raises anything: EOFError, UnpicklingError, AttributeError ...
        raise DamagedSearchState(f"a searcher state file in {folder} is unreadable "
                                 f"({type(error).__name__}: {error})") from None

    changed = []
    if generator.get("counter") != len(trials):
        changed.append(f"trial counter {generator.get('counter')} -> {len(trials)}")
        generator["counter"] = len(trials)
    live = {trial_id for trial_id, status in trials.items() if status in UNFINISHED}
    for key in LIMITER_KEYS:
        limiter = generator.get(key)
        if limiter is not None and set(limiter.get("live_trials", ())) != live:
            changed.append(f"live trials {sorted(limiter.get('live_trials', ()))} -> {sorted(live)}")
            limiter["live_trials"] = set(live)
            limiter["num_unfinished_live_trials"] = len(live)
            limiter["cached_results"] = {}
    if changed:
        with filesystem.open_output_stream(paths[SEARCH_GEN_STATE]) as stream:
            stream.write(cloudpickle.dumps(generator))
    return SearchState(trials, changed)


def describe(state: SearchState) -> str:
    counts: dict[str, int] = {}
    for status in state.trials.values():
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{count} {status.lower()}" for status, count in sorted(counts.items())) or "no trials"

