"""Discrimination-aware channel selection, stage by stage (Zhuang et al., NeurIPS 2018): auxiliary heads, stage
fine-tuning, greedy selection of each group's channels by gradient norm. The algorithm and its differences from the
paper: docs/design.md, "Discrimination-aware pruning"; the pieces it is built from: ``pf_ray.ops.dcp``."""

from __future__ import annotations

import copy
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pf_ray.data import DataBundle
from pf_ray.errors import ModelError
from pf_ray.ops.channel_groups import GroupMember, PrunableGroup
from pf_ray.ops.dcp import (
    CONSUMER_LAYERS,
    AuxiliaryHead,
    Consumer,
    call_order,
    channel_mask,
    mask_consumer_inputs_,
    reconstruction_loss,
    record_outputs,
    select_channels_greedily_,
)
from pf_ray.ops.pruning import kept_channel_count
from pf_ray.train import take_batches

MOMENTUM = 0.9  # of both fine-tunings' SGD


class SelectionSettings(Protocol):
    """What the selection reads of the learner's config (``DiscriminationAwarePruningConfig``)."""

    keep_ratio: float
    num_stages: int
    round_to: int
    stage_fine_tune_steps: int
    channel_fine_tune_steps: int
    reconstruction_weight: float
    learning_rate: float
    batch_size: int
    seed: int


class StageWiseSelection:
    """One run of the stage-wise selection on ``model`` (masks only; nothing is removed here): ``run`` returns the
    channels to keep of every group."""

    def __init__(
        self, config: SelectionSettings, model: nn.Module, data: DataBundle, groups: list[PrunableGroup]
    ) -> None:
        self.config = config
        self.model = model
        self.original = copy.deepcopy(model).eval().requires_grad_(False)  # targets of the reconstruction losses
        self.num_classes = data.num_classes
        self.device = next(model.parameters()).device
        # only full batches (unless the data set is smaller than one): every greedy gradient averages as many examples,
        # and no batch norm trains on a single example
        self.batches = take_batches(data.train, min(config.batch_size, len(data.train)), seed=config.seed, cycle=True,
                                    reseed=True, full_only=True, device=self.device)
        self.modules = dict(model.named_modules())
        original_modules = dict(self.original.named_modules())
        self.original_of = {module: original_modules[name] for name, module in self.modules.items()}
        self.groups = groups
        self.kept = {group.name: torch.ones(group.num_channels, dtype=torch.bool) for group in groups}
        self.consumers = {group.name: self._consumers(group) for group in groups}
        # layer -> (member, its group's kept mask) for every group the layer produces channels of
        self.produces: dict[nn.Module, list[tuple[GroupMember, torch.Tensor]]] = {}
        for group in groups:
            for member in group.members:
                if member.dim == "out":
                    self.produces.setdefault(self.modules[member.module], []).append((member, self.kept[group.name]))
        self.call_order = call_order(model, data.input_shape, self.device)

    def _consumers(self, group: PrunableGroup) -> list[Consumer]:
        consumers = []
        for member in group.members:
            if member.dim != "in":
                continue
            module = self.modules[member.module]
            if not isinstance(module, CONSUMER_LAYERS):
                raise ModelError(
                    f"discrimination_aware_pruning: layer {member.module!r} ({type(module).__name__}) reads the "
                    f"channels of group {group.name!r}; only Conv2d and Linear readers can be masked"
                )
            consumers.append((module, member))
        if not consumers:
            raise ModelError(
                f"discrimination_aware_pruning: no conv/linear layer reads the channels of group {group.name!r}, "
                "so there are no kernel slices to score"
            )
        return consumers

    def run(self) -> dict[str, torch.Tensor]:
        """Returns the kept channels of every group: (num_channels,) bool, by group name."""
        num_stages = self.config.num_stages
        sizes = [
            len(self.groups) // num_stages + (index < len(self.groups) % num_stages) for index in range(num_stages)
        ]
        start = 0
        for index, size in enumerate(sizes):
            stage = self.groups[start : start + size]
            start += size
            head_layer, head = None, None
            if index < num_stages - 1:  # the last stage's discrimination-aware loss is the final loss itself
                head_layer = max(
                    (module for group in stage for module, _ in self.consumers[group.name]),
                    key=lambda module: self.call_order[module],
                )
                head = self._head(head_layer)
            self._fine_tune_stage(head_layer, head)
            for group in stage:
                self._select(group, head_layer, head)
        return self.kept

    # -- pieces of a stage ----------------------------------------------------------------------------------------

    def _head(self, layer: nn.Module) -> AuxiliaryHead:
        if isinstance(layer, nn.Linear):
            return AuxiliaryHead(layer.out_features, self.num_classes, spatial=False).to(self.device)
        return AuxiliaryHead(layer.out_channels, self.num_classes).to(self.device)

    def _fine_tune_stage(self, head_layer: nn.Module | None, head: AuxiliaryHead | None) -> None:
        """The paper's "fine-tune M with L_S^p and L_f": every weight and the head, on auxiliary + final loss."""
        parameters = list(self.model.parameters()) + (list(head.parameters()) if head is not None else [])
        optimizer = torch.optim.SGD(parameters, lr=self.config.learning_rate, momentum=MOMENTUM, nesterov=True)
        self.model.train()
        if head is not None:
            head.train()
        record = [head_layer] if head_layer is not None else []
        for _ in range(self.config.stage_fine_tune_steps):
            inputs, labels = next(self.batches)
            features, logits = record_outputs(self.model, inputs, record)
            loss = F.cross_entropy(logits, labels)
            if head is not None:
                loss = loss + F.cross_entropy(head(features[head_layer], self._output_mask(head_layer)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self._apply_masks_()  # channels removed in earlier stages stay removed

    def _select(self, group: PrunableGroup, head_layer: nn.Module | None, head: AuxiliaryHead | None) -> None:
        num_keep = kept_channel_count(group.num_channels, self.config.keep_ratio, self.config.round_to)
        if num_keep == group.num_channels:
            return  # e.g. 4 channels with round_to=8: nothing to remove, nothing to choose
        consumers = self.consumers[group.name]
        layers = list(dict.fromkeys(module for module, _ in consumers))
        last_layer = max(layers, key=self.call_order.__getitem__)  # the original model can stop after it
        self.model.eval()
        if head is not None:
            head.eval()

        def loss_fn() -> torch.Tensor:
            """reconstruction_weight * L_M (every consumer of the group) + the stage's auxiliary loss."""
            inputs, labels = next(self.batches)
            features, logits = record_outputs(
                self.model, inputs, [*layers, head_layer] if head else layers, stop_after=head_layer
            )
            with torch.no_grad():
                targets, _ = record_outputs(
                    self.original,
                    inputs,
                    [self.original_of[m] for m in layers],
                    stop_after=self.original_of[last_layer],
                )
            reconstruction = sum(
                reconstruction_loss(features[m], targets[self.original_of[m]], self._output_mask(m)) for m in layers
            )
            if head is not None:
                auxiliary = F.cross_entropy(head(features[head_layer], self._output_mask(head_layer)), labels)
            else:
                auxiliary = F.cross_entropy(logits, labels)
            return self.config.reconstruction_weight * reconstruction + auxiliary

        after_addition = None
        if self.config.channel_fine_tune_steps > 0:
            optimizer = torch.optim.SGD(
                [m.weight for m in layers], lr=self.config.learning_rate, momentum=MOMENTUM, nesterov=True
            )

            def after_addition() -> None:  # the paper's step 6: fine-tune the kept slices of the consumers
                for _ in range(self.config.channel_fine_tune_steps):
                    optimizer.zero_grad(set_to_none=True)
                    loss_fn().backward()
                    optimizer.step()
                    self._apply_masks_()

        select_channels_greedily_(consumers, self.kept[group.name], num_keep, loss_fn, after_addition=after_addition)

    # -- masks ----------------------------------------------------------------------------------------------------

    def _output_mask(self, layer: nn.Module) -> torch.Tensor:
        """(out channels,) bool: False for the layer's output channels of unkept group channels."""
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        return channel_mask(channels, self.produces.get(layer, [])).to(self.device)

    def _apply_masks_(self) -> None:
        """Zero every consumer's kernel slices of unkept channels (after an optimiser step moved them)."""
        for group in self.groups:
            if not bool(self.kept[group.name].all()):
                mask_consumer_inputs_(self.consumers[group.name], self.kept[group.name])
