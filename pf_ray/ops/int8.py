"""Symmetric int8 weights and the pt2e QAT graph that trains like an eager module: the pieces of the native INT8
path (PyTorch 2 export quantization for ExecuTorch's XNNPACK backend; Jacob et al., CVPR 2018)."""

from __future__ import annotations

import torch
from torch import nn

from pf_ray.errors import ModelError

WEIGHT_BITS = 8
WEIGHT_QMAX = 127  # XNNPACK's symmetric weight range is [-127, 127]: -128 is left out so that -w is representable
ZERO_POINT = 128  # codes are stored unsigned: code = q + 128 in [1, 255]
INT8_LAYERS = (nn.Conv2d, nn.Linear)
OBSERVE_BATCH_SIZE = 64  # images per forward pass while QatGraph.observe warms its ranges up
_DYNAMIC_BATCH = ({0: torch.export.Dim("batch")},)  # pt2e graphs would otherwise keep the example's batch size


def symmetric_int8(weight: torch.Tensor, *, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of ``weight``: (q, scale) with ``weight ~ q * scale``.

    q: int64, shaped like ``weight``, in [-127, 127]; scale: (out_channels,) float32, max|w| / 127 of each output
    channel (axis 0), or (1,) for the whole tensor. A channel of zeros gets scale 1 (its codes are 0 whatever the
    scale). Rounding is half to even, so every weight is within scale / 2 of its level."""
    values = weight.detach().float()
    rows = values.reshape(values.shape[0], -1) if per_channel else values.reshape(1, -1)
    scale = rows.abs().amax(dim=1) / WEIGHT_QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(rows / scale[:, None]).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
    return codes.to(torch.int64).reshape(values.shape), scale


def int8_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers whose weights are stored as int8, each once, in ``named_modules`` order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, INT8_LAYERS)]


@torch.no_grad()
def snap_to_int8_(model: nn.Module, *, per_channel: bool = True) -> nn.Module:
    """Replace every conv/linear weight by its nearest point of the symmetric int8 grid (in place)."""
    for _, layer in int8_layers(model):
        codes, scale = symmetric_int8(layer.weight, per_channel=per_channel)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.copy_(codes.to(torch.float32) * scale.reshape(shape))
    return model


class QatGraph(nn.Module):
    """A pt2e QAT graph (``prepare_qat_pt2e``'s output) that trains and evaluates like an eager module.

    A pt2e graph refuses ``train()`` / ``eval()``: batch norm and dropout are baked into it as traced. Here
    ``train(mode)`` rewrites them with torchao's ``move_exported_model_to_train`` / ``_to_eval`` (about 0.6 s on
    one core, so only when the form changes), and turns the range observers on for training and off for
    evaluation: evaluating (the validation accuracy after every epoch) never moves a quantization range, and an
    evaluated model is exactly the fake-quantized model that ``convert_pt2e`` turns into integers.

    The state dict is the graph's, keyed ``graph.<name>``: the model's own parameter and buffer names, plus the
    fake quantizers' (``graph.activation_post_process_<i>.*``). Training mode is tracked here, not on the graph:
    torchao records it in a graph attribute that ``copy.deepcopy`` drops."""

    def __init__(self, graph: torch.fx.GraphModule) -> None:
        super().__init__()
        self.graph = graph
        self._graph_training = True  # the form batch norm / dropout have in the graph: exported in training

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training != self._graph_training:  # the flag was set directly (pf_ray.metrics.layer_table does)
            self.train(self.training)
        return self.graph(inputs)

    def train(self, mode: bool = True) -> QatGraph:
        from torchao.quantization.pt2e import (
            disable_observer,
            enable_observer,
            move_exported_model_to_eval,
            move_exported_model_to_train,
        )

        if mode != self._graph_training:
            (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
            self._graph_training = mode
        self.graph.apply(enable_observer if mode else disable_observer)
        self.training = mode  # not the children's: the graph's own train()/eval() raise by design
        return self

    @torch.no_grad()
    def observe(self, images: torch.Tensor) -> None:
        """Warm the ranges up: run ``images`` (in batches of 64) with batch norm on its running statistics (so they
        do not move) and the observers on; the module is left in training mode."""
        from torchao.quantization.pt2e import enable_observer

        self.train(False)
        self.graph.apply(enable_observer)
        device = next(self.parameters()).device
        for chunk in images.split(OBSERVE_BATCH_SIZE):
            self.graph(chunk.to(device))
        self.train(True)


def capture_dynamic_batch(model: nn.Module, example: torch.Tensor,
                          device: torch.device | str | None = None) -> torch.fx.GraphModule:
    """``model`` captured by ``torch.export`` (in its current mode) with a dynamic batch dimension, as a module.

    ``device``: where the captured graph should run, when not where it was captured (capture on the CPU, train on
    a GPU): moved with ``torch.export``'s device pass, which also rewrites the device arguments and tensor
    constants baked into the graph (``.to()`` moves only parameters and buffers)."""
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=_DYNAMIC_BATCH)
    except Exception as error:  # torch.export raises many types; all mean "cannot capture this model"
        raise ModelError(f"native_int8: torch.export cannot capture {type(model).__name__} with a dynamic batch "
                         f"dimension: {_first_line(error)}") from error
    if device is not None and torch.device(device) != example.device:
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, torch.device(device))
    return program.module()


def move_graph_(graph: torch.fx.GraphModule, device: torch.device | str) -> torch.fx.GraphModule:
    """Move a captured (and pt2e-prepared) graph module to ``device`` in place: its parameters and buffers, the
    plain tensor constants it reads with ``get_attr``, and every ``device=`` argument of its nodes (what
    ``move_to_device_pass`` does for an ``ExportedProgram``, for the module a pt2e prepare returns)."""
    device = torch.device(device)
    graph.to(device)
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            owner, _, name = node.target.rpartition(".")
            holder = graph.get_submodule(owner) if owner else graph
            value = getattr(holder, name, None)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.device != device:
                setattr(holder, name, value.to(device))
        if isinstance(node.kwargs.get("device"), (torch.device, str)):
            node.update_kwarg("device", device)
    graph.recompile()
    return graph


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
