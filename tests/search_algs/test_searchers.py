"""One contract every searcher keeps (no Ray cluster needed): bounds, suggest/complete cycles, NaN, errored and
early-stopped trials, concurrent suggestions, save/restore. A new searcher is tested by adding its factory to
SEARCHERS."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from ray.tune.search import Searcher

from pf_ray.search_space import PerLayerSpace
from search_algs.ddpg.searcher import DDPGSearcher

METRIC = "accuracy"
MODE = "max"
MAX_EPOCHS = 2


@dataclass(frozen=True)
class MeanBudget:
    """Cost = the mean value (keep ratios of equal-sized layers); at most half the baseline's cost."""

    target: float = 0.5

    def cost(self, values: Sequence[float]) -> float:
        return sum(values) / len(values)


def small_space(layers: int = 4) -> PerLayerSpace:
    features = tuple((float(i), 16.0, 16.0, 9.0, 1.0 + (i == 2), 64.0 / (1 + (i >= 2)), 1000.0 + 500.0 * i)
                     for i in range(layers))
    return PerLayerSpace("layer_keep_ratios", tuple(f"block{i}.conv" for i in range(layers)), low=0.2, high=1.0,
                         budget=MeanBudget(), features=features)


def make_tpe(space: PerLayerSpace, seed: int, starts: Sequence[Sequence[float]] = ()) -> Searcher:
    from search_algs.tpe import make_tpe

    return make_tpe(space, metric=METRIC, mode=MODE, seed=seed, num_trials=12, starts=starts)


def make_random(space: PerLayerSpace, seed: int, starts: Sequence[Sequence[float]] = ()) -> Searcher:
    from search_algs.random_search import RandomSearcher

    return RandomSearcher(space, metric=METRIC, mode=MODE, seed=seed, starts=starts)


def make_ddpg(space: PerLayerSpace, seed: int, starts: Sequence[Sequence[float]] = ()) -> Searcher:
    from search_algs.ddpg.searcher import DDPGSearcher

    return DDPGSearcher(space, metric=METRIC, mode=MODE, seed=seed, num_warmup=3, num_trials=12,
                        max_epochs=MAX_EPOCHS, starts=starts)


def make_gp(space: PerLayerSpace, seed: int, starts: Sequence[Sequence[float]] = ()) -> Searcher:
    from search_algs.gp import GPSearcher

    return GPSearcher(space, metric=METRIC, mode=MODE, seed=seed, starts=starts)


# name -> factory(space, seed, starts=()); every searcher here is seeded (same seed and results -> same
# suggestions).
SEARCHERS: dict[str, Callable[..., Searcher]] = {
    "tpe": make_tpe,
    "random": make_random,
    "ddpg": make_ddpg,
    "gp": make_gp,
}


@pytest.fixture(params=sorted(SEARCHERS))
def factory(request) -> Callable[..., Searcher]:
    return SEARCHERS[request.param]


def score(config: dict[str, float]) -> float:
    """A smooth stand-in for accuracy, best with every layer at 0.5."""
    values = [config[key] for key in sorted(config)]
    return 0.9 - sum((v - 0.5) ** 2 for v in values) / len(values)


def report(searcher: Searcher, trial_id: str, config: dict[str, float], *, epochs: int = MAX_EPOCHS,
           value: float | None = None) -> None:
    """What Tune does for a trial: one result per epoch, then completion with the last result."""
    final = score(config) if value is None else value
    result = {}
    for epoch in range(1, epochs + 1):
        result = {METRIC: final - 0.05 * (epochs - epoch) if not math.isnan(final) else final, "epoch": epoch}
        searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result=result)


def check_config(config: dict[str, float], space: PerLayerSpace) -> None:
    assert sorted(config) == space.keys()
    for key, value in config.items():
        assert isinstance(value, float) and math.isfinite(value), (key, value)
        assert space.low <= value <= space.high, (key, value)


def test_suggestions_cover_every_layer_within_bounds_over_suggest_complete_cycles(factory):
    space = small_space()
    searcher = factory(space, 0)
    for i in range(10):
        config = searcher.suggest(f"t{i}")
        check_config(config, space)
        report(searcher, f"t{i}", config)


def _run_with_bad_trials(searcher: Searcher, space: PerLayerSpace, *, nan_as_error: bool) -> list[dict[str, float]]:
    """Ten trials of every outcome (NaN, errored, stopped early by ASHA, finished), then five suggestions after them
    (model-based steps, where a searcher has them); returns those five."""
    for i in range(10):
        config = searcher.suggest(f"t{i}")
        check_config(config, space)
        kind = i % 4
        if kind == 1:
            if nan_as_error:  # the same trial failing instead: the same NaN results, then an error
                for epoch in range(1, MAX_EPOCHS + 1):
                    searcher.on_trial_result(f"t{i}", {METRIC: math.nan, "epoch": epoch})
                searcher.on_trial_complete(f"t{i}", result=None, error=True)
            else:
                report(searcher, f"t{i}", config, value=math.nan)
        elif kind == 2:
            searcher.on_trial_complete(f"t{i}", result=None, error=True)
        elif kind == 3:
            report(searcher, f"t{i}", config, epochs=1)  # stopped by ASHA after the first epoch
        else:
            report(searcher, f"t{i}", config)
    following = []
    for i in range(10, 15):
        config = searcher.suggest(f"t{i}")
        check_config(config, space)
        following.append(config)
        report(searcher, f"t{i}", config)
    return following


def test_nan_errored_and_early_stopped_trials_are_taken_and_poison_nothing(factory):
    """A NaN result teaches a searcher exactly what a failed trial teaches, nothing: the suggestions that follow
    are the very ones a twin searcher makes when those trials fail instead, and all stay in the box."""
    space = small_space()
    with_nan = _run_with_bad_trials(factory(space, 1), space, nan_as_error=False)
    with_errors = _run_with_bad_trials(factory(space, 1), space, nan_as_error=True)
    assert with_nan == with_errors


def test_concurrent_suggestions_before_any_completion_are_distinct(factory):
    space = small_space()
    searcher = factory(space, 2)
    configs = [searcher.suggest(f"t{i}") for i in range(4)]
    for config in configs:
        check_config(config, space)
    assert len({tuple(sorted(c.items())) for c in configs}) == 4
    for i, config in reversed(list(enumerate(configs))):  # completions in another order than suggestions
        report(searcher, f"t{i}", config)
    check_config(searcher.suggest("t4"), space)


def test_the_first_proposals_are_the_uniform_point_then_the_starts(factory):
    """The classic baseline, then the learner's heuristic (the knapsack allocation), before any searcher's own
    suggestion: a search never ends worse than either."""
    space = small_space()
    knapsack = (0.9, 0.3, 0.5, 0.2)  # within the box [0.2, 1] and the mean budget of 0.5 (0.475)
    searcher = factory(space, 5, starts=[knapsack])
    first, second = searcher.suggest("t0"), searcher.suggest("t1")
    if isinstance(searcher, DDPGSearcher):  # DDPG acts within the budget: the largest value all layers can share
        assert len(set(first.values())) == 1 and space.budget.cost(list(first.values())) <= space.budget.target
    else:
        assert first == {key: space.high for key in space.keys()}
    assert [second[key] for key in space.keys()] == pytest.approx(knapsack)
    report(searcher, "t0", first)
    report(searcher, "t1", second)
    check_config(searcher.suggest("t2"), space)


def test_the_knapsack_searcher_proposes_uniform_and_its_starts_then_ends():
    from ray.tune.search import Searcher as TuneSearcher

    from search_algs.knapsack import KnapsackSearcher

    space = small_space()
    searcher = KnapsackSearcher(space, metric=METRIC, mode=MODE, starts=[(0.9, 0.3, 0.5, 0.2)])
    assert searcher.suggest("t0") == {key: 1.0 for key in space.keys()}
    assert list(searcher.suggest("t1").values()) == [0.9, 0.3, 0.5, 0.2]
    assert searcher.suggest("t2") == TuneSearcher.FINISHED
    with pytest.raises(ValueError, match="needs a starting proposal"):
        KnapsackSearcher(space, metric=METRIC, mode=MODE)
    with pytest.raises(ValueError, match=r"a starting proposal needs 4 values in \[0\.2, 1\.0\]"):
        KnapsackSearcher(space, metric=METRIC, mode=MODE, starts=[(0.9, 0.3)])


def test_save_then_restore_into_a_fresh_searcher_continues_the_same_search(factory, tmp_path):
    space = small_space()
    original = factory(space, 3)
    configs = {f"t{i}": original.suggest(f"t{i}") for i in range(7)}
    for trial_id in ("t0", "t1", "t2", "t3", "t4"):
        report(original, trial_id, configs[trial_id], epochs=1 if trial_id == "t3" else MAX_EPOCHS)
    path = tmp_path / "searcher.pkl"
    original.save(str(path))

    restored = factory(space, 4)  # another seed: everything must come from the checkpoint
    restored.restore(str(path))
    for searcher in (original, restored):  # t5 and t6 were running across the restore
        report(searcher, "t5", configs["t5"])
        searcher.on_trial_complete("t6", result=None, error=True)
    following = [[searcher.suggest(f"n{i}") for i in range(3)] for searcher in (original, restored)]
    for config in following[1]:
        check_config(config, space)
    assert following[0] == following[1]



def test_tpe_does_not_feed_nan_to_hyperopt():
    import hyperopt

    from search_algs import tpe

    space = PerLayerSpace("layer_keep_ratios", ("a", "b"), low=0.2, high=1.0)
    searcher = tpe.make_tpe(space, metric="score", mode="max", seed=0, num_trials=8)
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"score": float("nan"), "epoch": 2})
    searcher.suggest("b")
    searcher.on_trial_complete("b", {"score": 0.5, "epoch": 2})
    # The NaN trial is marked failed (hyperopt leaves failed trials out of its model); only 0.5 is a loss.
    states = [t["state"] for t in searcher._hpopt_trials._dynamic_trials]
    assert states == [hyperopt.base.JOB_STATE_ERROR, hyperopt.base.JOB_STATE_DONE]
    assert searcher._hpopt_trials.losses() == [-0.5]
