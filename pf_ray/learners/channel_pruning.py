"""Channel pruning: remove whole channels, residual trunks included (He et al., "Channel Pruning for
Accelerating Very Deep Neural Networks", ICCV 2017; dependency groups after Fang et al., DepGraph, CVPR 2023).

The criteria, the modes and group fine-tuning: docs/design.md, "Channel pruning". Groups whose pruning breaks the
model (a user's graph with splits and shuffles: ``ops.safe_pruning``) are found by ``check`` before any training and
left unpruned: ``excluded_groups``.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pf_ray.config import Budget, SearchConfig, read_values_file
from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError
from pf_ray.learners.base import PerLayerMode, check_per_layer_mode
from pf_ray.ops.blocks import ResidualBlock, removable_blocks
from pf_ray.ops.channel_groups import prunable_groups, require_prunable_groups
from pf_ray.ops.depth import remove_blocks_by_name_
from pf_ray.ops.depth_knapsack import block_features, knapsack_start
from pf_ray.ops.depth_space import SplitFields, dimension_names
from pf_ray.ops.importance import taylor_importance
from pf_ray.ops.latency_budget import LatencyBudget, LatencySource, WholeGroups
from pf_ray.ops.macs_budget import MacsBudget, macs_table, without_groups
from pf_ray.ops.precision_space import check_precision_search, join_tail, precision_features
from pf_ray.ops.precision_space import dimension_names as precision_dimension_names
from pf_ray.ops.pruning import CRITERIA, FEATURE_SOURCES, KEEP_RATIOS_FIELD, kept_channel_count, prune_channels_
from pf_ray.ops.safe_pruning import SkippedGroup, structural_problems, unsafe_groups
from pf_ray.registry import LEARNERS
from pf_ray.search_space import PerLayerSpace, layer_features
from pf_ray.strict import check_choice, check_range
from pf_ray.train import take_batches

RATIOS_FILE_FIELD = "learner.options.ratios_file"
EXCLUDED_GROUPS_FIELD = "learner.options.excluded_groups"
DEFAULT_ROUND_TO = 8  # round_to "auto" without a latency table
IMPORTANCE_BATCHES = 4  # training batches (of 64) that the knapsack start's channel importance is measured on
FEATURE_BATCH_SIZE = 64  # images per mini-batch for LASSO's feature sampling and for group fine-tuning


@dataclass(frozen=True)
class ChannelPruningConfig:
    mode: PerLayerMode = PerLayerMode.AUTO  # uniform: keep_ratio everywhere; list: given; auto: searched
    layer_keep_ratios: tuple[float, ...] = ()  # one per pruned group (not excluded), in model order (list / auto)
    keep_ratio: float = 0.5  # mode uniform; also auto before the search has filled layer_keep_ratios
    ratios_file: str | None = None  # mode list: a YAML/JSON list or a text file of numbers, one per group
    # Kept channel counts are multiples of this. "auto": where latency steps on the deployment target (its latency
    # table's step) with search.budget latency; otherwise 8 (ONNX Runtime's x86 FP32 convs work in blocks of 8)
    round_to: int | str = "auto"
    min_keep_ratio: float = 0.1  # the search's lower bound for every group's keep ratio
    criterion: str = "lasso"  # how channels are chosen: a key of pf_ray.ops.pruning.CRITERIA
    reconstruct: bool = True  # lasso: refit the consumers of pruned channels by least squares
    num_batches: int = 10  # lasso: training mini-batches (of 64) whose features drive selection
    points_per_image: int = 10  # lasso: output positions sampled per image and layer
    # lasso: whose features each group is selected and refit on: "pruned" (the model pruned so far: He et al.,
    # exact; each candidate samples its own) or "baseline" (the baseline's, as PocketFlow did: candidate-independent,
    # so a search computes them once, pf_ray.ops.feature_cache, and later candidates run no forward pass)
    features: str = "pruned"
    group_size: int = 0  # 0: prune every group at once; k: k groups at a time, fine-tuning in between
    group_fine_tune_steps: int = 50  # Adam steps after each group of groups (group_size > 0)
    group_learning_rate: float = 0.001  # Adam's learning rate for those steps
    seed: int = 0  # feature batches, sampled positions and group fine-tuning order
    # Depth (docs/design.md, "Depth"): mode auto also searches which removable residual blocks (identity shortcut,
    # pf_ray.ops.blocks) to remove, under the same budget: one more value per block after the groups' keep ratios
    depth: bool | str = "auto"  # "auto": searched with a latency budget where the model has removable blocks
    # Residual blocks (module names) removed before the channels are pruned: mode list / uniform: given; mode auto
    # with depth: filled by the search. layer_keep_ratios stays one per group of the unpruned model (the ratios of
    # groups that go with a removed block are not used)
    removed_blocks: tuple[str, ...] = ()
    # Precision (docs/design.md, "Precision"): with an INT8 deployment target and search.budget latency, mode auto
    # also searches which conv/linear layers stay in FP32 in the INT8 exports (one more value per layer, after the
    # blocks'), and trials are scored on the accuracy of the INT8 artifact itself
    mixed_precision: bool = False
    # Layers (module names) the INT8 exports keep in FP32: mode list / uniform: given; mode auto with
    # mixed_precision: filled by the search. A layer inside a removed block is ignored
    fp32_layers: tuple[str, ...] = ()
    # Channel groups (by name: their first layer) left unpruned: given, and filled by the preflight's safety check
    # with the groups whose pruning breaks the model (ops.safe_pruning); they have no keep ratio
    excluded_groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_per_layer_mode(self.mode, "layer_keep_ratios", self.layer_keep_ratios, file_field="ratios_file",
                             file=self.ratios_file)
        for index, ratio in enumerate(self.layer_keep_ratios):
            check_range(f"layer_keep_ratios[{index}]", ratio, low=0.0, high=1.0, low_inclusive=False)
        check_range("keep_ratio", self.keep_ratio, low=0.0, high=1.0, low_inclusive=False)
        if isinstance(self.round_to, str) and self.round_to != "auto":
            raise ConfigError(f"round_to: got {self.round_to!r}; expected a positive integer or 'auto'")
        if isinstance(self.round_to, int):
            check_range("round_to", self.round_to, low=1)
        check_range("min_keep_ratio", self.min_keep_ratio, low=0.0, high=1.0, low_inclusive=False)
        check_choice("criterion", self.criterion, CRITERIA)
        check_choice("features", self.features, FEATURE_SOURCES)
        check_range("num_batches", self.num_batches, low=1)
        check_range("points_per_image", self.points_per_image, low=1)
        check_range("group_size", self.group_size, low=0)
        check_range("group_fine_tune_steps", self.group_fine_tune_steps, low=0)
        check_range("group_learning_rate", self.group_learning_rate, low=0.0, low_inclusive=False, high=1.0)
        if isinstance(self.depth, str) and self.depth != "auto":
            raise ConfigError(f"depth: got {self.depth!r}; expected true, false or 'auto'")
        if self.depth is True and self.mode != PerLayerMode.AUTO:
            raise ConfigError(f"depth: got true with mode {str(self.mode)!r}; depth is searched in mode 'auto' (with "
                              "mode list or uniform, name the blocks to remove in removed_blocks)")
        if self.removed_blocks and self.mode == PerLayerMode.AUTO and self.depth is False:
            raise ConfigError(f"removed_blocks: got {list(self.removed_blocks)} with mode 'auto' and depth false; "
                              "set depth: true (or auto) to search the blocks, or mode list / uniform to give them")
        if self.mixed_precision and self.mode != PerLayerMode.AUTO:
            raise ConfigError(f"mixed_precision: got true with mode {str(self.mode)!r}; precision is searched in mode "
                              "'auto' (with mode list or uniform, name the FP32 layers in fp32_layers)")
        if self.fp32_layers and self.mode == PerLayerMode.AUTO and not self.mixed_precision:
            raise ConfigError(f"fp32_layers: got {list(self.fp32_layers)} with mode 'auto' and mixed_precision false; "
                              "set mixed_precision: true to search them, or mode list / uniform to give them")
        if self.ratios_file is not None:
            read_values_file(self.ratios_file, RATIOS_FILE_FIELD)  # fail now, where the config is read, not in a trial


def search_dimensions(model: nn.Module, input_shape: tuple[int, int, int], excluded: Collection[str] = ()) -> list[str]:
    """The names of the prunable groups less ``excluded`` (``excluded_groups``): one keep ratio per name, in this
    order, is a ``layer_keep_ratios``."""
    return [group.name for group in prunable_groups(model, input_shape) if group.name not in excluded]


def _log(line: str) -> None:
    print(line, flush=True)


def _cost_line(features: str, seconds: float, costs: dict[str, Any]) -> str:
    """The LASSO pruning's cost: what this candidate paid of its own (its per-candidate cost) and what it shares
    with the search's other candidates (the baseline's features: computed by the first, then read)."""
    own = seconds - costs.get("baseline", 0.0)
    split = ", ".join(f"{what} {costs.get(what, 0.0):.1f} s" for what in ("sampling", "selection", "refit"))
    return (f"channel_pruning: LASSO pruning {seconds:.1f} s: per candidate {own:.1f} s ({split}); shared with the "
            f"search {costs.get('baseline', 0.0):.1f} s (baseline features {costs.get('baseline_source', 'none')}, "
            f"features: {features})")


@LEARNERS.register("channel_pruning", config=ChannelPruningConfig)
class ChannelPruning:
    """Pruning (and group fine-tuning) in ``prepare``; fine-tuning then trains the smaller model as it is."""

    searched_field = "layer_keep_ratios"

    def __init__(self, config: ChannelPruningConfig) -> None:
        self.config = config
        self.kept_channels: dict[str, int] = {}  # group name -> channels kept, filled by prepare
        self._skipped: tuple[SkippedGroup, ...] = ()  # filled by check

    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        """Also prunes copies of the model at the search box's bottom (``ops.safe_pruning``): the groups that break
        it are left unpruned (``skipped_groups``, ``checked_config``); a ConfigError when none is left."""
        names = self._groups(model, input_shape)
        config = self.config
        unknown = [name for name in config.excluded_groups if name not in names]
        if unknown:
            raise ConfigError(f"{EXCLUDED_GROUPS_FIELD}: got {unknown[0]!r}, not a prunable channel group of this "
                              f"model; its groups: {', '.join(names)}")
        lowest = min((config.min_keep_ratio, config.keep_ratio, *config.layer_keep_ratios))
        given = tuple(SkippedGroup(name, f"listed in {EXCLUDED_GROUPS_FIELD}") for name in config.excluded_groups)
        found = unsafe_groups(model, input_shape, lowest, self._round_to(), exclude=config.excluded_groups,
                              log=_log)
        self._skipped = given + found
        if self._skipped:
            self._refuse_if_nothing_left(model, input_shape, lowest)
        self._keep_ratios(len(names) - len(self._skipped))
        if self.config.fp32_layers:
            layers = macs_table(model, input_shape).layer_names()
            unknown = [name for name in self.config.fp32_layers if name not in layers]
            if unknown:
                shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
                raise ConfigError(f"fp32_layers: got {unknown[0]!r}, not a conv/linear layer of this model; its "
                                  f"layers: {shown}")
        if not (self.config.depth is True or self.config.removed_blocks):
            return
        blocks = [block.name for block in self._removable(model, input_shape)]
        unknown = [name for name in self.config.removed_blocks if name not in blocks]
        if unknown:
            raise ConfigError(f"removed_blocks: got {unknown[0]!r}, not a removable residual block of this model; "
                              f"removable: {', '.join(blocks) or 'none'}")

    def _removable(self, model: nn.Module, input_shape: tuple[int, int, int]) -> list[ResidualBlock]:
        """The removable residual blocks (``ops.blocks``), in forward order; with ``depth``, at least one."""
        blocks = removable_blocks(model, input_shape)
        if self.config.depth is True and not blocks:
            raise ConfigError(f"depth: got true, but the model ({type(model).__name__}) has no removable residual "
                              "block (a known block type with an identity shortcut, pf_ray.ops.blocks); set depth: "
                              "false")
        return blocks

    def _refuse_if_nothing_left(self, model: nn.Module, input_shape: tuple[int, int, int], lowest: float) -> None:
        """A ConfigError when the groups left to prune (not skipped) cannot lose a single channel, even at keep ratio
        ``lowest`` (too few channels for ``round_to``): the run could only train and export the same model."""
        skipped = {group.name for group in self._skipped}
        groups = prunable_groups(model, input_shape)
        round_to = self._round_to()
        if any(kept_channel_count(g.num_channels, lowest, round_to) < g.num_channels
               for g in groups if g.name not in skipped):
            return
        first = self._skipped[0]
        why = f"first, {first.name!r}: {first.reason}"
        if len(skipped) == len(groups):
            raise ConfigError(f"channel_pruning: nothing can be pruned in {type(model).__name__}: all {len(groups)} "
                              f"channel groups are left unpruned ({why})")
        raise ConfigError(f"channel_pruning: nothing can be pruned in {type(model).__name__}: {len(skipped)} of its "
                          f"{len(groups)} channel groups are left unpruned ({why}), and the other "
                          f"{len(groups) - len(skipped)} keep every channel at keep ratio {lowest:g} with round_to="
                          f"{round_to} (learner.options.round_to)")

    def skipped_groups(self) -> tuple[SkippedGroup, ...]:
        """The groups left unpruned, with the reason: those found by ``check`` (empty before it), and those listed in
        ``excluded_groups``."""
        return self._skipped

    def checked_config(self) -> ChannelPruningConfig:
        """The config with every group ``check`` skipped in ``excluded_groups`` (in forward order)."""
        return replace(self.config, excluded_groups=tuple(group.name for group in self._skipped))

    def _excluded(self) -> set[str]:
        return set(self.config.excluded_groups) | {group.name for group in self._skipped}

    def _groups(self, model: nn.Module, input_shape: tuple[int, int, int]) -> list[str]:
        """Every prunable group's name, excluded ones included."""
        return [group.name for group in require_prunable_groups(model, input_shape, "channel_pruning")]

    def _pruned_groups(self, model: nn.Module, input_shape: tuple[int, int, int]) -> list[str]:
        """The groups that get a keep ratio: the prunable ones less the excluded, in forward order."""
        names = [name for name in self._groups(model, input_shape) if name not in self._excluded()]
        if not names:
            raise ConfigError(f"channel_pruning: nothing can be pruned in {type(model).__name__}: every channel "
                              f"group is in {EXCLUDED_GROUPS_FIELD}")
        return names

    def search_space(self, model: nn.Module, input_shape: tuple[int, int, int], search: SearchConfig,
                     latency: LatencySource | None = None) -> PerLayerSpace | None:
        """One keep ratio per prunable group in [min_keep_ratio, 1] under the search's budget (auto mode):
        ``search.target_macs_ratio`` of the MACs, or (``search.budget`` latency) ``search.target_speedup`` on the
        deployment target by ``latency``'s table. None in the other modes, whose ratios are given."""
        if self.config.mode != PerLayerMode.AUTO:
            return None
        every = macs_table(model, input_shape)
        if not without_groups(every, self._excluded()).names:
            self._pruned_groups(model, input_shape)  # raises: nothing to prune
        config = self.config
        depth = config.depth is True or (config.depth == "auto" and search.budget is Budget.LATENCY)
        records = self._removable(model, input_shape) if depth else []
        blocks = tuple(block.name for block in records)
        layers = tuple(every.layer_names()) if config.mixed_precision else ()
        if layers:
            check_precision_search(search)
        if search.budget is Budget.LATENCY:
            if latency is None:
                raise ValueError("channel_pruning: search.budget latency needs the target's latency table")
            if len(search.speedups) != 1:
                raise ValueError("channel_pruning: one space per target speed-up (SearchConfig.for_speedup)")
            target = latency(**({"depth": True} if blocks else {}), **({"precision": True} if layers else {}))
            for what, kind, wanted, measured in (
                    ("depth", "removed blocks", blocks, getattr(target.predictor, "blocks", ())),
                    ("mixed_precision", "FP32 layers", layers, getattr(target.predictor, "precision_layers", ()))):
                if set(wanted) - set(measured):
                    raise ConfigError(f"{what}: the latency table of {target.name} predicts {kind} {list(measured)}; "
                                      f"the search needs {list(wanted)} (a table built with {what})")
            round_to = self._round_to(target.step)
        else:
            round_to = self._round_to()
        # the target's step may differ from the round_to that check() tested: groups that cannot stay aligned with
        # it (a grouped conv's outputs) are left whole too, and the candidates' configs say so (``fixed``)
        misaligned = {group.name for group in structural_problems(model, input_shape, round_to,
                                                                  exclude=self._excluded())}
        excluded = [name for name in every.names if name in self._excluded() | misaligned]
        table = without_groups(every, excluded)
        if not table.names:
            raise ConfigError(f"channel_pruning: nothing can be pruned in {type(model).__name__} with round_to="
                              f"{round_to}: every channel group is left unpruned")
        whole = tuple((i, n) for i, (name, n) in enumerate(zip(every.names, every.sizes, strict=True))
                      if name in excluded)
        if search.budget is Budget.LATENCY:
            predictor = WholeGroups(target.predictor, tuple(i for i, _ in whole)) if whole else target.predictor
            budget: MacsBudget | LatencyBudget = LatencyBudget(
                1.0 / search.target_speedup, predictor, target.reference_ms, round_to, config.min_keep_ratio,
                target_name=target.name, blocks=blocks, layers=layers)
        else:
            budget = MacsBudget(search.macs_ratio, table, round_to, config.min_keep_ratio, blocks=blocks, whole=whole)
        features = (layer_features(model, input_shape, table.names) + block_features(table, records)
                    + precision_features(model, input_shape, layers, start=len(table.names) + len(blocks)))
        split = None
        if blocks or layers:
            split = SplitFields(self.searched_field, "removed_blocks", blocks, config.min_keep_ratio,
                                fp32_field="fp32_layers", layers=layers)
        return PerLayerSpace(self.searched_field,
                             table.names + dimension_names(blocks) + precision_dimension_names(layers),
                             low=config.min_keep_ratio, high=1.0, budget=budget, features=features,
                             label="keep ratio", split=split,
                             fixed=(("round_to", round_to), *((("excluded_groups", tuple(excluded)),) if misaligned
                                                              else ())))

    def fp32_layers(self) -> tuple[str, ...]:
        """The layers its model's INT8 exports keep in FP32: ``fp32_layers``, less those inside removed blocks
        (gone from the model)."""
        removed = tuple(f"{block}." for block in self.config.removed_blocks)
        return tuple(name for name in self.config.fp32_layers if not name.startswith(removed))

    def scores_int8(self) -> bool:
        """With ``mixed_precision`` a trial is scored on its INT8 artifact's accuracy: that is what an FP32 layer
        buys."""
        return self.config.mixed_precision

    def budgets_latency(self) -> bool:
        """Channel counts (and removed blocks) move latency on every runtime: mode auto's search is budgeted in
        latency under ``search.budget: auto``."""
        return self.config.mode == PerLayerMode.AUTO

    def _round_to(self, target_step: int | None = None) -> int:
        """``round_to``, with "auto" resolved: the target's latency step when there is one, else 8."""
        if isinstance(self.config.round_to, int):
            return self.config.round_to
        return target_step or DEFAULT_ROUND_TO

    def starting_proposal(self, model: nn.Module, data: DataBundle, space: PerLayerSpace) -> tuple[float, ...]:
        """The knapsack start: each channel's first-order Taylor importance on a few training batches against its
        cost under ``space``'s budget (MACs or predicted latency), filled greedily; with depth, blocks removed too
        (``ops.depth_knapsack``)."""
        excluded = self._excluded()
        groups = [group for group in prunable_groups(model, data.input_shape) if group.name not in excluded]
        batches = take_batches(data.train, FEATURE_BATCH_SIZE, IMPORTANCE_BATCHES, seed=self.config.seed)
        importance = [score.numpy() for score in taylor_importance(model, groups, batches)]
        split = space.split if isinstance(space.split, SplitFields) else None
        start = knapsack_start(importance, without_groups(macs_table(model, data.input_shape), excluded), space.budget,
                               round_to=dict(space.fixed)["round_to"], low=self.config.min_keep_ratio,
                               blocks=split.blocks if split else ())
        return join_tail(start, split.layers, (), self.config.min_keep_ratio) if split else start  # every layer INT8

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        config = self.config
        names = self._pruned_groups(model, data.input_shape)
        # a mapping: the excluded groups, not named, keep all their channels
        ratios = dict(zip(names, self._keep_ratios(len(names)), strict=True))
        if config.removed_blocks:  # depth first; then the groups that remain, by name (vanished groups dropped)
            every = {name: ratios.get(name, 1.0) for name in self._groups(model, data.input_shape)}
            ratios = {name: ratio for name, ratio in
                      remove_blocks_by_name_(model, data.input_shape, config.removed_blocks, every).items()
                      if name not in self._excluded()}
            names = list(ratios)
        batches = None
        if config.criterion == "lasso":
            batches = [inputs for inputs, _ in take_batches(data.train, FEATURE_BATCH_SIZE, config.num_batches,
                                                            seed=config.seed)]
        options = {
            "round_to": self._round_to(),
            "criterion": config.criterion,
            "batches": batches,
            "points_per_image": config.points_per_image,
            "seed": config.seed,
            "reconstruct": config.reconstruct,
            "features": config.features,
        }
        if config.group_size == 0:
            start, costs = time.perf_counter(), {}
            self.kept_channels = prune_channels_(model, data.input_shape, ratios, costs=costs, **options)
            if config.criterion == "lasso":
                _log(_cost_line(config.features, time.perf_counter() - start, costs))
            return model
        # group fine-tuning: each chunk is selected on features of the model pruned and fine-tuned so far
        self.kept_channels = {}
        chunks = [names[i : i + config.group_size] for i in range(0, len(names), config.group_size)]
        for index, chunk in enumerate(chunks):
            kept = prune_channels_(model, data.input_shape, {name: ratios[name] for name in chunk}, **options)
            self.kept_channels.update({name: kept[name] for name in chunk})
            if index < len(chunks) - 1:  # after the last chunk the trial's own fine-tuning takes over
                self._fine_tune(model, data, seed=config.seed + index)
        return model

    def _keep_ratios(self, num_groups: int) -> tuple[float, ...]:
        """One keep ratio per pruned group (``num_groups``: the prunable groups less the excluded ones)."""
        config = self.config
        if config.mode == PerLayerMode.LIST and config.ratios_file is not None:
            ratios = read_values_file(config.ratios_file, RATIOS_FILE_FIELD)
            if len(ratios) != num_groups:
                raise ConfigError(
                    f"{RATIOS_FILE_FIELD}: {config.ratios_file!r} holds {len(ratios)} ratios; "
                    f"expected {num_groups} (one per prunable group of this model that is not excluded)"
                )
            return ratios
        if config.mode == PerLayerMode.UNIFORM or not config.layer_keep_ratios:
            return (config.keep_ratio,) * num_groups  # auto before any search: uniform
        if len(config.layer_keep_ratios) != num_groups:
            raise ConfigError(
                f"{KEEP_RATIOS_FIELD}: got {len(config.layer_keep_ratios)} values; expected "
                f"{num_groups} (one per prunable group of this model that is not excluded)"
            )
        return config.layer_keep_ratios

    def _fine_tune(self, model: nn.Module, data: DataBundle, *, seed: int) -> None:
        """``group_fine_tune_steps`` Adam steps of cross-entropy on the training set (PocketFlow: Adam, small
        learning rate, a fraction of the schedule). Train mode; the caller's mode is restored."""
        steps = self.config.group_fine_tune_steps
        if steps == 0:
            return
        parameter = next(model.parameters())
        optimizer = torch.optim.Adam(model.parameters(), lr=self.config.group_learning_rate)
        was_training = model.training
        model.train()
        batches = take_batches(data.train, FEATURE_BATCH_SIZE, steps, seed=seed, cycle=True)
        for step, (inputs, labels) in enumerate(batches):
            loss = F.cross_entropy(model(inputs.to(parameter.device)), labels.to(parameter.device))
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"group fine-tuning diverged: loss is {loss.item()} at step {step}; "
                    "lower learner.options.group_learning_rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.train(was_training)

    def on_step(self, model: nn.Module, step: int) -> None:
        pass  # nothing to re-apply: the removed channels no longer exist

    def finalize(self, model: nn.Module) -> nn.Module:
        return model

