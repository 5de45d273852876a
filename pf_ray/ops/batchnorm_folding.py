"""Batch norm folded into the convolution before it, and the layers whose output leaves the quantized graph: both
found on the model's ``torch.fx`` graph (Jacob et al., CVPR 2018, section 3.2)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from pf_ray.errors import ModelError


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, batch norm name) for every BatchNorm2d whose input is exactly one Conv2d's output, in the order
    they run.

    Found on the ``torch.fx`` graph: the BN's input must be the conv's call, that output must go nowhere else, and
    each module must be called once (a module called twice would need two foldings). Module order alone would not
    do: ResNet-20 registers a block's ``conv2, bn2`` next to each other but its shortcut conv after them. A model
    that fx cannot trace (data-dependent control flow) falls back to what needs no tracing: a Conv2d immediately
    followed by a BatchNorm2d inside one ``nn.Sequential``, which runs its children in that order.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # fx raises TraceError, TypeError, NotImplementedError, ... on code it cannot follow
        return _sequential_conv_bn_pairs(model)
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable(modules[node.target]) or len(node.args) != 1:
            continue
        source = node.args[0]
        if (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and type(modules[source.target]) is nn.Conv2d and len(source.users) == 1
                and calls[source.target] == 1 and calls[node.target] == 1):
            pairs.append((source.target, node.target))
    return pairs


def _foldable(module: nn.Module) -> bool:
    """A plain BatchNorm2d with running statistics (one without normalises by each batch's, which no fixed
    convolution can reproduce)."""
    return type(module) is nn.BatchNorm2d and module.running_mean is not None and module.running_var is not None


def _sequential_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            for (conv_name, conv), (bn_name, bn) in pairwise(module.named_children()):
                if type(conv) is nn.Conv2d and _foldable(bn):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


@torch.no_grad()
def fold_batchnorm_(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s inference transform into ``conv``, in place: with s = gamma / sqrt(running_var + eps) per
    output channel, w' = s * w and b' = beta + s * (b - running_mean) (b = 0 for a conv without bias), so
    ``conv'(x) = bn(conv(x))`` in eval mode. The conv gets new Parameters (a bias if it had none); ``bn`` is left
    as it was, for the caller to replace by ``nn.Identity``."""
    if bn.running_mean is None or bn.running_var is None:
        raise ModelError(f"cannot fold a BatchNorm2d without running statistics ({bn}) into its convolution")
    if bn.num_features != conv.out_channels:
        raise ModelError(f"cannot fold a BatchNorm2d of {bn.num_features} channels into a convolution of "
                         f"{conv.out_channels} output channels")
    std = torch.sqrt(bn.running_var.float() + bn.eps)
    gamma = torch.ones_like(std) if bn.weight is None else bn.weight.float()
    beta = torch.zeros_like(std) if bn.bias is None else bn.bias.float()
    factor = gamma / std  # (out_channels,)
    bias = torch.zeros_like(std) if conv.bias is None else conv.bias.float()
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((conv.weight.float() * factor.reshape(-1, 1, 1, 1)).to(dtype))
    conv.bias = nn.Parameter((beta + factor * (bias - bn.running_mean.float())).to(dtype))


def fold_batchnorms_(model: nn.Module, convs: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Fold every BN that directly follows a conv (``conv_bn_pairs``; only convs named in ``convs`` if given)
    into that conv and replace the BN by ``nn.Identity``, in place. Returns the (conv, bn) pairs folded."""
    wanted = None if convs is None else set(convs)
    pairs = [(c, b) for c, b in conv_bn_pairs(model) if wanted is None or c in wanted]
    for conv_name, bn_name in pairs:
        fold_batchnorm_(model.get_submodule(conv_name), model.get_submodule(bn_name))
        model.set_submodule(bn_name, nn.Identity())
    return pairs


# Modules and functions a tensor passes through unchanged in the sense that matters to ONNX Runtime's QDQ fusion:
# a folded BN (now Identity) and activations it fuses away (Relu before a QuantizeLinear of zero point 0).
_PASS_THROUGH_MODULES = (nn.Identity, nn.ReLU, nn.ReLU6)
_PASS_THROUGH_FUNCTIONS = (F.relu, F.relu6, torch.relu, torch.relu_)
_PASS_THROUGH_METHODS = ("relu", "relu_")


def layers_feeding_float(model: nn.Module, layers: Sequence[str]) -> set[str]:
    """The names in ``layers`` whose output reaches something other than another of ``layers``, after passing
    through identities and ReLUs (fx graph of ``model``; every conv/linear still a plain module).

    In ResNet-20 these are each block's second conv and the shortcut convs (their output meets the residual add),
    not the first conv (its output, through a ReLU, is the second conv's input). An INT8 layer of this kind
    needs its own output quantizer before ONNX Runtime can fuse it into an integer kernel. A model fx cannot
    trace gives the empty set (no output quantizers: a slower INT8 file, the same model).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # see conv_bn_pairs
        return set()
    modules = dict(model.named_modules())
    wanted = set(layers)

    def passes_through(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            return type(modules[node.target]) in _PASS_THROUGH_MODULES
        if node.op == "call_function":
            return node.target in _PASS_THROUGH_FUNCTIONS
        return node.op == "call_method" and node.target in _PASS_THROUGH_METHODS

    def reaches_float(node: torch.fx.Node) -> bool:
        for user in node.users:
            if user.op == "call_module" and user.target in wanted:
                continue
            if not passes_through(user) or reaches_float(user):
                return True
        return False

    return {node.target for node in graph.nodes
            if node.op == "call_module" and node.target in wanted and reaches_float(node)}
