"""Joint depth-and-width candidates: a set of removed residual blocks (``pf_ray.ops.blocks``) and a kept channel
count per channel group of the *original* model, by group name.

A candidate is applied in that order: the blocks are removed first, then the channel groups that remain are pruned
to their counts, looked up by name. Removing a block with an identity shortcut takes its layers out of the model:
the groups inside it (a ResNet block's first convolution, an inverted residual's expansion) disappear, and the
residual trunk's group loses the block's members but keeps its name (its first layer, a stem or a downsampling
block, is never removable) and its channels. Every other group is untouched. So the MACs of a joint candidate are
the original ``MacsTable``'s with the removed blocks' layers dropped (``without_blocks``): no trace of the
depth-pruned model needed (tested equal to the really pruned model's MACs).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TypeVar

from torch import nn

from pf_ray.errors import ConfigError, ModelError
from pf_ray.ops.blocks import remove_blocks_
from pf_ray.ops.macs_budget import MacsTable, block_layers, macs_table, without_blocks
from pf_ray.ops.pruning import prune_channels_

# block_layers and without_blocks live with the MacsTable (the depth-aware MACs budget needs them), named here too
__all__ = ["apply_joint_", "block_layers", "counts_by_index", "joint_macs", "remove_blocks_by_name_", "vanished_groups",
           "without_blocks"]

T = TypeVar("T")


def vanished_groups(table: MacsTable, removed: Collection[str]) -> tuple[str, ...]:
    """The groups of ``table`` that removing the blocks ``removed`` takes away whole (no layer of theirs is left)."""
    left = without_blocks(table, removed)
    touched = {g for layer in left.layers for g, _ in (*layer.in_members, *layer.out_members)}
    return tuple(name for g, name in enumerate(table.names) if g not in touched)


def counts_by_index(table: MacsTable, kept: Sequence[int] | Mapping[str, int]) -> list[int]:
    """Kept counts in the table's group order: a sequence as it is, a mapping by group name (groups not named keep
    all their channels). Each count must be in [1, channels of its group]."""
    if isinstance(kept, Mapping):
        unknown = sorted(set(kept) - set(table.names))
        if unknown:
            raise ConfigError(f"kept channels of group {unknown[0]!r}: no such channel group of the original model; "
                              f"known: {', '.join(table.names)}")
        counts = [kept.get(name, size) for name, size in zip(table.names, table.sizes, strict=True)]
    else:
        counts = list(kept)
        if len(counts) != len(table.names):
            raise ConfigError(f"kept channels: got {len(counts)} counts; expected {len(table.names)}, one per "
                              "channel group of the original model")
    for name, count, size in zip(table.names, counts, table.sizes, strict=True):
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= size:
            raise ConfigError(f"kept channels of group {name!r}: got {count!r}; allowed: an integer in [1, {size}]")
    return counts


def joint_macs(table: MacsTable, removed: Collection[str], kept: Sequence[int] | Mapping[str, int]) -> int:
    """MACs per example of the original model (``table``) with the blocks ``removed`` and ``kept`` channels per
    original group (the counts of vanished groups do not matter)."""
    return without_blocks(table, removed).macs_of_counts(counts_by_index(table, kept))


def remove_blocks_by_name_(model: nn.Module, input_shape: Sequence[int], removed: Collection[str],
                           by_group: Mapping[str, T], *, check: bool = True) -> dict[str, T]:
    """Remove the blocks ``removed`` from ``model`` (in place), and return ``by_group`` (a value per channel group
    of the model as passed in, by name) for the groups that remain, in their order: vanished groups dropped.

    Raises ModelError where a remaining group is not a group of the original model (its value cannot be looked up
    by name)."""
    table = macs_table(model, input_shape)
    remove_blocks_(model, input_shape, removed, check=check)
    remaining = macs_table(model, input_shape)
    sizes = dict(zip(table.names, table.sizes, strict=True))
    for name, size in zip(remaining.names, remaining.sizes, strict=True):
        if sizes.get(name) != size:
            raise ModelError(f"after removing blocks {sorted(removed)}, channel group {name!r} ({size} channels) is "
                             "not a group of the original model: its count cannot be looked up by name")
    return {name: by_group[name] for name in remaining.names}


def apply_joint_(model: nn.Module, input_shape: Sequence[int], removed: Collection[str],
                 kept: Sequence[int] | Mapping[str, int], *, criterion: str = "l1", check: bool = True,
                 **pruning: object) -> dict[str, int]:
    """Apply a joint candidate to ``model`` in place: remove the blocks ``removed``, then prune every channel group
    that remains to its count in ``kept`` (per group of the model as passed in, by name or in its order). Returns
    the kept count of every remaining group, by name.

    Args:
        criterion, pruning: passed to ``prune_channels_`` (``"l1"``; ``"lasso"`` with ``batches=`` ...).
        check: ``remove_blocks_``'s check of the removal on an example.
    """
    table = macs_table(model, input_shape)
    counts = dict(zip(table.names, counts_by_index(table, kept), strict=True))
    sizes = dict(zip(table.names, table.sizes, strict=True))
    wanted = remove_blocks_by_name_(model, input_shape, removed, counts, check=check)
    ratios = {name: count / sizes[name] for name, count in wanted.items()}
    got = prune_channels_(model, input_shape, ratios, round_to=1, criterion=criterion, **pruning)  # type: ignore[arg-type]
    if got != wanted:
        raise ModelError(f"pruning kept {got}; asked for {wanted}")
    return got
