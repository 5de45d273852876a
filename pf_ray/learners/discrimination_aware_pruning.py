"""Discrimination-aware channel pruning (Zhuang et al., "Discrimination-aware Channel Pruning for Deep Neural
Networks", NeurIPS 2018).

The algorithm as implemented, and its differences from the paper: docs/design.md, "Discrimination-aware pruning".
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError, DataError
from pf_ray.ops.channel_choice import channel_blocks
from pf_ray.ops.channel_groups import PrunableGroup, require_prunable_groups
from pf_ray.ops.dcp import remove_unkept_channels_
from pf_ray.ops.dcp_selection import StageWiseSelection
from pf_ray.ops.safe_pruning import SkippedGroup, unsafe_groups
from pf_ray.registry import LEARNERS
from pf_ray.strict import check_range


@dataclass(frozen=True)
class DiscriminationAwarePruningConfig:
    keep_ratio: float = 0.5  # fraction of every group's channels kept (uniform, as in the paper)
    num_stages: int = 3  # P + 1 stages over the prunable groups; auxiliary heads after the first P
    round_to: int = 8  # kept channel counts are multiples of this (ONNX Runtime's x86 convs use blocks of 8)
    stage_fine_tune_steps: int = 50  # SGD steps on auxiliary + final loss per stage (0: heads stay untrained)
    channel_fine_tune_steps: int = 0  # SGD steps on a group's consumers after each added channel; 0 = skip
    reconstruction_weight: float = 1.0  # weight of the reconstruction loss against the auxiliary loss
    learning_rate: float = 0.01  # of both fine-tunings
    batch_size: int = 64  # examples per step, for fine-tuning and for each greedy gradient
    seed: int = 0  # heads' initial weights and the order of the training batches
    # channel groups left unpruned: those the check finds unsafe (preflight fills this in), plus any the user names
    excluded_groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_range("keep_ratio", self.keep_ratio, low=0.0, high=1.0, low_inclusive=False)
        check_range("num_stages", self.num_stages, low=1)
        check_range("round_to", self.round_to, low=1)
        check_range("stage_fine_tune_steps", self.stage_fine_tune_steps, low=0)
        check_range("channel_fine_tune_steps", self.channel_fine_tune_steps, low=0)
        check_range("reconstruction_weight", self.reconstruction_weight, low=0.0)
        check_range("learning_rate", self.learning_rate, low=0.0, high=10.0, low_inclusive=False)
        check_range("batch_size", self.batch_size, low=1)


@LEARNERS.register("discrimination_aware_pruning", config=DiscriminationAwarePruningConfig)
class DiscriminationAwarePruning:
    """Selection and removal in ``prepare``; fine-tuning then trains the smaller model as it is."""

    def __init__(self, config: DiscriminationAwarePruningConfig) -> None:
        self.config = config
        self.kept_channels: dict[str, int] = {}  # group name -> channels kept, filled by prepare
        self._skipped: tuple[SkippedGroup, ...] = ()  # filled by check

    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        """Prunes copies of the model at ``keep_ratio`` (``ops.safe_pruning``) and leaves the groups that break it
        unpruned, and the groups of a grouped convolution's outputs (the greedy selection does not keep its groups
        equal); a ConfigError when none is left, or fewer than ``num_stages``."""
        names = [group.name for group in require_prunable_groups(model, input_shape, "discrimination_aware_pruning")]
        unknown = [name for name in self.config.excluded_groups if name not in names]
        if unknown:
            raise ConfigError(f"learner.options.excluded_groups: got {unknown[0]!r}, not a prunable channel group of "
                              f"this model; its groups: {', '.join(names)}")
        given = tuple(SkippedGroup(name, "listed in learner.options.excluded_groups")
                      for name in self.config.excluded_groups)
        found = unsafe_groups(model, input_shape, self.config.keep_ratio, self.config.round_to,
                              exclude=self.config.excluded_groups, log=lambda line: print(line, flush=True))
        left = {g.name for g in (*given, *found)}
        grouped = tuple(SkippedGroup(g.name, "its channels are the outputs of a grouped convolution, whose groups "
                                             "discrimination-aware selection does not keep equal")
                        for g in require_prunable_groups(model, input_shape, "discrimination_aware_pruning")
                        if g.name not in left and channel_blocks(model, g) is not None)
        self._skipped = given + found + grouped
        self._groups(model, input_shape)

    def skipped_groups(self) -> tuple[SkippedGroup, ...]:
        """The groups ``check`` left unpruned, with the reason (empty before it)."""
        return self._skipped

    def checked_config(self) -> DiscriminationAwarePruningConfig:
        """The config with every group ``check`` left unpruned in ``excluded_groups``, for the trials."""
        return replace(self.config, excluded_groups=tuple(group.name for group in self._skipped))

    def _groups(self, model: nn.Module, input_shape: tuple[int, int, int]) -> list[PrunableGroup]:
        """The prunable groups less the excluded ones (``excluded_groups`` and what ``check`` found)."""
        excluded = set(self.config.excluded_groups) | {group.name for group in self._skipped}
        every = require_prunable_groups(model, input_shape, "discrimination_aware_pruning")
        groups = [group for group in every if group.name not in excluded]
        if not groups:
            first = self._skipped[0] if self._skipped else None
            why = f" (first, {first.name!r}: {first.reason})" if first else ""
            raise ConfigError(f"discrimination_aware_pruning: nothing can be pruned in {type(model).__name__}: all "
                              f"{len(every)} channel groups are left unpruned{why}")
        if self.config.num_stages > len(groups):
            raise ConfigError(
                f"learner.options.num_stages: got {self.config.num_stages}; this model has {len(groups)} "
                f"prunable channel groups, so at most {len(groups)} stages"
            )
        return groups

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        groups = self._groups(model, data.input_shape)
        if len(data.train) == 0:  # type: ignore[arg-type]
            raise DataError("discrimination_aware_pruning: the training set is empty; channel selection needs data")
        was_training = model.training
        with torch.random.fork_rng(devices=[]):  # seeded heads without touching the caller's random state
            torch.manual_seed(self.config.seed)
            kept = StageWiseSelection(self.config, model, data, groups).run()
        self.kept_channels = remove_unkept_channels_(model, data.input_shape, groups, kept)
        model.train(was_training)
        return model

    def on_step(self, model: nn.Module, step: int) -> None:
        pass  # nothing to re-apply: the removed channels no longer exist

    def finalize(self, model: nn.Module) -> nn.Module:
        return model
