"""DDPG over per-layer compression settings as a Ray Tune Searcher (AMC, He et al., ECCV 2018; PocketFlow).

One suggestion = one episode: the actor walks the layers in model order and picks each layer's value from a state
that describes the layer and the budget spent so far; the trial's metric is the episode's reward.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pf_ray.metrics import EPOCH, finite_number
from pf_ray.search_space import PerLayerSpace
from search_algs.base import PerLayerSearcher
from search_algs.ddpg.agent import AgentConfig, DDPGAgent

logger = logging.getLogger(__name__)

BISECTION_STEPS = 20  # budget clipping: the action is exact to (high - low) / 2^20
MIN_BUFFER_EPISODES = 20  # the replay buffer keeps at least this many recent episodes


class Outcome(enum.StrEnum):
    """What a completed trial taught the agent (``DDPGSearcher.outcomes``)."""

    LEARNED = "learned"  # its final-epoch metric was the episode's reward
    LEARNED_ESTIMATED = "learned_estimated"  # stopped early; reward = metric + the peers' gain to the final epoch
    WAITING = "waiting"  # stopped early, and no trial has finished every epoch yet to estimate the gain from
    DROPPED_ERROR = "dropped_error"  # the trial failed: nothing learned
    DROPPED_INVALID = "dropped_invalid"  # NaN, infinite or missing metric: nothing learned


class DDPGSearcher(PerLayerSearcher):
    """A DDPG agent (``search_algs.ddpg.agent``) proposing one value per layer in ``[space.low, space.high]``.

    State of layer t (one row, every column in [0, 1] or close to it):

    - the layer's static features, ``space.features`` row t, each column divided by its largest absolute value
      over the layers (``LAYER_FEATURES``: index, channels, in channels, kernel, stride, positions, MACs);
    - with a budget: the fraction of the baseline's cost (e.g. MACs) already removed by the actions of layers
      0..t-1 (later layers at ``space.high``), and the lowest cost still reachable (layers 0..t-1 at their actions,
      layers t.. at ``space.low``), both through ``space.budget.cost``;
    - the previous layer's action, rescaled to [0, 1] (1.0 before the first layer: nothing compressed yet).

    Without features the static part is the layer index alone, divided by the last index; without a budget the
    two cost columns are left out and nothing is clipped.

    Budget: each action is clipped (by bisection) to the largest value that keeps the target reachable with every
    later layer at ``space.low``, as PocketFlow and AMC do, so every proposal is within the budget; the trial's
    projection then only scales it up to spend the budget. The agent stores the clipped actions. Where the
    budget's cost falls as the values grow (per-layer sparsities: more sparsity keeps fewer weights), the agent
    acts on the mirrored values low + high - x (densities, for sparsity), so the clipping and the state's cost
    columns read the same way for every learner; suggestions are mirrored back.

    The first suggestion is the uniform candidate at the budget (the largest single value every layer can share),
    the classic baseline every searcher starts from; it counts as the first warm-up episode. The ``starts`` (the
    learner's heuristic allocations, e.g. the knapsack) come next, as warm-up episodes with fixed actions; the
    remaining warm-up episodes are uniformly random, then the actor with truncated normal noise decaying geometrically.

    Several trials may be in flight: each trial's episode (states, actions) is kept by trial id until the trial
    completes. What a completed trial teaches the agent (``outcomes`` records it per trial id):

    - **finished** (its last ``result["epoch"]`` is the final epoch): the metric is the reward (negated for
      ``mode="min"``).
    - **stopped early by ASHA** (a lower epoch): its metric is translated to the final epoch's scale before it is
      a reward: value at epoch e + the mean gain from epoch e to the final epoch of the trials that finished (both
      values from their own results). Accuracy climbs during fine-tuning, so the raw value at epoch 1 would rank a
      stopped trial below finished ones by the fine-tuning gain on top of what made ASHA stop it; the translation
      compares it within equal epochs and keeps only that difference. Dropping stopped trials instead would hide
      most episodes (ASHA stops most trials at the first rung) and all of the bad ones from the critic, which would
      then never learn what to avoid. Until some trial has finished every epoch the episode waits (``WAITING``,
      kept across save/restore) and is learned as soon as one has.
    - **errored** (``error=True``, result may be None): dropped. A crash, an out-of-memory kill or a lost node says
      nothing about the candidate, and a made-up low reward would teach the agent to avoid valid settings (STYLE:
      never turn a failure into a fake metric).
    - **NaN, infinite or missing metric**: dropped for the same reason; a NaN reward would also poison the
      critic's loss and, through it, every later action.

    Dropped episodes still advanced the warm-up count and the noise decay (they were explored).

    Args:
        space: the per-layer space; suggestions use its flat keys ``space.keys()``.
        metric: the result key used as the reward (may also come through ``set_search_properties``).
        mode: "max" or "min".
        seed: seeds the agent's weights and every random draw; the same seed and results give the same search.
        num_warmup: warm-up episodes (the uniform one included) before the actor acts. None: a quarter of
            ``num_trials`` (PocketFlow: 50 of 200), at least 2; 10 without ``num_trials``.
        num_trials: the search's trial budget; sets the default warm-up and the noise decay (the noise falls 10x,
            from half the action range, over the episodes after the warm-up). None: AMC's decay of 0.95 per episode.
        max_epochs: the fine-tuning epochs of a finished trial (ASHA's max_t). None: a trial counts as finished if
            its epoch is the largest reported so far.
    """

    label = "DDPGSearcher"

    def __init__(self, space: PerLayerSpace, *, metric: str | None = None, mode: str | None = None, seed: int = 0,
                 num_warmup: int | None = None, num_trials: int | None = None,
                 max_epochs: int | None = None, starts: Sequence[Sequence[float]] = ()) -> None:
        for name, value in (("num_warmup", num_warmup), ("num_trials", num_trials), ("max_epochs", max_epochs)):
            if value is not None and (not isinstance(value, int) or value < (0 if name == "num_warmup" else 1)):
                raise ValueError(f"DDPGSearcher: {name} must be an integer >= {0 if name == 'num_warmup' else 1} "
                                 f"or None, but got {value!r}")
        if space.features and len(space.features) != len(space.names):
            raise ValueError(f"DDPGSearcher: space.features has {len(space.features)} rows; expected one per layer "
                             f"({len(space.names)})")
        super().__init__(space, metric=metric, mode=mode, starts=starts)
        self._max_epochs = max_epochs
        self._static = _normalised_features(space)  # (layers, static columns)
        # The agent acts on values whose cost grows with them (keep ratios, bits). A budget that falls as the
        # values grow (sparsities: the kept fraction falls) is seen through a mirror, x -> low + high - x, so
        # "more" always means "more of the budget spent"; suggestions are mirrored back.
        self._budget = space.budget
        self._mirrored = space.budget is not None and (space.budget.cost([space.high] * len(self._keys))
                                                       < space.budget.cost([space.low] * len(self._keys)))
        if self._mirrored:
            self._budget = _MirroredBudget(space.budget, space.low, space.high)
        self._full_cost = self._budget.cost([space.high] * len(self._keys)) if self._budget is not None else 1.0

        if num_warmup is None:
            num_warmup = max(2, num_trials // 4) if num_trials is not None else 10
        noise_decay = 0.95
        if num_trials is not None and num_trials > num_warmup + 1:
            noise_decay = 0.1 ** (1.0 / (num_trials - num_warmup - 1))
        state_size = self._static.shape[1] + (2 if space.budget is not None else 0) + 1
        self.agent = DDPGAgent(AgentConfig(
            state_size=state_size, action_low=float(space.low), action_high=float(space.high),
            num_warmup=num_warmup, noise_decay=noise_decay, seed=seed,
            # PocketFlow keeps layers x warm-up episodes: recent episodes only, from a policy close to today's.
            buffer_size=len(self._keys) * max(num_warmup, MIN_BUFFER_EPISODES),
        ))

        # Search state that save() keeps, besides the agent.
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # trial id -> (states, actions)
        self._history: dict[str, dict[int, float]] = {}  # trial id -> epoch -> metric, for pending trials
        self._finished: list[dict[int, float]] = []  # metric per epoch of each trial that finished every epoch
        self._waiting: dict[str, tuple[torch.Tensor, torch.Tensor, int, float]] = {}  # stopped, no gain known yet
        self._largest_epoch = 0
        self.outcomes: dict[str, Outcome] = {}  # trial id -> what it taught the agent (read-only for callers)

    # ----------------------------------------------------------------------------------------------------------
    # Ray Tune's Searcher interface.

    def suggest(self, trial_id: str) -> dict[str, float]:
        self._require_metric_and_mode("suggest()")
        episode = self.agent.episodes_started  # the first ones: uniform, then the starts (as warm-up episodes)
        fixed = None
        if episode < min(len(self._first_points), self.agent.config.num_warmup):
            fixed = [self._uniform_value()] * len(self._keys) if episode == 0 else self._agent_values(
                self._first_points[episode])
        self.agent.start_episode()
        with _one_torch_thread():
            states, actions = self._roll_out(fixed)
        self._pending[trial_id] = (states, actions)
        self._history[trial_id] = {}
        values = actions.tolist()
        if self._mirrored:
            values = [self._space.low + self._space.high - value for value in values]
        return {key: float(value) for key, value in zip(self._keys, values, strict=True)}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Remember each epoch's metric: finished trials' curves give the gain an early-stopped trial missed."""
        if trial_id in self._history:
            self._record(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Turn the trial's last result into the episode's reward and train (see the class docstring)."""
        episode = self._pending.pop(trial_id, None)
        history = self._history.pop(trial_id, {})
        if episode is None:
            logger.debug("DDPGSearcher: ignoring trial %s, which it did not suggest (or already completed)", trial_id)
            return
        if error:
            self.outcomes[trial_id] = Outcome.DROPPED_ERROR
            return
        value = finite_number(None if result is None else result.get(self._metric))
        if value is None:
            self.outcomes[trial_id] = Outcome.DROPPED_INVALID
            logger.warning("DDPGSearcher: trial %s ended without a finite %r (got %r); not learned", trial_id,
                           self._metric, None if result is None else result.get(self._metric))
            return
        epoch = result.get(EPOCH)
        if epoch is None:  # a trainable that does not count epochs: every trial is complete
            self._learn(trial_id, episode, value, Outcome.LEARNED)
            return
        epoch = int(epoch)
        history[epoch] = value
        self._largest_epoch = max(self._largest_epoch, epoch)
        if epoch >= self._final_epoch():
            self._finished.append(history)
            self._learn(trial_id, episode, value, Outcome.LEARNED)
            self._learn_waiting()
        else:
            self._waiting[trial_id] = (*episode, epoch, value)
            self.outcomes[trial_id] = Outcome.WAITING
            self._learn_waiting()

    def get_state(self) -> dict[str, Any]:
        return {
            **self.state_header(),
            "agent": self.agent.state_dict(),
            "pending": dict(self._pending),
            "history": {trial_id: dict(h) for trial_id, h in self._history.items()},
            "finished": [dict(h) for h in self._finished],
            "waiting": dict(self._waiting),
            "largest_epoch": self._largest_epoch,
            "outcomes": {trial_id: str(outcome) for trial_id, outcome in self.outcomes.items()},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue a saved search; the space must be the same, and so must metric and mode where both are set."""
        self.check_state_header(state)
        self.agent.load_state_dict(state["agent"])
        self._pending = dict(state["pending"])
        self._history = {trial_id: dict(h) for trial_id, h in state["history"].items()}
        self._finished = [dict(h) for h in state["finished"]]
        self._waiting = dict(state["waiting"])
        self._largest_epoch = int(state["largest_epoch"])
        self.outcomes = {trial_id: Outcome(outcome) for trial_id, outcome in state["outcomes"].items()}

    def save(self, checkpoint_path: str) -> None:
        torch.save(self.get_state(), checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        # weights_only: tensors and plain Python only, nothing executable is unpickled from the run folder.
        self.set_state(torch.load(Path(checkpoint_path), weights_only=True))

    @property
    def pending(self) -> list[str]:
        """Trial ids suggested and not yet complete."""
        return list(self._pending)

    # ----------------------------------------------------------------------------------------------------------
    # Episodes.

    def _roll_out(self, fixed: Sequence[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One episode: (states (layers, state_size), clipped actions (layers,)). ``fixed``: the actions to take,
        one per layer (in the agent's, possibly mirrored, values), instead of the actor's."""
        space, budget = self._space, self._budget
        layers = len(self._keys)
        chosen: list[float] = []
        states = []
        previous = 1.0  # rescaled previous action; nothing compressed before the first layer
        for t in range(layers):
            columns = [*self._static[t].tolist()]
            if budget is not None:
                removed = self._full_cost - budget.cost(chosen + [space.high] * (layers - t))
                lowest = budget.cost(chosen + [space.low] * (layers - t))
                columns += [removed / self._full_cost, lowest / self._full_cost]
            state = torch.tensor([*columns, previous], dtype=torch.float32)
            action = fixed[t] if fixed is not None else self.agent.act(state)
            if budget is not None:  # keep the target reachable with every later layer at space.low
                action = _largest_within(budget, space.low, action, head=chosen, tail=[space.low] * (layers - t - 1))
            chosen.append(action)
            states.append(state)
            previous = (action - space.low) / (space.high - space.low)
        return torch.stack(states), torch.tensor(chosen, dtype=torch.float64)

    def _agent_values(self, values: Sequence[float]) -> list[float]:
        """A proposal in the agent's values: mirrored where the budget falls as the values grow."""
        space = self._space
        return [space.low + space.high - v if self._mirrored else v for v in values]

    def _uniform_value(self) -> float:
        """The largest value every layer can share within the budget (space.high without a budget)."""
        space = self._space
        if self._budget is None:
            return float(space.high)
        return _largest_within(self._budget, space.low, space.high, repeat=len(self._keys))

    def _learn(self, trial_id: str, episode: tuple[torch.Tensor, torch.Tensor], value: float,
               outcome: Outcome) -> None:
        states, actions = episode
        reward = value if self._mode == "max" else -value
        with _one_torch_thread():
            self.agent.observe_episode(states, actions.float(), reward)
        self.outcomes[trial_id] = outcome

    def _learn_waiting(self) -> None:
        """Learn every early-stopped episode whose gain to the final epoch can now be estimated."""
        for trial_id, (states, actions, epoch, value) in list(self._waiting.items()):
            gain = self._gain(epoch)
            if gain is not None:
                del self._waiting[trial_id]
                self._learn(trial_id, (states, actions), value + gain, Outcome.LEARNED_ESTIMATED)

    def _gain(self, epoch: int) -> float | None:
        """Mean metric change from ``epoch`` to the final epoch over the finished trials (None: none to tell)."""
        final = self._final_epoch()
        gains = [h[final] - h[epoch] for h in self._finished if epoch in h and final in h]
        return sum(gains) / len(gains) if gains else None

    def _final_epoch(self) -> int:
        return self._max_epochs if self._max_epochs is not None else self._largest_epoch

    def _record(self, trial_id: str, result: dict) -> None:
        value, epoch = finite_number(result.get(self._metric)), result.get(EPOCH)
        if epoch is not None:
            self._largest_epoch = max(self._largest_epoch, int(epoch))
            if value is not None:
                self._history[trial_id][int(epoch)] = value


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The networks are tiny (batch 64 x 64 units): more threads only spin, and in the Tune driver they compete
    with the trials (seen on a loaded 2-core host: 3 ms per update with one thread, 130-440 ms with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _normalised_features(space: PerLayerSpace) -> torch.Tensor:
    """(layers, columns): each feature column divided by its largest absolute value; the index alone if none."""
    layers = len(space.names)
    if not space.features:
        return torch.arange(layers, dtype=torch.float32).unsqueeze(1) / max(layers - 1, 1)
    features = torch.tensor(space.features, dtype=torch.float32)
    scale = features.abs().amax(dim=0)
    return features / torch.where(scale > 0, scale, torch.ones_like(scale))


@dataclass(frozen=True)
class _MirroredBudget:
    """``budget`` seen through x -> low + high - x: the cost of a budget that falls as the values grow, as a
    cost that grows with them (same target)."""

    budget: Any
    low: float
    high: float

    @property
    def target(self) -> float:
        return self.budget.target

    def cost(self, values: Sequence[float]) -> float:
        return self.budget.cost([self.low + self.high - value for value in values])


def _largest_within(budget: Any, low: float, high: float, *, head: Sequence[float] = (), repeat: int = 1,
                    tail: Sequence[float] = ()) -> float:
    """The largest x in [low, high] whose values ``head + [x] * repeat + tail`` cost at most ``budget.target``
    (cost is non-decreasing in x); ``low`` if even that misses the target (nothing smaller is allowed)."""

    def fits(x: float) -> bool:
        return budget.cost([*head, *([x] * repeat), *tail]) <= budget.target

    if fits(high):
        return float(high)
    if not fits(low):
        return float(low)
    good, bad = float(low), float(high)
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (good + bad)
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good
