"""A forward pass with forward hooks on chosen modules, and every module's train/eval mode put back afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import nn

ForwardHook = Callable[[nn.Module, Any, Any], Any]  # (module, inputs, output), as register_forward_hook takes it


@contextmanager
def forward_hooks(
    model: nn.Module, hooks: Mapping[nn.Module, ForwardHook] | None = None, *, training: bool | None = None
) -> Iterator[nn.Module]:
    """Inside the block: each hook registered on its module and, unless ``training`` is None,
    ``model.train(training)``. On leaving it, even by an exception (a hook may raise one to stop the forward pass
    early): the hooks removed and every module's ``training`` flag set back to what it was on entry.

    The flags are restored one by one, not through ``train()``: a model whose modules were in mixed modes (a frozen
    batch norm in a training model) gets exactly its modes back, and a module that overrides ``train()`` (a pt2e
    graph) is not asked to switch again.

    Args:
        model: the model whose modes are saved and set.
        hooks: module (of ``model``, or any other) -> its forward hook.
        training: the mode to run in: False for eval, True for train, None to leave the modes as they are.
    """
    modes = {module: module.training for module in model.modules()}
    handles = [module.register_forward_hook(hook) for module, hook in (hooks or {}).items()]
    try:
        if training is not None:
            model.train(training)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
