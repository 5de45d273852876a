"""A DDPG agent that picks one continuous action per layer (Lillicrap et al., ICLR 2016; AMC, He et al., ECCV 2018).

Pure PyTorch, no Ray. One episode = one pass over the layers = one candidate model; the episode's single reward
(e.g. the candidate's accuracy) is given to every transition of the episode, as PocketFlow and AMC do.

What gamma does under that scheme: the critic's target for layer t is ``A + gamma * Q'(s_t+1, mu'(s_t+1))`` with
A the episode's advantage (below) and no bootstrap after the last layer, so Q at layer t tends to
``A * (1 - gamma^(L - t)) / (1 - gamma)``: the same episode reward, counted once per remaining layer with geometric
weights (at most 1 / (1 - gamma) = 10 times for gamma 0.9). A already contains every later layer's effect, so
gamma does not change which action is best at a layer; it sets how strongly the critic leans on its own estimate
of the later layers (the next state carries the budget this action left), i.e. a per-layer scale and a
bias/variance trade-off. gamma = 0 would make the critic a plain regression of the episode reward on
(state, action); AMC's gamma = 1 lets the scale grow with the number of layers left.

Advantage: ``A = (R - b) / s`` with b the exponential moving average of episode rewards (PocketFlow's baseline)
and s the standard deviation of the rewards in the replay buffer (ours: accuracies of candidates differ by about
0.01; unit-scale targets make the critic's fit independent of the metric's units), both as they stand when a batch
is drawn, so every stored reward is shifted and scaled alike. Also ours: ``critic_warmup_updates`` (see AgentConfig).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pf_ray.errors import ConfigError
from pf_ray.strict import check_range


@dataclass(frozen=True)
class AgentConfig:
    """PocketFlow's settings (Adam 1e-3, batch 64, tau 0.01, gamma 0.9, baseline decay 0.95) and AMC's noise."""

    state_size: int  # columns of the per-layer state
    action_low: float = 0.0
    action_high: float = 1.0
    hidden_size: int = 64
    gamma: float = 0.9
    tau: float = 0.01  # soft target update: target <- tau * online + (1 - tau) * target, after every step
    learning_rate: float = 1e-3  # Adam, critic
    actor_learning_rate: float = 1e-3  # Adam, actor
    batch_size: int = 64  # transitions per gradient step (drawn with replacement)
    buffer_size: int = 6400  # transitions kept, first in first out (PocketFlow: layers x warm-up episodes)
    num_warmup: int = 10  # episodes of uniform random actions; no gradient step before this many are observed
    noise_initial: float = 0.5  # std of the truncated normal action noise, as a fraction of the action range
    noise_decay: float = 0.95  # noise std multiplied by this once per episode after the warm-up
    baseline_decay: float = 0.95  # exponential moving average of episode rewards, subtracted from rewards
    # Critic-only steps on the warm-up episodes before the actor's first step (ours, not PocketFlow's): an
    # untrained critic is nearly linear in the action, the actor follows it into a saturated sigmoid, where its
    # gradient vanishes. On the toy problem of tests/search_algs/test_ddpg.py (4 seeds) the largest error per layer was
    # 0.11-0.19 without them, 0.04-0.11 with them.
    critic_warmup_updates: int = 300
    updates_per_episode: int | None = None  # gradient steps per observed episode; None: one per transition (AMC)
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("state_size", self.state_size, low=1)
        if not self.action_low < self.action_high:
            raise ConfigError(f"action_low: got {self.action_low!r}; must be below action_high "
                              f"({self.action_high!r})")
        check_range("hidden_size", self.hidden_size, low=1)
        check_range("gamma", self.gamma, low=0.0, high=1.0)
        check_range("tau", self.tau, low=0.0, high=1.0, low_inclusive=False)
        check_range("learning_rate", self.learning_rate, low=0.0, low_inclusive=False)
        check_range("actor_learning_rate", self.actor_learning_rate, low=0.0, low_inclusive=False)
        check_range("batch_size", self.batch_size, low=1)
        check_range("buffer_size", self.buffer_size, low=1)
        check_range("num_warmup", self.num_warmup, low=0)
        check_range("noise_initial", self.noise_initial, low=0.0)
        check_range("noise_decay", self.noise_decay, low=0.0, high=1.0)
        check_range("baseline_decay", self.baseline_decay, low=0.0, high=1.0)
        if self.updates_per_episode is not None:
            check_range("updates_per_episode", self.updates_per_episode, low=0)


def _dense(inputs: int, outputs: int) -> list[nn.Module]:
    return [nn.Linear(inputs, outputs), nn.LayerNorm(outputs), nn.ReLU()]


class Actor(nn.Module):
    """state (batch, state_size) -> action (batch,) in [low, high]."""

    def __init__(self, state_size: int, hidden_size: int, low: float, high: float) -> None:
        super().__init__()
        self.body = nn.Sequential(*_dense(state_size, hidden_size), *_dense(hidden_size, hidden_size),
                                  nn.Linear(hidden_size, 1))
        self.low, self.high = low, high

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(self.body(state)).squeeze(-1)


class Critic(nn.Module):
    """(state (batch, state_size), action (batch,)) -> Q (batch,); the action enters rescaled to [0, 1]."""

    def __init__(self, state_size: int, hidden_size: int, low: float, high: float) -> None:
        super().__init__()
        self.state_branch = nn.Sequential(*_dense(state_size, hidden_size))
        self.head = nn.Sequential(*_dense(hidden_size + 1, hidden_size), *_dense(hidden_size, hidden_size),
                                  nn.Linear(hidden_size, 1))
        self.low, self.high = low, high

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        unit_action = ((action - self.low) / (self.high - self.low)).unsqueeze(-1)
        return self.head(torch.cat([self.state_branch(state), unit_action], dim=-1)).squeeze(-1)


class ReplayBuffer:
    """A ring of transitions (state, action, episode reward, next state, last-layer flag), as tensors."""

    def __init__(self, capacity: int, state_size: int) -> None:
        self.capacity = capacity
        self.states = torch.zeros(capacity, state_size)
        self.actions = torch.zeros(capacity)
        self.rewards = torch.zeros(capacity)  # raw episode rewards; baseline and scale applied when sampled
        self.next_states = torch.zeros(capacity, state_size)
        self.dones = torch.zeros(capacity)  # 1.0 on an episode's last layer: no bootstrap beyond it
        self.position = 0  # next slot to write
        self.size = 0

    def add(self, state: torch.Tensor, action: float, reward: float, next_state: torch.Tensor, done: bool) -> None:
        i = self.position
        self.states[i], self.actions[i], self.rewards[i] = state, action, reward
        self.next_states[i], self.dones[i] = next_state, float(done)
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        index = torch.randint(self.size, (batch_size,), generator=generator)
        return (self.states[index], self.actions[index], self.rewards[index], self.next_states[index],
                self.dones[index])

    def reward_scale(self) -> float:
        """Standard deviation of the stored rewards (1.0 while they are all equal)."""
        std = float(self.rewards[: self.size].std()) if self.size > 1 else 0.0
        return std if std > 1e-12 else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"states": self.states, "actions": self.actions, "rewards": self.rewards,
                "next_states": self.next_states, "dones": self.dones, "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["states"].shape) != tuple(self.states.shape):
            raise ConfigError(f"replay buffer: saved shape {tuple(state['states'].shape)} does not match "
                              f"(buffer_size, state_size) = {tuple(self.states.shape)}")
        for name in ("states", "actions", "rewards", "next_states", "dones"):
            getattr(self, name).copy_(state[name])
        self.position, self.size = int(state["position"]), int(state["size"])


def truncated_normal(mean: float, std: float, low: float, high: float, generator: torch.Generator) -> float:
    """One draw of N(mean, std^2) truncated to [low, high], by the inverse CDF (exact, no rejection loop)."""
    if std <= 0.0:
        return min(max(mean, low), high)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    lower = normal.cdf(torch.tensor((low - mean) / std, dtype=torch.float64))
    upper = normal.cdf(torch.tensor((high - mean) / std, dtype=torch.float64))
    uniform = torch.rand((), dtype=torch.float64, generator=generator)
    # Keep the probability strictly inside (0, 1): icdf(0) = -inf when the mean sits on a bound.
    probability = (lower + uniform * (upper - lower)).clamp(1e-12, 1.0 - 1e-12)
    return float(min(max(mean + std * float(normal.icdf(probability)), low), high))


class DDPGAgent:
    """Picks one action per layer; learns from whole episodes, each scored by one reward.

    Use: ``start_episode()``, then ``act(state)`` once per layer (the caller may clip each action, e.g. to a
    budget), then, when the episode's reward is known, ``observe_episode(states, actions, reward)`` with the
    actions really taken. Several episodes may be open at once: the agent keeps no per-episode state.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        c = config
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, without touching the global RNG
            torch.manual_seed(c.seed)
            self.actor = Actor(c.state_size, c.hidden_size, c.action_low, c.action_high)
            self.critic = Critic(c.state_size, c.hidden_size, c.action_low, c.action_high)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), lr=c.actor_learning_rate)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=c.learning_rate)
        self.buffer = ReplayBuffer(c.buffer_size, c.state_size)
        self.generator = torch.Generator().manual_seed(c.seed)  # every random draw: actions, noise, batches
        self.noise_std = c.noise_initial  # fraction of the action range
        self.baseline: float | None = None  # EMA of observed episode rewards; None before the first one
        self.episodes_started = 0
        self.episodes_observed = 0
        self._random_episode = True  # the open episode explores uniformly (warm-up)
        self._critic_ready = False  # critic_warmup_updates done

    # ----------------------------------------------------------------------------------------------------------
    # Acting.

    @property
    def warming_up(self) -> bool:
        return self.episodes_started < self.config.num_warmup

    def start_episode(self) -> bool:
        """Open an episode. Returns True if it is a warm-up episode (uniform random actions)."""
        c = self.config
        self._random_episode = self.warming_up
        if not self._random_episode and self.episodes_started > c.num_warmup:
            self.noise_std *= c.noise_decay  # the first policy episode uses noise_initial itself
        self.episodes_started += 1
        return self._random_episode

    def act(self, state: torch.Tensor) -> float:
        """The action for one layer of the open episode: uniform in warm-up, else actor + truncated noise."""
        c = self.config
        if self._random_episode:
            unit = float(torch.rand((), generator=self.generator))
            return c.action_low + unit * (c.action_high - c.action_low)
        std = self.noise_std * (c.action_high - c.action_low)
        return truncated_normal(self.greedy(state), std, c.action_low, c.action_high, self.generator)

    @torch.no_grad()
    def greedy(self, state: torch.Tensor) -> float:
        """The actor's action for one state (state_size,), without exploration noise."""
        return float(self.actor(state.float().unsqueeze(0))[0])

    # ----------------------------------------------------------------------------------------------------------
    # Learning.

    def observe_episode(self, states: torch.Tensor, actions: torch.Tensor, reward: float) -> None:
        """Store an episode's transitions, all scored by its reward, then train (after the warm-up).

        Args:
            states: (layers, state_size), the state each action was taken in.
            actions: (layers,), the actions really taken (after any clipping by the caller).
            reward: the episode's reward, higher is better; must be finite.
        """
        if not torch.isfinite(torch.tensor(reward)):
            raise ValueError(f"reward: got {reward!r}; expected a finite number (drop the episode instead)")
        if states.ndim != 2 or states.shape[0] != actions.shape[0] or states.shape[1] != self.config.state_size:
            raise ValueError(f"states/actions: got shapes {tuple(states.shape)} and {tuple(actions.shape)}; "
                             f"expected (layers, {self.config.state_size}) and (layers,)")
        decay = self.config.baseline_decay
        self.baseline = reward if self.baseline is None else decay * self.baseline + (1.0 - decay) * reward
        layers = states.shape[0]
        for t in range(layers):
            last = t == layers - 1
            next_state = torch.zeros_like(states[t]) if last else states[t + 1]
            self.buffer.add(states[t].float(), float(actions[t]), reward, next_state.float(), last)
        self.episodes_observed += 1
        if self.episodes_observed >= self.config.num_warmup:
            if not self._critic_ready:
                for _ in range(self.config.critic_warmup_updates):
                    self.update(actor=False)
                self._critic_ready = True
            updates = self.config.updates_per_episode
            for _ in range(layers if updates is None else updates):
                self.update()

    def update(self, actor: bool = True) -> tuple[float, float]:
        """One gradient step of critic and actor on a sampled batch, then soft target updates.

        Returns (critic loss, actor loss).
        """
        c = self.config
        states, actions, rewards, next_states, dones = self.buffer.sample(c.batch_size, self.generator)
        # The current baseline (AMC) and the spread of the stored rewards, the same for every stored reward: the
        # critic's targets sit near 0 with unit spread whatever the metric's units (accuracies differ by ~0.01).
        advantages = (rewards - (self.baseline or 0.0)) / self.buffer.reward_scale()
        with torch.no_grad():
            next_q = self.critic_target(next_states, self.actor_target(next_states))
            targets = advantages + c.gamma * (1.0 - dones) * next_q
        critic_loss = nn.functional.mse_loss(self.critic(states, actions), targets)
        self.critic_optimizer.zero_grad()
        critic_loss.backward()
        self.critic_optimizer.step()

        actor_loss = -self.critic(states, self.actor(states)).mean()
        if actor:
            self.actor_optimizer.zero_grad()
            actor_loss.backward()
            self.actor_optimizer.step()

        with torch.no_grad():
            for online, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, p_target in zip(online.parameters(), target.parameters(), strict=True):
                    p_target.lerp_(p, c.tau)
        return critic_loss.item(), actor_loss.item()

    # ----------------------------------------------------------------------------------------------------------
    # Checkpoints.

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: networks, optimisers, buffer, noise, baseline, counts, RNG.

        A deep copy: it does not change as this agent trains on (optimisers' state dicts hold live tensors, and
        ``Optimizer.load_state_dict`` would share them with the agent that loads them).
        """
        return copy.deepcopy({
            "config": asdict(self.config),
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "actor_target": self.actor_target.state_dict(),
            "critic_target": self.critic_target.state_dict(),
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "generator": self.generator.get_state(),
            "noise_std": self.noise_std,
            "baseline": self.baseline,
            "episodes_started": self.episodes_started,
            "episodes_observed": self.episodes_observed,
            "random_episode": self._random_episode,
            "critic_ready": self._critic_ready,
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["config"]
        for name in ("state_size", "hidden_size", "buffer_size"):  # the shapes must agree; the rest may change
            if saved[name] != getattr(self.config, name):
                raise ConfigError(f"agent checkpoint: {name} is {saved[name]!r}; this agent has "
                                  f"{getattr(self.config, name)!r}")
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_target.load_state_dict(state["actor_target"])
        self.critic_target.load_state_dict(state["critic_target"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])
        self.noise_std = float(state["noise_std"])
        self.baseline = None if state["baseline"] is None else float(state["baseline"])
        self.episodes_started = int(state["episodes_started"])
        self.episodes_observed = int(state["episodes_observed"])
        self._random_episode = bool(state["random_episode"])
        self._critic_ready = bool(state["critic_ready"])
