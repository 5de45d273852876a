"""Weight sparsification: gradual magnitude pruning during fine-tuning (Zhu & Gupta, "To prune, or not to prune:
exploring the efficacy of pruning for model compression", 2017; PocketFlow's WeightSparseLearner).

The masks, the schedule and the modes: docs/design.md, "Weight sparsification".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from pf_ray.config import SearchConfig
from pf_ray.data import DataBundle
from pf_ray.errors import ConfigError, ModelError
from pf_ray.learners.base import check_per_layer_mode, refuse_latency_budget
from pf_ray.metrics import quantized_layers
from pf_ray.ops.latency_budget import LatencySource
from pf_ray.ops.sparsity import (
    KeptWeightsBudget,
    PruningSchedule,
    WeightMask,
    heuristic_sparsities,
    magnitude_mask,
    num_pruned,
)
from pf_ray.packing import PackedTensor
from pf_ray.registry import LEARNERS
from pf_ray.search_space import PerLayerSpace, layer_features
from pf_ray.strict import check_range


class SparsityMode(enum.StrEnum):
    """``PerLayerMode``'s three, and PocketFlow's log-size rule."""

    UNIFORM = "uniform"  # every layer at sparsity
    HEURISTIC = "heuristic"  # s_i = c * ln(n_i), c chosen to meet sparsity (ops.sparsity.heuristic_sparsities)
    LIST = "list"  # layer_sparsities as given
    AUTO = "auto"  # the search fills layer_sparsities


SPARSITIES_FIELD = "learner.options.layer_sparsities"
_LAYERS = (nn.Conv2d, nn.Linear)  # pf_ray.metrics.layer_table's layers


@dataclass(frozen=True)
class WeightSparsificationConfig:
    sparsity: float = 0.5  # target fraction of zeros among all covered weights (uniform: in every layer)
    mode: SparsityMode = SparsityMode.AUTO
    layer_sparsities: tuple[float, ...] = ()  # final sparsity per conv/linear layer, in forward order (list/auto)
    max_layer_sparsity: float = 0.98  # upper bound of each layer's sparsity in the search and the heuristic
    begin_fraction: float = 0.1  # t_b as a fraction of the training steps (PocketFlow: 0.1)
    end_fraction: float = 0.5  # t_e as a fraction of the training steps (PocketFlow: 0.5)
    exponent: float = 3.0  # of the schedule's ramp (the paper: 3)
    mask_update_steps: int = 100  # optimiser steps between mask updates inside [t_b, t_e]
    total_steps: int = 10_000  # training length used only if the training loop never calls set_total_steps

    def __post_init__(self) -> None:
        check_range("sparsity", self.sparsity, low=0.0, high=1.0, high_inclusive=False)
        check_per_layer_mode(self.mode, "layer_sparsities", self.layer_sparsities)
        for index, value in enumerate(self.layer_sparsities):
            check_range(f"layer_sparsities[{index}]", value, low=0.0, high=1.0, high_inclusive=False)
        check_range("max_layer_sparsity", self.max_layer_sparsity, low=0.0, high=1.0, low_inclusive=False,
                    high_inclusive=False)
        check_range("begin_fraction", self.begin_fraction, low=0.0, high=1.0, high_inclusive=False)
        check_range("end_fraction", self.end_fraction, low=0.0, high=1.0, low_inclusive=False)
        if self.end_fraction <= self.begin_fraction:
            raise ConfigError(f"end_fraction: got {self.end_fraction:g}; must be above begin_fraction "
                              f"({self.begin_fraction:g})")
        check_range("exponent", self.exponent, low=0.0, low_inclusive=False)
        check_range("mask_update_steps", self.mask_update_steps, low=1)
        check_range("total_steps", self.total_steps, low=1)
        if self.mode in (SparsityMode.HEURISTIC, SparsityMode.AUTO) and self.sparsity > self.max_layer_sparsity:
            raise ConfigError(f"sparsity: got {self.sparsity:g} with mode {str(self.mode)!r}; no layer may exceed "
                              f"max_layer_sparsity ({self.max_layer_sparsity:g}), so neither may the target")


def covered_layers(model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, int]]:
    """(name, weight count) of every conv/linear layer, in forward order (each once): one ``layer_sparsities``
    value per entry, in this order."""
    return [(name, model.get_submodule(name).weight.numel())
            for name in quantized_layers(model, input_shape, first_last=True)]


@LEARNERS.register("weight_sparsification", config=WeightSparsificationConfig)
class WeightSparsification:
    """Masks in ``prepare``, schedule in ``on_step``, exact final masks folded into the weights in ``finalize``."""

    searched_field = "layer_sparsities"  # the config field its per-layer search fills (PerLayerSpace.field)

    def __init__(self, config: WeightSparsificationConfig) -> None:
        self.config = config
        self.total_steps = config.total_steps
        self.targets: dict[str, float] = {}  # layer name -> final sparsity, filled by prepare
        self._final: set[str] = set()  # layers seen holding their final mask after t_e (not checked again)

    def set_total_steps(self, total_steps: int) -> None:
        """The number of optimiser steps fine-tuning will take: t_b and t_e are fractions of it."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError(f"total_steps: got {total_steps!r}; expected a positive int")
        self.total_steps = total_steps

    @property
    def _schedule(self) -> PruningSchedule:
        config = self.config
        return PruningSchedule.from_fractions(self.total_steps, config.begin_fraction, config.end_fraction,
                                              exponent=config.exponent, update_every=config.mask_update_steps)

    # ---- hooks of the training run

    def check(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        self._targets(self._layers(model, input_shape))

    def prepare(self, model: nn.Module, data: DataBundle) -> nn.Module:
        self.targets = self._targets(self._layers(model, data.input_shape))
        self._final = set()
        for name in self.targets:
            module = model.get_submodule(name)
            if parametrize.is_parametrized(module, "weight"):
                raise ModelError(f"weight_sparsification: layer {name!r} already has a parametrized weight "
                                 "(prepare called twice on this model?)")
            # the backup becomes parametrizations.weight.original (the same Parameter, trained by the optimiser
            # the loop builds after prepare); module.weight now reads backup * mask
            parametrize.register_parametrization(module, "weight", WeightMask(module.weight))
        return model

    def on_step(self, model: nn.Module, step: int) -> None:
        self._require_prepared("on_step")
        schedule = self._schedule
        due = schedule.update_due(step)
        after_end = step >= schedule.end_step
        if not (due or after_end):
            return
        with torch.no_grad():
            for name, target in self.targets.items():
                if not due and name in self._final:
                    continue
                mask, backup = self._masked(model, name)
                # after t_e: only a layer that missed its final update (t_e skipped, e.g. by a resume) changes
                if due or _zeros(mask) != num_pruned(mask.numel(), target):
                    mask.copy_(magnitude_mask(backup, schedule.sparsity(step, target)))
                if after_end:
                    self._final.add(name)

    def finalize(self, model: nn.Module) -> nn.Module:
        self._require_prepared("finalize")
        with torch.no_grad():
            for name, target in self.targets.items():
                mask, backup = self._masked(model, name)
                # a mask that already has its final count of zeros is the one the kept weights were trained
                # with since t_e: recomputing it from backups could revive weights that never trained after it
                if _zeros(mask) != num_pruned(mask.numel(), target):
                    mask.copy_(magnitude_mask(backup, target))
                # weight = Parameter(backup * mask); the module is a plain Conv2d/Linear again
                parametrize.remove_parametrizations(model.get_submodule(name), "weight")
        return model

    def packed(self, model: nn.Module) -> dict[str, PackedTensor]:
        """A bitmask plus float32 non-zeros (ceil(n/8) + 4 * nnz bytes) for every conv/linear weight of the
        finalized model that this stores in fewer bytes than dense float32 (more than 1/32 of it zero)."""
        packed = {}
        for name, module in model.named_modules():
            if not isinstance(module, _LAYERS):
                continue
            if parametrize.is_parametrized(module, "weight"):
                raise ModelError(f"weight_sparsification: layer {name!r} still carries its mask; call finalize "
                                 "before packed")
            weight = module.weight.detach()
            if 4 * weight.numel() > -(-weight.numel() // 8) + 4 * int(torch.count_nonzero(weight)):
                packed[f"{name}.weight" if name else "weight"] = PackedTensor.sparse(weight)
        return packed

    # ---- per-layer search

    def search_space(self, model: nn.Module, input_shape: tuple[int, int, int], search: SearchConfig,
                     latency: LatencySource | None = None) -> PerLayerSpace | None:
        """One final sparsity per conv/linear layer in [0, max_layer_sparsity]; the budget is the fraction of
        the covered weights kept, 1 - sparsity. None unless mode is 'auto'."""
        refuse_latency_budget(search, "weight_sparsification", "unstructured zeros do not make a CPU runtime "
                              "faster; it keeps its own budget, the fraction of weights kept "
                              "(learner.options.sparsity)")
        if self.config.mode != SparsityMode.AUTO:
            return None
        names, sizes = _unzip(self._layers(model, input_shape))
        budget = KeptWeightsBudget(1.0 - self.config.sparsity, sizes, self.config.max_layer_sparsity)
        return PerLayerSpace(self.searched_field, names, low=0.0, high=self.config.max_layer_sparsity,
                             budget=budget, features=layer_features(model, input_shape, names), label="sparsity")

    # ---- helpers

    def _layers(self, model: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, int]]:
        layers = covered_layers(model, input_shape)
        if not layers:
            raise ModelError(f"weight_sparsification: the model ({type(model).__name__}) has no conv or linear "
                             "layer to sparsify")
        return layers

    def _targets(self, layers: list[tuple[str, int]]) -> dict[str, float]:
        """Final sparsity per layer name, from the mode."""
        config = self.config
        names, sizes = _unzip(layers)
        if config.mode == SparsityMode.HEURISTIC:
            values = heuristic_sparsities(sizes, config.sparsity, config.max_layer_sparsity)
        elif config.mode == SparsityMode.UNIFORM or not config.layer_sparsities:  # auto before any search: uniform
            values = (config.sparsity,) * len(names)
        elif len(config.layer_sparsities) != len(names):
            raise ConfigError(f"{SPARSITIES_FIELD}: got {len(config.layer_sparsities)} values; expected "
                              f"{len(names)} (one per conv/linear layer of this model)")
        else:
            values = config.layer_sparsities
        return dict(zip(names, values, strict=True))

    def _require_prepared(self, hook: str) -> None:
        if not self.targets:
            raise ModelError(f"weight_sparsification: {hook} called before prepare; this learner has no masks")

    @staticmethod
    def _masked(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask buffer, backup Parameter) of layer ``name`` of a prepared model."""
        module = model.get_submodule(name)
        if not parametrize.is_parametrized(module, "weight") or not isinstance(
            module.parametrizations.weight[0], WeightMask
        ):
            raise ModelError(f"weight_sparsification: layer {name!r} has no mask; was the model prepared by this "
                             "learner (and not finalized yet)?")
        return module.parametrizations.weight[0].mask, module.parametrizations.weight.original


def _zeros(mask: torch.Tensor) -> int:
    return int(mask.numel() - torch.count_nonzero(mask))


def _unzip(layers: list[tuple[str, int]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    return tuple(name for name, _ in layers), tuple(size for _, size in layers)
