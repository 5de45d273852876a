"""Ray paths on the tiny model: an in-process trial, a 2-worker Ray Train trial, a TPE + ASHA search."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from pf_ray.candidate import search_space
from pf_ray.checkpoint import load_checkpoint, save_checkpoint
from pf_ray.config import ExperimentConfig
from pf_ray.data import load_data
from pf_ray.metrics import ACCURACY, EPOCH, MACS_RATIO, PROXY_ACCURACY, SCORE
from pf_ray.models import build_model
from pf_ray.spec import RunSpec
from pf_ray.strict import from_dict
from trainables.trial import TrialSetup

pytestmark = pytest.mark.ray

TINY = {
    "model": {"name": "resnet20"},
    "dataset": {"name": "synthetic"},
    "learner": {"name": "channel_pruning", "options": {"round_to": 4, "num_batches": 2}},
    "search": {"num_trials": 4, "target_macs_ratio": 0.5, "validation_subset": 64,
               "fine_tune": {"epochs": 2, "batch_size": 64, "learning_rate": 0.01, "train_subset": 128}},
    "resources": {"cpus_per_trial": 1},
}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    config = from_dict(ExperimentConfig, TINY)
    data = load_data(config.dataset)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    return save_checkpoint(tmp_path_factory.mktemp("baseline") / "baseline.pt", model, model_config=config.model,
                           input_shape=data.input_shape, num_classes=data.num_classes)


def _run_one_trial(config: ExperimentConfig, baseline: Path, storage: Path):
    from ray import tune

    from pf_ray.launch.cluster import trial_cost
    from trainables import get_trainable

    data = load_data(config.dataset)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    spec = RunSpec.resolve(config)
    space = search_space(spec, model, data.input_shape)
    point = {key: 1.0 for key in space.keys()}
    trainable = tune.with_resources(
        tune.with_parameters(get_trainable("channel_pruning"), setup=TrialSetup(spec, space, str(baseline))),
        trial_cost(config)[0],
    )
    tuner = tune.Tuner(trainable, param_space=point,
                       run_config=tune.RunConfig(name="one", storage_path=str(storage), verbose=0))
    return tuner.fit()


def test_in_process_trial_reports_every_epoch_within_the_budget(ray_session, baseline, tmp_path):
    config = from_dict(ExperimentConfig, TINY)
    grid = _run_one_trial(config, baseline, tmp_path)
    result = grid[0]
    assert result.error is None
    history = result.metrics_dataframe
    assert list(history[EPOCH]) == [1, 2]
    assert history[ACCURACY].between(0, 1).all()
    assert result.metrics[MACS_RATIO] <= 0.5


def test_two_worker_ray_train_trial_distils_reports_and_checkpoints(ray_session, baseline, tmp_path):
    # With distillation: each Train worker builds the teacher too (tests/launch/test_learner_trials.py: in a trial).
    config = from_dict(ExperimentConfig, {
        **TINY, "learner": {**TINY["learner"], "distillation": {"weight": 4.0, "temperature": 4.0}},
        "resources": {"workers_per_trial": 2, "cpus_per_worker": 1}})
    grid = _run_one_trial(config, baseline, tmp_path)
    result = grid[0]
    assert result.error is None, result.error
    assert list(result.metrics_dataframe[EPOCH]) == [1, 2]
    assert result.metrics[MACS_RATIO] <= 0.5
    # cross-entropy + 4 * the soft-target term (about ln 10 for an untrained teacher): see test_learner_trials.py
    assert min(result.metrics_dataframe["loss"]) > 8.0
    # The Train run is named after the trial id and left a checkpoint per epoch (2 kept).
    trial_id = result.metrics["trial_id"]
    checkpoints = sorted(p for p in (Path(result.path) / "train" / trial_id).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    assert all((c / "model.pt").is_file() for c in checkpoints)


# `make test-slow`: each full search costs 25-60 s on 2 cores. The default run has every searcher under Tune with
# ASHA on a trivial trainable (tests/launch/test_searchers_under_tune.py), each learner's trainable under a
# searcher with ASHA (tests/launch/test_learner_trials.py), and TPE with ASHA on this trainable inside
# `pf-ray compress` (tests/launch/test_compress.py).
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["tpe", "gp", "ddpg", "random"])
def test_search_with_asha_scores_only_candidates_within_budget(ray_session, baseline, tmp_path, algorithm):
    from pf_ray.launch.search import choose_best, run_search

    config = from_dict(ExperimentConfig, {**TINY, "search": {**TINY["search"], "algorithm": algorithm}})
    data = load_data(config.dataset)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    space = search_space(RunSpec.resolve(config), model, data.input_shape)
    trials = run_search(RunSpec.resolve(config), space, baseline, tmp_path, log=lambda line: None)
    assert len(trials) == 4
    assert all(t["error"] is None for t in trials)
    assert all(t[MACS_RATIO] <= 0.5 + 1e-9 for t in trials)
    assert all(1 <= t[EPOCH] <= 2 for t in trials)
    # Every searcher proposes the uniform candidate among its first: every layer the same.
    assert any(len(set(t["proposal"])) == 1 for t in trials)
    best = choose_best(trials, max_epochs=2)
    assert best[EPOCH] == 2
    assert best[SCORE] == max(t[SCORE] for t in trials if t[EPOCH] == 2)
    assert all(t[SCORE] == t[ACCURACY] for t in trials)  # reward "accuracy": the score is the accuracy
    assert all(0 <= t[PROXY_ACCURACY] <= 1 for t in trials)


def test_proxy_scoring_runs_no_fine_tuning_and_amc_reward(ray_session, baseline, tmp_path):
    from pf_ray.launch.search import run_search

    config = from_dict(ExperimentConfig, {**TINY, "search": {**TINY["search"], "num_trials": 2,
                                                             "scoring": "proxy", "reward": "amc"}})
    data = load_data(config.dataset)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    spec = RunSpec.resolve(config)
    trials = run_search(spec, search_space(spec, model, data.input_shape), baseline, tmp_path, log=lambda line: None)
    for trial in trials:
        assert trial[EPOCH] == 1 and trial[ACCURACY] == trial[PROXY_ACCURACY]
        assert trial[SCORE] == pytest.approx(-(1 - trial[ACCURACY]) * math.log(trial["macs"]))


def test_latency_reward_measures_each_candidate_on_its_node(ray_session, baseline, tmp_path):
    """The trials (Ray workers started before this test) use the default cache, ~/.cache/pf_ray/latency; the
    cache itself is tested in test_latency.py."""
    from pf_ray.launch.search import run_search

    config = from_dict(ExperimentConfig, {**TINY, "search": {**TINY["search"], "num_trials": 2,
                                                             "scoring": "proxy", "reward": "latency"}})
    data = load_data(config.dataset)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    spec = RunSpec.resolve(config)
    trials = run_search(spec, search_space(spec, model, data.input_shape), baseline, tmp_path / "run",
                        log=lambda line: None)
    assert len(trials) == 2
    for trial in trials:
        assert trial["error"] is None and trial["latency_ms"] > 0
        assert trial[SCORE] == pytest.approx(trial[ACCURACY] * trial["latency_ratio"] ** -0.07)


def test_a_diverging_trial_and_a_crashing_one_do_not_stop_the_search(ray_session, baseline, tmp_path, monkeypatch):
    """Of three GP trials, one diverges for real (its loss overflows: the fit's own check) and one crashes on its
    first attempt: the first ends failed with its reason, the second is retried (search.max_failures 1) and
    finishes, the GP is told of the failure, and the search picks its best among the rest."""
    import os
    import pickle

    import ray.tune

    import trainables
    from pf_ray.launch.search import choose_best, run_search

    real = trainables.get_trainable("channel_pruning")
    faults = tmp_path / "faults"
    faults.mkdir()
    # The diverging trial starts from a baseline whose classifier weights are near float32's largest value:
    # its logits overflow, so its first fine-tuning loss is not finite.
    model, info = load_checkpoint(baseline)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        classifier.weight.mul_(1e37)
    poisoned = save_checkpoint(tmp_path / "poisoned.pt", model, model_config=info.model,
                               input_shape=info.input_shape, num_classes=info.num_classes)

    def faulty(config, setup):
        trial_id = ray.tune.get_context().get_trial_id()
        role = faults / f"role-{trial_id}"
        if not role.exists():  # the k-th trial to start takes slot k (O_EXCL: concurrent trials never share one)
            slot = 0
            while True:
                try:
                    os.close(os.open(faults / f"slot-{slot}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    break
                except FileExistsError:
                    slot += 1
            role.write_text(str(slot))
        slot = int(role.read_text())
        with open(faults / f"attempts-{trial_id}", "a") as attempts:
            attempts.write("x")
        if slot == 0:
            setup = dataclasses.replace(setup, baseline_checkpoint=str(poisoned))
        if slot == 1 and (faults / f"attempts-{trial_id}").read_text() == "x":
            raise RuntimeError("simulated crash of the trial's process")
        return real(config, setup=setup)

    monkeypatch.setattr(trainables, "get_trainable", lambda name: faulty)
    config = from_dict(ExperimentConfig, {**TINY, "search": {**TINY["search"], "algorithm": "gp",
                                                             "max_failures": 1, "num_trials": 3}})
    data = load_data(config.dataset)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    spec = RunSpec.resolve(config)
    trials = run_search(spec, search_space(spec, model, data.input_shape), baseline, tmp_path / "run",
                        log=lambda line: None)
    by_slot = {int((faults / f"role-{t['trial_id']}").read_text()): t for t in trials}
    assert sorted(by_slot) == [0, 1, 2]
    diverged, crashed = by_slot[0], by_slot[1]
    assert diverged["error"].startswith("FloatingPointError: training diverged: loss is ")
    assert crashed["error"] is None and crashed[EPOCH] >= 1  # finished, or stopped by ASHA like any other
    assert (faults / f"attempts-{crashed['trial_id']}").read_text() == "xx"  # failed once, retried once
    assert all(t["error"] is None for slot, t in by_slot.items() if slot != 0)
    search_dir = tmp_path / "run" / "search"
    state = pickle.loads(sorted(search_dir.glob("searcher-state-*.pkl"))[-1].read_bytes())
    assert state["counts"]["errored"] == 1 and len(state["observations"]) == 2
    assert choose_best(trials, max_epochs=2)["trial_id"] != diverged["trial_id"]


def test_retrain_progress_reaches_the_driver_through_its_queue(ray_session, tmp_path):
    """Rank 0 of a Ray Train run may be on any node: it sends its progress lines and epoch metrics to a queue
    that the driver drains into its own progress.log and TensorBoard files."""
    import ray

    from trainables.progress_relay import PROGRESS_LINE, PROGRESS_SCALARS, driver_progress, sender

    @ray.remote(num_cpus=0)
    def rank0(queue, items) -> None:  # what the train loop's rank 0 does, in another process
        send = sender(queue)
        for item in items:
            send(item)

    shown: list[str] = []
    folder = tmp_path / "retrain"
    with driver_progress(folder, shown.append) as queue:
        ray.get(rank0.remote(queue, [(PROGRESS_LINE, "  epoch 1/2 ..."),
                                     (PROGRESS_SCALARS, 1, {ACCURACY: 0.5, "loss": 1.25})]))
        stale = ray.put(queue)  # the queue as a worker holds it
    assert shown == ["  epoch 1/2 ..."]
    assert (folder / "progress.log").read_text() == "  epoch 1/2 ...\n"
    assert sorted(_scalars(folder / "tensorboard")) == [(1, "retrain/accuracy", 0.5), (1, "retrain/loss", 1.25)]
    # A queue that is gone (its driver ended) drops progress without failing the training.
    ray.get(rank0.remote(stale, [(PROGRESS_LINE, "after the driver")]))
    assert (folder / "progress.log").read_text() == "  epoch 1/2 ...\n"


def _scalars(folder: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a folder's TensorBoard event files (TFRecord: length, CRC, event, CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in folder.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            found += [(event.step, value.tag, value.simple_value) for value in event.summary.value]
    return found
