"""Every searcher under Ray Tune with ASHA and two trials at a time, on a trivial function trainable (no model):
all trials end (finished or stopped), none errors, the searcher is told of every completion, and the state Tune
saves for it loads back."""

from __future__ import annotations

import pytest
from ray.tune.search import Searcher

from search_algs.schedulers import make_asha
from tests.search_algs.test_searchers import MAX_EPOCHS, METRIC, MODE, SEARCHERS, small_space

pytestmark = pytest.mark.ray

NUM_TRIALS = 4


class Recording(Searcher):
    """Passes every call on to ``inner`` and records the completions Tune reports."""

    def __init__(self, inner: Searcher) -> None:
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self.completed: dict[str, bool] = {}  # trial id -> error flag

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.completed[trial_id] = error
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


def make_trainable():
    """A function trainable, built here so that cloudpickle ships it by value (tests/ is not on workers' path)."""

    def trainable(config: dict) -> None:
        from ray import tune

        values = [config[key] for key in sorted(config) if key.startswith("layer_")]
        accuracy = 0.9 - sum((v - 0.5) ** 2 for v in values) / len(values)
        for epoch in range(1, MAX_EPOCHS + 1):
            tune.report({METRIC: accuracy - 0.05 * (MAX_EPOCHS - epoch), "epoch": epoch})

    return trainable


@pytest.mark.parametrize("name", sorted(SEARCHERS))
def test_searcher_runs_under_tune_with_asha_and_sees_every_completion(ray_session, tmp_path, name):
    from ray import tune

    searcher = Recording(SEARCHERS[name](small_space(), 0))
    tuner = tune.Tuner(
        make_trainable(),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=make_asha(max_epochs=MAX_EPOCHS, grace_period=1, reduction_factor=2),
            metric=METRIC,
            mode=MODE,
            num_samples=NUM_TRIALS,
            max_concurrent_trials=2,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    assert len(grid) == NUM_TRIALS and grid.num_errors == 0 and grid.num_terminated == NUM_TRIALS
    trial_ids = {result.metrics["trial_id"] for result in grid}
    assert all(1 <= result.metrics["epoch"] <= MAX_EPOCHS for result in grid)
    assert all(0.2 <= result.config[key] <= 1.0 for result in grid for key in small_space().keys())
    assert searcher.completed == dict.fromkeys(trial_ids, False)
    # Tune saved the searcher beside the experiment (what Tuner.restore reads back): it loads into a fresh one.
    checkpoints = sorted((tmp_path / name).glob("searcher-state-*.pkl"))
    assert checkpoints
    SEARCHERS[name](small_space(), 1).restore(str(checkpoints[-1]))
    if name == "ddpg":  # the DDPG searcher learned from (or holds, if stopped early and waiting) every trial
        assert set(searcher.inner.outcomes) == trial_ids and not searcher.inner.pending
