"""A saved search that a killed driver left inconsistent or damaged: atomic writes, reconcile, set aside."""

from __future__ import annotations

import json
import os
import pickle

import pyarrow.fs
import pytest
import ray.cloudpickle as cloudpickle

from pf_ray.launch.atomic_fs import atomic_local_filesystem
from pf_ray.launch.search_state import DamagedSearchState, describe, reconcile

SESSION = "2026-11-23_08-08-20"


def _save(folder, statuses: dict[str, str], *, counter: int, live: set[str], session: str = SESSION) -> None:
    """The three files Tune writes per driver session, in the shape Tune 2.60 writes them."""
    trial_data = [[json.dumps({"trial_id": trial_id, "status": status}), "{}"] for trial_id, status in statuses.items()]
    (folder / f"experiment_state-{session}.json").write_text(json.dumps({"trial_data": trial_data}))
    generator = {"counter": counter, "total_samples": 4, "finished": False,
                 "name:ClusterConcurrency": {"live_trials": set(live), "num_unfinished_live_trials": len(live),
                                             "cached_results": {}, "max_concurrent": 2}}
    (folder / f"search_gen_state-{session}.json").write_bytes(cloudpickle.dumps(generator))
    (folder / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"observations": []}))


def _generator(folder, session: str = SESSION) -> dict:
    return cloudpickle.loads((folder / f"search_gen_state-{session}.json").read_bytes())


def test_a_consistent_state_is_left_as_it_is(tmp_path):
    _save(tmp_path, {"a": "TERMINATED", "b": "RUNNING"}, counter=2, live={"b"})
    before = (tmp_path / f"search_gen_state-{SESSION}.json").read_bytes()
    state = reconcile(pyarrow.fs.LocalFileSystem(), str(tmp_path))
    assert state.trials == {"a": "TERMINATED", "b": "RUNNING"} and state.changed == []
    assert describe(state) == "1 running, 1 terminated"
    assert (tmp_path / f"search_gen_state-{SESSION}.json").read_bytes() == before


def test_a_counter_ahead_of_the_trial_list_is_brought_back(tmp_path):
    # Killed after the generator's state (3 trials created, c live) was copied but before the trial list was:
    # restored as is, Tune would create only 1 more trial (4 - 3) although only 2 exist, and keep a slot for c.
    _save(tmp_path, {"a": "TERMINATED", "b": "PENDING"}, counter=3, live={"b", "c"})
    state = reconcile(atomic_local_filesystem(), str(tmp_path))
    assert state.changed == ["trial counter 3 -> 2", "live trials ['b', 'c'] -> ['b']"]
    generator = _generator(tmp_path)
    assert generator["counter"] == 2
    assert generator["name:ClusterConcurrency"]["live_trials"] == {"b"}
    assert generator["name:ClusterConcurrency"]["num_unfinished_live_trials"] == 1
    assert generator["name:ClusterConcurrency"]["max_concurrent"] == 2  # the rest untouched


def test_the_newest_session_is_the_one_reconciled(tmp_path):
    _save(tmp_path, {"a": "TERMINATED"}, counter=1, live=set(), session="2026-11-23_08-00-00")
    _save(tmp_path, {"a": "TERMINATED", "b": "TERMINATED", "c": "ERROR"}, counter=2, live={"b"})
    state = reconcile(pyarrow.fs.LocalFileSystem(), str(tmp_path))
    assert set(state.trials) == {"a", "b", "c"}
    assert _generator(tmp_path)["counter"] == 3
    assert _generator(tmp_path, "2026-11-23_08-00-00")["counter"] == 1


@pytest.mark.parametrize("damage", ["empty generator", "truncated searcher", "no trial list", "bad trial list"])
def test_a_damaged_state_is_refused(tmp_path, damage):
    _save(tmp_path, {"a": "TERMINATED"}, counter=1, live=set())
    if damage == "empty generator":  # what a driver killed during Tune's copy left before pf_ray.launch.atomic_fs
        (tmp_path / f"search_gen_state-{SESSION}.json").write_bytes(b"")
    elif damage == "truncated searcher":
        path = tmp_path / f"searcher-state-{SESSION}.pkl"
        path.write_bytes(path.read_bytes()[:5])
    elif damage == "no trial list":
        (tmp_path / f"experiment_state-{SESSION}.json").unlink()
    else:
        (tmp_path / f"experiment_state-{SESSION}.json").write_text('{"trial_data": [')
    with pytest.raises(DamagedSearchState):
        reconcile(pyarrow.fs.LocalFileSystem(), str(tmp_path))


def test_atomic_files_appear_whole_and_only_on_close(tmp_path):
    filesystem = atomic_local_filesystem()
    target = tmp_path / "experiment_state-x.json"
    target.write_text("old")
    stream = filesystem.open_output_stream(str(target))
    stream.write(b"new content")
    # Mid-write (where a SIGKILL would stop it): the old file is intact, the new bytes sit in a hidden partial
    # file that listings do not show.
    assert target.read_text() == "old"
    assert len(os.listdir(tmp_path)) == 2
    listed = [info.base_name for info in filesystem.get_file_info(pyarrow.fs.FileSelector(str(tmp_path)))]
    assert listed == ["experiment_state-x.json"]
    stream.close()
    assert target.read_text() == "new content" and os.listdir(tmp_path) == ["experiment_state-x.json"]


def test_atomic_filesystem_copies_folders_and_travels_to_workers(tmp_path):
    source = tmp_path / "staging" / "trial"
    source.mkdir(parents=True)
    (source / "result.json").write_text("r" * 1000)
    filesystem = pickle.loads(pickle.dumps(atomic_local_filesystem()))  # Ray pickles it to trials and workers
    pyarrow.fs.copy_files(str(tmp_path / "staging"), str(tmp_path / "storage"), destination_filesystem=filesystem)
    assert (tmp_path / "storage" / "trial" / "result.json").read_text() == "r" * 1000
    filesystem.copy_file(str(source / "result.json"), str(tmp_path / "copy.json"))
    assert (tmp_path / "copy.json").read_text() == "r" * 1000
