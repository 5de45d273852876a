"""The DDPG agent (pure torch) on a toy problem with a known optimum, and the DDPG searcher's own rules: budget
clipping, state, and what finished, early-stopped, errored and NaN trials teach it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from pf_ray.errors import ConfigError
from pf_ray.search_space import PerLayerSpace
from search_algs.ddpg.agent import AgentConfig, DDPGAgent, truncated_normal
from search_algs.ddpg.searcher import DDPGSearcher, Outcome

METRIC = "accuracy"


@dataclass(frozen=True)
class MeanBudget:
    """Cost = the mean value (like keep ratios of equal-sized layers); the target is a fraction of the full cost."""

    target: float

    def cost(self, values: Sequence[float]) -> float:
        return sum(values) / len(values)


def space(*, budget=MeanBudget(0.5), features=True, layers: int = 4) -> PerLayerSpace:
    rows = tuple((float(i), 16.0 * (i + 1), 8.0, 9.0, 1.0, 64.0, 1000.0 * (i + 1)) for i in range(layers))
    return PerLayerSpace("layer_keep_ratios", tuple(f"conv{i}" for i in range(layers)), low=0.2, high=1.0,
                         budget=budget, features=rows if features else ())


def values(config: dict[str, float]) -> list[float]:
    return [config[key] for key in sorted(config)]


# --------------------------------------------------------------------------------------------------------------
# The agent.


def _run_toy(agent: DDPGAgent, targets: torch.Tensor, episodes: int) -> None:
    """Reward = -sum_i (a_i - target_i)^2; the state of layer i is the one-hot vector of i."""
    one_hot = torch.eye(len(targets))
    for _ in range(episodes):
        agent.start_episode()
        actions = torch.tensor([agent.act(one_hot[i]) for i in range(len(targets))])
        agent.observe_episode(one_hot, actions, -float(((actions - targets) ** 2).sum()))


def test_agent_learns_each_layers_optimal_action_on_a_toy_problem():
    targets = torch.tensor([0.2, 0.8, 0.5, 0.35])
    # The buffer keeps the last 40 episodes (PocketFlow: layers x warm-up); the noise falls from 0.5 to ~0.03.
    agent = DDPGAgent(AgentConfig(state_size=4, num_warmup=40, noise_decay=0.985, buffer_size=4 * 40, seed=0))
    one_hot = torch.eye(4)
    before = torch.tensor([agent.greedy(s) for s in one_hot])
    _run_toy(agent, targets, episodes=200)
    after = torch.tensor([agent.greedy(s) for s in one_hot])
    # Tolerance: at this point a 0.15 error per layer costs at most 0.09 of reward (uniform random play: ~0.3).
    assert (after - targets).abs().max() < 0.15, after
    assert (after - targets).abs().mean() < (before - targets).abs().mean() / 2
    assert agent.noise_std < 0.05


def test_agent_is_deterministic_and_its_state_dict_continues_exactly():
    targets = torch.tensor([0.3, 0.7])
    config = AgentConfig(state_size=2, num_warmup=3, buffer_size=20, batch_size=8, critic_warmup_updates=5,
                         seed=7)
    first, second = DDPGAgent(config), DDPGAgent(config)
    _run_toy(first, targets, episodes=6)
    _run_toy(second, targets, episodes=6)
    state = first.state_dict()
    assert state["episodes_observed"] == 6 and state["baseline"] is not None

    resumed = DDPGAgent(AgentConfig(state_size=2, seed=123, num_warmup=3, buffer_size=20, batch_size=8))
    resumed.load_state_dict(state)
    for agent in (first, second, resumed):
        _run_toy(agent, targets, episodes=3)
    probe = torch.eye(2)
    actions = [[agent.greedy(s) for s in probe] + [agent.act(probe[0])] for agent in (first, second, resumed)]
    assert actions[0] == actions[1] == actions[2]
    assert first.noise_std == resumed.noise_std and first.baseline == resumed.baseline


def test_agent_checkpoint_of_another_shape_is_refused():
    state = DDPGAgent(AgentConfig(state_size=3)).state_dict()
    with pytest.raises(ConfigError, match="state_size is 3"):
        DDPGAgent(AgentConfig(state_size=4)).load_state_dict(state)


def test_agent_refuses_a_non_finite_reward():
    agent = DDPGAgent(AgentConfig(state_size=1, num_warmup=5))
    agent.start_episode()
    with pytest.raises(ValueError, match="reward: got nan"):
        agent.observe_episode(torch.zeros(1, 1), torch.zeros(1), math.nan)


def test_truncated_normal_stays_within_bounds():
    generator = torch.Generator().manual_seed(0)
    draws = [truncated_normal(0.95, 0.5, 0.2, 1.0, generator) for _ in range(200)]
    assert all(0.2 <= d <= 1.0 for d in draws)
    assert truncated_normal(1.0, 0.0, 0.2, 1.0, generator) == 1.0
    assert truncated_normal(1.0, 1e-9, 0.2, 1.0, generator) == pytest.approx(1.0)


def test_agent_config_names_a_bad_value():
    with pytest.raises(ConfigError, match="gamma: got 1.5; allowed range is"):
        AgentConfig(state_size=2, gamma=1.5)


# --------------------------------------------------------------------------------------------------------------
# The searcher.


def _searcher(**kwargs) -> DDPGSearcher:
    options = {"metric": METRIC, "mode": "max", "seed": 0, "num_warmup": 2, **kwargs}
    return DDPGSearcher(options.pop("space", space()), **options)


def _finish(searcher: DDPGSearcher, trial_id: str, curve: list[float]) -> None:
    """Report one result per epoch, then complete with the last one (what Tune does)."""
    for epoch, value in enumerate(curve, start=1):
        searcher.on_trial_result(trial_id, {METRIC: value, "epoch": epoch})
    searcher.on_trial_complete(trial_id, {METRIC: curve[-1], "epoch": len(curve)})


def test_first_suggestion_is_the_uniform_candidate_at_the_budget():
    config = _searcher().suggest("t0")
    assert list(config) == space().keys()
    assert len(set(config.values())) == 1
    assert next(iter(config.values())) == pytest.approx(0.5, abs=1e-5)  # mean budget: 0.5 is the most allowed


def test_every_suggestion_keeps_the_budget_by_clipping_each_action():
    searcher = _searcher(num_warmup=3)
    budget = space().budget
    for i in range(12):
        config = searcher.suggest(f"t{i}")
        assert all(0.2 <= v <= 1.0 for v in config.values())
        assert budget.cost(values(config)) <= budget.target + 1e-9
        _finish(searcher, f"t{i}", [0.5 + 0.1 * math.sin(i), 0.6 + 0.1 * math.sin(i)])
    assert searcher.agent.episodes_observed == 12 and not searcher.pending


@dataclass(frozen=True)
class KeptBudget:
    """Cost = the mean kept fraction 1 - value (like per-layer sparsities): it falls as the values grow."""

    target: float

    def cost(self, values: Sequence[float]) -> float:
        return sum(1.0 - v for v in values) / len(values)


def test_a_budget_that_falls_as_values_grow_is_searched_through_a_mirror():
    # 75% sparsity over equal layers in [0, 0.98]: keep at most 25%. Without the mirror every action clipped to
    # 0 (no sparsity, the most the budget "allows" if cost grew with the value) and every proposal was the same.
    sparsity_space = PerLayerSpace("layer_sparsities", tuple(f"conv{i}" for i in range(4)), low=0.0, high=0.98,
                                   budget=KeptBudget(0.25), features=space().features)
    searcher = DDPGSearcher(sparsity_space, metric=METRIC, mode="max", seed=0, num_warmup=3, num_trials=12,
                            max_epochs=2)
    first = searcher.suggest("t0")
    assert values(first) == pytest.approx([0.75] * 4, abs=1e-5)  # the uniform candidate: 75% everywhere
    _finish(searcher, "t0", [0.5, 0.6])
    proposals = []
    for i in range(1, 10):
        config = searcher.suggest(f"t{i}")
        proposals.append(tuple(values(config)))
        assert all(0.0 <= v <= 0.98 for v in config.values())
        assert sparsity_space.budget.cost(values(config)) <= 0.25 + 1e-9  # at least 75% sparse on average
        _finish(searcher, f"t{i}", [0.5, 0.6])
    assert len(set(proposals)) == len(proposals)  # varied, not the uniform point again and again


def test_state_columns_describe_the_layer_and_the_budget_spent():
    searcher = _searcher()
    searcher.agent.start_episode()
    states, actions = searcher._roll_out([0.5] * len(searcher._keys))
    # 7 feature columns / their max, then cost removed so far, lowest cost reachable, previous action in [0, 1].
    assert states.shape == (4, 7 + 2 + 1)
    assert states[:, :7].max() == 1.0 and states[3, 6] == 1.0 and states[0, 6] == 0.25
    assert states[0, 7] == 0.0 and states[0, 8] == pytest.approx(0.2) and states[0, 9] == 1.0
    assert states[1, 7] == pytest.approx((1.0 - 0.5) / 4)  # layer 0 at 0.5 removed an eighth of the cost
    assert states[1, 9] == pytest.approx((0.5 - 0.2) / 0.8)
    assert actions.tolist() == [0.5] * 4


def test_without_budget_or_features_the_state_is_the_index_and_nothing_is_clipped():
    searcher = _searcher(space=space(budget=None, features=False))
    assert searcher.agent.config.state_size == 2  # index / last index, previous action
    assert values(searcher.suggest("t0")) == [1.0] * 4  # the uniform point is space.high
    suggestions = [values(searcher.suggest(f"t{i}")) for i in range(1, 6)]
    assert all(0.2 <= v <= 1.0 for s in suggestions for v in s)
    assert any(sum(s) / 4 > 0.5 for s in suggestions)  # no budget: nothing holds the mean down


def test_finished_trial_teaches_its_metric_and_min_mode_negates_it():
    for mode, reward in (("max", 0.7), ("min", -0.7)):
        searcher = _searcher(mode=mode)
        searcher.suggest("a")
        _finish(searcher, "a", [0.5, 0.7])
        assert searcher.outcomes == {"a": Outcome.LEARNED}
        assert searcher.agent.baseline == pytest.approx(reward)


def test_early_stopped_trial_is_compared_at_equal_epochs_once_a_trial_has_finished():
    searcher = _searcher(max_epochs=2, num_warmup=5)
    for trial_id in "abc":
        searcher.suggest(trial_id)
    _finish(searcher, "b", [0.40])  # stopped by ASHA after epoch 1, before any trial finished
    assert searcher.outcomes["b"] == Outcome.WAITING and searcher.agent.episodes_observed == 0
    _finish(searcher, "a", [0.50, 0.70])  # finished: gain from epoch 1 to 2 is 0.2
    assert searcher.outcomes == {"a": Outcome.LEARNED, "b": Outcome.LEARNED_ESTIMATED}
    rewards = searcher.agent.buffer.rewards[: searcher.agent.buffer.size].unique().tolist()
    assert sorted(rewards) == pytest.approx([0.40 + 0.20, 0.70])  # b is scored as if at epoch 2
    _finish(searcher, "c", [0.30])  # a gain is known now: learned at once
    assert searcher.outcomes["c"] == Outcome.LEARNED_ESTIMATED and searcher.agent.episodes_observed == 3


def test_errored_and_nan_trials_teach_nothing_and_poison_nothing():
    searcher = _searcher(num_warmup=2)
    for i in range(3):
        searcher.suggest(f"ok{i}")
        _finish(searcher, f"ok{i}", [0.5, 0.6 + 0.01 * i])
    searcher.suggest("crashed")
    searcher.suggest("nan")
    searcher.suggest("inf")
    searcher.suggest("empty")
    searcher.on_trial_complete("crashed", None, error=True)
    _finish(searcher, "nan", [math.nan, math.nan])
    _finish(searcher, "inf", [0.5, math.inf])
    searcher.on_trial_complete("empty", {"epoch": 1})
    assert searcher.outcomes["crashed"] == Outcome.DROPPED_ERROR
    assert {searcher.outcomes[t] for t in ("nan", "inf", "empty")} == {Outcome.DROPPED_INVALID}
    assert searcher.agent.episodes_observed == 3 and not searcher.pending
    searcher.on_trial_complete("never-suggested", {METRIC: 0.9, "epoch": 2})  # ignored
    for i in range(3):
        config = searcher.suggest(f"later{i}")
        assert all(math.isfinite(v) and 0.2 <= v <= 1.0 for v in config.values())
    assert all(torch.isfinite(p).all() for p in searcher.agent.actor.parameters())


def test_save_restore_keeps_agent_pending_and_waiting_trials(tmp_path):
    original = _searcher(max_epochs=3)
    for i in range(4):  # finished, but only their last results arrive: no gain from epoch 1 is known yet
        original.suggest(f"t{i}")
        original.on_trial_complete(f"t{i}", {METRIC: 0.6 + 0.02 * i, "epoch": 3})
    original.suggest("running")
    original.suggest("stopped")
    _finish(original, "stopped", [0.45])
    assert original.outcomes["stopped"] == Outcome.WAITING
    original.save(str(tmp_path / "searcher.pt"))
    restored = _searcher(max_epochs=3, seed=99)
    restored.restore(str(tmp_path / "searcher.pt"))
    assert restored.pending == ["running"] and restored.outcomes == original.outcomes

    for searcher in (original, restored):
        _finish(searcher, "running", [0.5, 0.6, 0.65])  # the trial outlived the restore
    assert restored.outcomes["stopped"] == Outcome.LEARNED_ESTIMATED
    assert [original.suggest(f"n{i}") for i in range(3)] == [restored.suggest(f"n{i}") for i in range(3)]


def test_searcher_names_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        _searcher(mode="maximise")
    with pytest.raises(ValueError, match="num_warmup must be an integer >= 0"):
        _searcher(num_warmup=-1)
    with pytest.raises(ValueError, match="needs a metric"):
        DDPGSearcher(space()).suggest("t0")
