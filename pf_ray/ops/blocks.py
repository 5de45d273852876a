"""Depth pruning's unit: residual blocks whose output is ``shortcut(x) + branch(x)`` (then, in ResNets, a ReLU)
with an *identity* shortcut, found in a model and removed (the branch gone, what is left of the block kept).

Where per-operator overhead dominates (batch 1, small inputs, INT8), removing a whole block buys what no channel
count can (issue 14: at equal MACs, ResNet-8 ran 3.5x faster than ResNet-20 at half width in ONNX Runtime INT8).

What is detected: a rule per module *type*, not graph matching. A module is a residual block when its type is
exactly one of ``block_types()`` (pf-ray's CIFAR ResNet ``BasicBlock`` and MobileNet-v2 ``InvertedResidual``;
torchvision's ResNet ``BasicBlock`` and ``Bottleneck`` and MobileNet-v2/v3 ``InvertedResidual``); it is
*removable* when its shortcut is the identity by the type's own flag (no projection / ``downsample is None`` /
``use_residual`` / ``use_res_connect``) and, on a traced forward pass, every call's output has the shape of its
input. Not detected: subclasses of those types (their forward may differ), residual blocks of any other class
(user models, timm, torchvision's other families), adds written inline in a parent's ``forward``, and blocks
called with more than one input.

What replaces a removed block (``RemovedBlock``) computes exactly what the block computes with its branch gone
(its branch's last batch norm with weight and bias 0): the identity, or, for a block whose add is followed by a
ReLU, ``relu(x)`` unless the block's input is provably non-negative (the output of a ReLU or ReLU6, or of a pooling
/ identity / another removed block fed by one, traced by tensor identity on the forward pass; then ``relu(x) == x``
and it is dropped). ``remove_blocks_`` checks that on an example by default: the depth-pruned model's output must
equal the unpruned model's with the removed branches' last batch norms zeroed.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pf_ray.errors import ConfigError, ModelError
from pf_ray.hooks import forward_hooks


@dataclass(frozen=True)
class BlockRule:
    """How to read one block type: whether its shortcut is the identity, the name (under the block) of its branch's
    last batch norm, and the name of its post-add activation ("" when there is none)."""

    kind: str
    identity_shortcut: Callable[[nn.Module], bool]
    branch_end: Callable[[nn.Module], str]
    activation: str = ""


def _last_index(sequence_name: str, suffix: str = "") -> Callable[[nn.Module], str]:
    return lambda block: f"{sequence_name}.{len(getattr(block, sequence_name)) - 1}{suffix}"


@functools.cache
def block_types() -> dict[type, BlockRule]:
    """The known block types and their rules (imported on first use: pf_ray.models and torchvision)."""
    from torchvision.models import mobilenetv2 as tv_mobilenetv2
    from torchvision.models import mobilenetv3 as tv_mobilenetv3
    from torchvision.models import resnet as tv_resnet

    from pf_ray.models import mobilenet, resnet_cifar

    identity = lambda b: isinstance(b.shortcut, nn.Identity)  # noqa: E731
    no_downsample = lambda b: b.downsample is None  # noqa: E731
    return {
        resnet_cifar.BasicBlock: BlockRule("pf_ray BasicBlock", identity, lambda b: "bn2", "relu2"),
        mobilenet.InvertedResidual: BlockRule("pf_ray InvertedResidual", lambda b: bool(b.use_residual),
                                              _last_index("conv")),
        tv_resnet.BasicBlock: BlockRule("torchvision BasicBlock", no_downsample, lambda b: "bn2", "relu"),
        tv_resnet.Bottleneck: BlockRule("torchvision Bottleneck", no_downsample, lambda b: "bn3", "relu"),
        tv_mobilenetv2.InvertedResidual: BlockRule("torchvision InvertedResidual (v2)",
                                                   lambda b: bool(b.use_res_connect), _last_index("conv")),
        tv_mobilenetv3.InvertedResidual: BlockRule("torchvision InvertedResidual (v3)",
                                                   lambda b: bool(b.use_res_connect), _last_index("block", ".1")),
    }


# Modules whose output is never negative, and modules whose output is non-negative when their input is.
NON_NEGATIVE_OUTPUT = (nn.ReLU, nn.ReLU6)
SIGN_PRESERVING = (nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                   nn.Flatten)


class RemovedBlock(nn.Module):
    """A removed residual block: its input, through the block's post-add activation where that is not the identity
    on it (``activation``; a fresh, not in-place copy). ``removed`` is the block's kind, for the model's repr."""

    def __init__(self, removed: str, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.removed = removed
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.activation is None else self.activation(x)

    def extra_repr(self) -> str:
        return f"removed={self.removed!r}"


@dataclass(frozen=True)
class ResidualBlock:
    """One residual block of a known type, as a traced forward pass saw it."""

    name: str  # qualified module name (model.named_modules())
    kind: str  # BlockRule.kind
    removable: bool
    reason: str  # why it is not removable ("" when it is)
    branch_end: str  # qualified name of the branch's last batch norm (zeroed: the branch contributes nothing)
    activation: str  # qualified name of the post-add activation, "" when there is none
    input_non_negative: bool  # proved by tracing: then the post-add ReLU is the identity on the input
    shape: tuple[int, ...]  # its input's shape, one example

    @property
    def removed_is_identity(self) -> bool:
        """What replaces it is the identity (no activation, or a ReLU on a non-negative input)."""
        return not self.activation or self.input_non_negative


def residual_blocks(model: nn.Module, input_shape: Sequence[int]) -> list[ResidualBlock]:
    """Every residual block of a known type (``block_types()``) in ``model``, removable or not, in the order of their
    first call on a forward pass of one random example of ``input_shape`` (eval mode; modes restored). Blocks that
    the forward pass does not call are left out."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.float32
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    names = {module: name for name, module in model.named_modules()}
    non_negative: list[torch.Tensor] = []  # kept alive, so identity (``is``) stays meaningful
    calls: dict[nn.Module, list[tuple[tuple[int, ...], tuple[int, ...] | None, bool]]] = {}

    def marked(tensor: Any) -> bool:
        return isinstance(tensor, torch.Tensor) and any(tensor is t for t in non_negative)

    def activation_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(module, NON_NEGATIVE_OUTPUT) or (inputs and marked(inputs[0])):
            if isinstance(output, torch.Tensor):
                non_negative.append(output)

    def block_pre_hook(module: nn.Module, inputs: Any) -> None:
        x = inputs[0] if inputs else None
        # proved by the trace, and checked on the example (an in-place change after the mark would show here)
        proved = marked(x) and bool((x >= 0).all())
        calls.setdefault(module, []).append((tuple(x.shape[1:]) if isinstance(x, torch.Tensor) else (), None,
                                             proved and len(inputs) == 1))

    def block_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        shape_in, _, proved = calls[module][-1]
        shape_out = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
        calls[module][-1] = (shape_in, shape_out, proved)
        rule = block_types()[type(module)]
        if rule.activation and isinstance(output, torch.Tensor):
            non_negative.append(output)  # relu(...) is its output

    blocks = [m for m in model.modules() if type(m) in block_types()]
    tracked = {m: activation_hook for m in model.modules()
               if isinstance(m, (*NON_NEGATIVE_OUTPUT, *SIGN_PRESERVING, RemovedBlock))}
    handles = [m.register_forward_pre_hook(block_pre_hook) for m in blocks]
    try:
        with forward_hooks(model, {**tracked, **{m: block_hook for m in blocks}}, training=False), \
                torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, TypeError) as error:
        raise ModelError(f"input shape {tuple(input_shape)}: the model cannot run an example of this shape to find "
                         f"its residual blocks ({type(error).__name__}: {str(error).splitlines()[0]})") from error
    finally:
        for handle in handles:
            handle.remove()

    return [_describe(module, names[module], module_calls) for module, module_calls in calls.items()]


def _describe(module: nn.Module, name: str, calls: list[tuple[tuple[int, ...], Any, bool]]) -> ResidualBlock:
    rule = block_types()[type(module)]
    reason = ""
    if not rule.identity_shortcut(module):
        reason = "its shortcut is not the identity (a projection / downsampling shortcut)"
    elif len(calls) > 1:
        reason = f"it is called {len(calls)} times in one forward pass"
    elif any(shape_in != shape_out for shape_in, shape_out, _ in calls):
        reason = f"its output's shape {calls[0][1]} differs from its input's {calls[0][0]}"
    prefix = f"{name}." if name else ""
    return ResidualBlock(
        name=name, kind=rule.kind, removable=not reason, reason=reason,
        branch_end=prefix + rule.branch_end(module), activation=prefix + rule.activation if rule.activation else "",
        input_non_negative=all(proved for _, _, proved in calls), shape=calls[0][0],
    )


def removable_blocks(model: nn.Module, input_shape: Sequence[int]) -> list[ResidualBlock]:
    """The blocks ``remove_blocks_`` can remove (identity shortcut, shape kept), in forward order."""
    return [block for block in residual_blocks(model, input_shape) if block.removable]


def removed_blocks(model: nn.Module) -> list[str]:
    """The names of the blocks already removed from ``model`` (its ``RemovedBlock`` modules), in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, RemovedBlock)]


def remove_blocks_(model: nn.Module, input_shape: Sequence[int], names: Collection[str], *,
                   check: bool = True) -> list[ResidualBlock]:
    """Replace each named block of ``model`` by a ``RemovedBlock`` (in place); returns the removed blocks' records.

    Args:
        input_shape: one example's shape (channels, height, width): blocks are found on a forward pass.
        names: qualified module names of removable blocks (``removable_blocks``); order and repeats do not matter.
        check: run an example through the result and through a copy of the unpruned model with each removed
            branch's last batch norm zeroed (weight and bias 0): they must agree (ModelError otherwise).
    """
    if isinstance(names, str):
        raise ConfigError(f"removed blocks: got the string {names!r}; expected a list of block names")
    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    blocks = {block.name: block for block in residual_blocks(model, input_shape)}
    removable = [name for name, block in blocks.items() if block.removable]
    for name in wanted:
        block = blocks.get(name)
        if block is None or not block.removable:
            if name in removed_blocks(model):
                why = "it is already removed"
            elif block is not None:
                why = f"{block.kind} {block.reason}"
            else:
                why = "no residual block of a known type has this name"
            shown = ", ".join(removable[:6]) + (", ..." if len(removable) > 6 else "") or "none"
            raise ConfigError(f"removed block {name!r}: {why}; removable blocks of this model: {shown}")
    chosen = [blocks[name] for name in blocks if name in set(wanted)]  # forward order
    reference = _branches_zeroed(model, chosen) if check else None
    modules = dict(model.named_modules())
    for block in chosen:
        activation = None
        if not block.removed_is_identity:
            activation = copy.deepcopy(modules[block.activation])
            if hasattr(activation, "inplace"):
                activation.inplace = False
        _set_module(model, block.name, RemovedBlock(block.kind, activation))
    if reference is not None:
        _check_against(model, reference, input_shape, [b.name for b in chosen])
    return chosen


def _branches_zeroed(model: nn.Module, blocks: Sequence[ResidualBlock]) -> nn.Module:
    """A copy of ``model`` whose blocks' branches contribute nothing: their last batch norms' weight and bias 0."""
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for block in blocks:
        norm = modules.get(block.branch_end)
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or not norm.affine:
            raise ModelError(f"block {block.name!r}: {block.branch_end!r} is {type(norm).__name__}, not the affine "
                             "batch norm that ends its branch; pass check=False to remove it unchecked")
        with torch.no_grad():
            norm.weight.zero_()
            norm.bias.zero_()
    return reference


def _check_against(model: nn.Module, reference: nn.Module, input_shape: Sequence[int], names: list[str]) -> None:
    parameter = next(reference.parameters())
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(1)).to(parameter.device,
                                                                                            parameter.dtype)
    with forward_hooks(model, training=False), forward_hooks(reference, training=False), torch.no_grad():
        got, expected = model(example), reference(example)
    pairs = list(zip(_flat(got), _flat(expected), strict=True))
    if not all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in pairs):
        worst = max(float((a - b).abs().max()) for a, b in pairs)
        raise ModelError(f"removing blocks {names} changed the model's output by up to {worst:.3g} beyond what "
                         "their branches contribute: the removal rule does not hold for this model")


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _flat(item)] if isinstance(value, (list, tuple)) else []


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ModelError("the model itself is a residual block; it cannot be removed")
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, module)  # nn.Sequential's children are attributes named "0", "1", ...
