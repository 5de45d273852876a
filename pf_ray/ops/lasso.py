"""LASSO channel selection and least-squares reconstruction (He et al., "Channel Pruning for Accelerating Very
Deep Neural Networks", ICCV 2017).

For a layer that consumes some channels, write its output at sampled points as the sum of each input channel's
contribution, Y = sum_i X_i W_i. Channel selection solves

    min_beta ||Y - sum_i beta_i X_i W_i||^2 / (2 n) + alpha ||beta||_1,   beta >= 0

with alpha searched until exactly the wanted number of beta_i are non-zero; reconstruction refits the layer's
weights on the kept channels by least squares. Pure torch/numpy/scikit-learn: which layers share channels is
decided by the caller (``pf_ray.ops.pruning``), which passes plain tensors and index lists.

Everything is computed from sufficient statistics: the LASSO sees a (channels x channels) Gram matrix built from
two (features x kernel)^2 ones, never the (points x outputs, channels) design matrix itself (6400 points x 320
outputs x 960 channels would be 2 billion numbers for one MobileNet-v2 layer).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

ALPHA_START = 1e-4  # PocketFlow's first L1 weight; here relative to the smallest alpha that zeroes every channel
MAX_BISECTIONS = 60
# Least-squares refit: the ridge weights tried (relative to the mean diagonal of X^T X), chosen on held-out points
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
HOLDOUT = 0.2


# --------------------------------------------------------------------------------------------------------------
# Feature sampling


@dataclass
class LayerSamples:
    """One conv/linear layer observed at sampled points: ``points`` = images x positions per image."""

    inputs: torch.Tensor | None  # (points, in_features, kernel): the im2col patch of every input channel
    outputs: torch.Tensor | None  # (points, out_features): the layer's output before its bias
    # The other operand of the residual add that the layer's output (through at most one batch norm) flows into,
    # at the same points, and the factor that maps a change after that batch norm back to the layer's output
    # (sqrt(running_var + eps) / weight; ones without batch norm). None when the output reaches no add.
    partner: torch.Tensor | None = None  # (points, out_features)
    partner_scale: torch.Tensor | None = None  # (out_features,)


class _Sampled(Exception):
    """Raised inside a forward pass once everything wanted from it is sampled."""


_ADDS = {
    torch.add,
    torch.Tensor.add,
    torch.Tensor.add_,
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.Tensor.__iadd__,
}


class _ResidualAdds(TorchFunctionMode):
    """Sees every tensor addition of a forward pass; reports the first one that takes a tracked tensor."""

    def __init__(self, sampler: _Sampler) -> None:
        super().__init__()
        self.sampler = sampler

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _ADDS and len(args) >= 2 and not kwargs:
            left, right = args[0], args[1]
            if isinstance(left, torch.Tensor) and isinstance(right, torch.Tensor) and left.shape == right.shape:
                self.sampler.on_add(left, right)  # before the add: an in-place add overwrites ``left``
                self.sampler.on_add(right, left)
        return func(*args, **kwargs)


class _Sampler:
    """Forward hooks on the observed layers (and on every batch norm, to follow their outputs to an add)."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        points_per_image: int,
        seed: int,
        keep_inputs: bool,
        keep_outputs: bool,
        partners: Collection[str] | None,
    ) -> None:
        modules = dict(model.named_modules())
        self.layers = {name: modules[name] for name in names}
        self.names = {module: name for name, module in self.layers.items()}
        self.num_batches = 0
        self.points_per_image = points_per_image
        self.seed = seed
        self.keep_inputs = keep_inputs
        self.keep_outputs = keep_outputs
        self.expected_partners = None if partners is None else set(partners)
        self.inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.partners: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.scales: dict[str, torch.Tensor] = {}
        self.batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._start_batch(0)

    def _start_batch(self, index: int) -> None:
        self.batch_index = index
        self.positions: dict[str, torch.Tensor] = {}  # name -> (images, points) flat output positions
        # (tensor, layer, scale, version): a layer's output or its batch norm's output, as long as no in-place
        # operation (a ReLU(inplace=True)) has changed it since: version is the tensor's in-place counter
        self.tracked: list[tuple[torch.Tensor, str, torch.Tensor | None, int]] = []
        self.partnered: set[str] = set()

    def run(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, LayerSamples]:
        parameter = next(model.parameters())
        handles = [layer.register_forward_hook(self._layer_hook) for layer in self.layers.values()]
        handles += [bn.register_forward_hook(self._batch_norm_hook) for bn in self.batch_norms]
        modes = {module: module.training for module in model.modules()}
        try:
            model.eval()  # running statistics: sampling must not move them
            with torch.no_grad():
                for index, batch in enumerate(batches):
                    self._start_batch(index)
                    try:
                        with _ResidualAdds(self):
                            model(batch.to(parameter.device, parameter.dtype))
                    except _Sampled:
                        pass  # the rest of the forward pass is not needed
                    self.num_batches += 1
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.training = training
            self._start_batch(0)  # drop the references to the last batch's tensors
        if self.num_batches == 0:
            raise ValueError("sample_layers: no batches to sample from")
        samples = {}
        for name in self.layers:
            partners = self.partners[name]
            complete = self.num_batches > 0 and len(partners) == self.num_batches
            samples[name] = LayerSamples(
                inputs=torch.cat(self.inputs[name]) if self.keep_inputs else None,
                outputs=torch.cat(self.outputs[name]) if self.keep_outputs else None,
                partner=torch.cat(partners) if complete else None,
                partner_scale=self.scales.get(name) if complete else None,
            )
        return samples

    def _generator(self, name: str) -> torch.Generator:
        # the same points in every model that has a layer of this name: reference and pruned model agree
        key = zlib.crc32(f"{self.seed}/{name}/{self.batch_index}".encode())
        return torch.Generator().manual_seed(key)

    def _layer_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        name = self.names[module]
        x = inputs[0]
        images = x.shape[0]
        if isinstance(module, nn.Conv2d):
            flat = output.flatten(2)  # (images, out_channels, positions)
            num_positions = flat.shape[2]
        else:  # linear: (images, ..., features); tokens are positions
            flat = output.reshape(images, -1, output.shape[-1]).transpose(1, 2)
            num_positions = flat.shape[2]
        count = min(self.points_per_image, num_positions)
        noise = torch.rand(images, num_positions, generator=self._generator(name))
        positions = noise.topk(count, dim=1).indices.to(output.device)  # (images, count), no repeats per image
        self.positions[name] = positions
        if self.keep_outputs:
            values = _gather(flat, positions)  # (images * count, out_features)
            if module.bias is not None:
                values = values - module.bias.detach().to(values.dtype)
            self.outputs[name].append(values.float().cpu())
        if self.keep_inputs:
            if isinstance(module, nn.Conv2d):
                patches = _conv_patches(module, x, positions)
            else:
                tokens = x.reshape(images, -1, x.shape[-1]).transpose(1, 2)  # (images, features, positions)
                patches = _gather(tokens, positions).unsqueeze(2)
            self.inputs[name].append(patches.float().cpu())
        self.tracked.append((output, name, None, output._version))
        self._stop_if_done()

    def _batch_norm_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        for tensor, name, scale, version in self.tracked:
            if scale is None and inputs[0] is tensor and tensor._version == version and module.running_var is not None:
                std = (module.running_var.detach() + module.eps).sqrt()
                gamma = module.weight.detach() if module.weight is not None else torch.ones_like(std)
                # a change d after the batch norm is a change d * std / gamma before it; a channel with gamma ~ 0
                # cannot be corrected through this layer (its output does not matter there)
                factor = torch.where(gamma.abs() > 1e-8, std / gamma, torch.zeros_like(std))
                self.tracked.append((output, name, factor.float().cpu(), output._version))
                return

    def on_add(self, operand: torch.Tensor, other: torch.Tensor) -> None:
        for tensor, name, scale, version in self.tracked:
            if operand is tensor and tensor._version == version and name not in self.partnered:
                self.partnered.add(name)
                module = self.layers[name]
                if isinstance(module, nn.Conv2d):
                    flat = other.flatten(2)
                else:
                    flat = other.reshape(other.shape[0], -1, other.shape[-1]).transpose(1, 2)
                self.partners[name].append(_gather(flat, self.positions[name]).float().cpu())
                self.scales[name] = scale if scale is not None else torch.ones(flat.shape[1])
                self._stop_if_done()
                return

    def _stop_if_done(self) -> None:
        if (
            self.expected_partners is not None
            and len(self.positions) == len(self.layers)
            and self.expected_partners <= self.partnered
        ):
            raise _Sampled


def _gather(flat: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(images, channels, positions) at (images, count) positions -> (images * count, channels)."""
    index = positions.unsqueeze(1).expand(-1, flat.shape[1], -1)
    return flat.gather(2, index).transpose(1, 2).reshape(-1, flat.shape[1])


def _conv_patches(conv: nn.Conv2d, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(images * count, in_channels, kh * kw): the im2col patch behind each sampled output position.

    The same values as ``F.unfold(x, ...)[:, :, positions]``, gathered directly: unfolding all 784 positions of
    a 28x28 map to keep ten took a quarter of a LASSO pruning's time (tested against ``F.unfold`` in
    tests/test_lasso.py).
    """
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)  # what Conv2d pads, int or "same"
    images, channels, _, width = x.shape
    output_width = (width - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1
    top = (positions // output_width) * conv.stride[0]  # (images, count) window corners in the padded input
    left = (positions % output_width) * conv.stride[1]
    rows = top.unsqueeze(2) + torch.arange(conv.kernel_size[0], device=x.device) * conv.dilation[0]
    columns = left.unsqueeze(2) + torch.arange(conv.kernel_size[1], device=x.device) * conv.dilation[1]
    index = (rows.unsqueeze(3) * width + columns.unsqueeze(2)).flatten(1)  # (images, count * kh * kw)
    patches = x.flatten(2).gather(2, index.unsqueeze(1).expand(-1, channels, -1))  # (images, in, count * k)
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    return patches.reshape(images, channels, -1, kernel).transpose(1, 2).reshape(-1, channels, kernel)


def sample_layers(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[torch.Tensor],
    *,
    points_per_image: int = 10,
    seed: int = 0,
    keep_inputs: bool = True,
    keep_outputs: bool = True,
    partners: Collection[str] | None = None,
) -> dict[str, LayerSamples]:
    """Run ``batches`` through ``model`` (eval mode, no gradients; modes restored) and sample the conv/linear
    layers ``names`` at ``points_per_image`` random output positions per image (all of them if fewer).

    The positions depend only on (seed, layer name, batch index), so a pruned copy of a model is sampled at the
    same points as the original. A layer whose output, directly or through one batch norm, is added to another
    tensor (a residual block's last conv and its projection shortcut) also gets that other operand sampled.

    Args:
        names: conv layers must be dense (groups=1) ``nn.Conv2d``; linear layers are ``nn.Linear``.
        keep_inputs / keep_outputs: which of ``LayerSamples.inputs`` / ``outputs`` to keep (memory).
        partners: the layers known (from an earlier pass over the same architecture) to feed a residual add.
            When given, each forward pass stops as soon as every layer and these partners are sampled.
    """
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            raise ValueError(f"sample_layers: {name!r} is {type(module).__name__}; expected a dense Conv2d or Linear")
    sampler = _Sampler(
        model,
        names,
        points_per_image=points_per_image,
        seed=seed,
        keep_inputs=keep_inputs,
        keep_outputs=keep_outputs,
        partners=partners,
    )
    return sampler.run(model, batches)


def residual_target(reference: LayerSamples, current: LayerSamples, channels: torch.Tensor) -> torch.Tensor:
    """The output the pruned layer should produce: the reference model's output (its ``channels``), corrected,
    for a layer that feeds a residual add, by the drift of the add's other operand (He et al., Sec. 3.3):
    bn(y) + s_current = bn(y_ref) + s_ref  =>  y = y_ref + (s_ref - s_current) * std / gamma.

    Args:
        channels: (out_features of the current layer,) the reference output channel each one is.
    """
    if reference.outputs is None:
        raise ValueError("residual_target: the reference samples have no outputs")
    target = reference.outputs[:, channels]
    if reference.partner is None or current.partner is None or current.partner_scale is None:
        return target
    drift = reference.partner[:, channels] - current.partner
    return target + drift * current.partner_scale


# --------------------------------------------------------------------------------------------------------------
# Selection


@dataclass
class ChannelProblem:
    """||target - sum_c beta_c Z_c||^2 = energy - 2 beta.correlation + beta.gram.beta, with Z_c channel c's
    contribution X_c W_c to the target. Problems of several consumers of the same channels add up."""

    gram: np.ndarray  # (channels, channels) Z_a . Z_b
    correlation: np.ndarray  # (channels,) Z_c . target
    energy: float  # target . target

    def __add__(self, other: ChannelProblem) -> ChannelProblem:
        return ChannelProblem(self.gram + other.gram, self.correlation + other.correlation, self.energy + other.energy)


def channel_problem(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    features: Sequence[int],
    channels: Sequence[int],
    num_channels: int,
    *,
    normalise: bool = True,
) -> ChannelProblem:
    """The regression problem of one consumer layer.

    Args:
        inputs: (points, in_features, kernel) sampled patches of the consumer's input.
        weight: (out_features, in_features, *kernel) or (out_features, in_features) for a linear layer.
        target: (points, out_features) what the consumer's output (before bias) should be.
        features: the consumer's input features that belong to the channels being selected ...
        channels: ... and the channel (0..num_channels-1) each of them belongs to (a linear layer after a
            flatten holds several features per channel). The other input features are kept: their contribution
            is subtracted from the target.
        normalise: divide by the target's energy, so that consumers of different scales weigh the same.
    """
    # the (points x features) products run in float32 (their sums are accurate to ~1e-6); the rest in float64
    x = inputs.float()
    w = weight.detach().float().cpu().reshape(weight.shape[0], weight.shape[1], -1)  # (out, in, kernel)
    y = target.float()
    grouped = torch.tensor(list(features), dtype=torch.long)
    others = torch.ones(x.shape[1], dtype=torch.bool)
    others[grouped] = False
    if others.any():
        y = y - x[:, others].flatten(1) @ w[:, others].flatten(1).T
    xg = x[:, grouped].flatten(1)  # (points, features * kernel)
    wg = w[:, grouped].flatten(1)  # (out, features * kernel)
    kernel = x.shape[2]
    # Z_a . Z_b = sum_{k,k'} (X^T X)[(a,k),(b,k')] (W^T W)[(a,k),(b,k')]: two small Gram matrices
    products = (xg.T @ xg).double() * (wg.T @ wg).double()
    per_feature = products.reshape(len(grouped), kernel, len(grouped), kernel).sum((1, 3))
    correlation_per_feature = (wg.double() * (y.T @ xg).double()).reshape(wg.shape[0], len(grouped), kernel)
    correlation_per_feature = correlation_per_feature.sum((0, 2))
    assign = torch.zeros(len(grouped), num_channels, dtype=torch.float64)
    assign[torch.arange(len(grouped)), torch.tensor(list(channels), dtype=torch.long)] = 1.0
    gram = assign.T @ per_feature @ assign
    correlation = assign.T @ correlation_per_feature
    energy = float(y.double().square().sum())
    if normalise and energy > 0:
        gram, correlation, energy = gram / energy, correlation / energy, 1.0
    return ChannelProblem(gram.numpy(), correlation.numpy(), energy)


@dataclass(frozen=True)
class LassoSelection:
    keep: tuple[int, ...]  # the kept channels, ascending
    alpha: float  # the L1 weight reached (relative: 1 zeroes every channel)
    coefficients: np.ndarray  # (channels,) beta at ``alpha``
    exact: bool  # the LASSO itself had exactly len(keep) non-zero coefficients (no tie-breaking needed)
    order: tuple[int, ...]  # every channel, most important first: keep == sorted(order[:len(keep)])


def select_channels(
    problem: ChannelProblem, num_kept: int, *, alpha_start: float = ALPHA_START, max_bisections: int = MAX_BISECTIONS
) -> LassoSelection:
    """Keep ``num_kept`` channels: search the L1 weight alpha of a non-negative LASSO until exactly that many
    coefficients are non-zero (He et al.; PocketFlow's schedule: start at ``alpha_start``, double until fewer
    than ``num_kept`` remain, then bisect). If the count jumps over ``num_kept`` (coefficients vanishing
    together), the largest coefficients of the last alpha that kept too many win; channels with equal
    coefficients are ranked by their correlation with the target, then by index.
    """
    num_channels = len(problem.correlation)
    if not 1 <= num_kept <= num_channels:
        raise ValueError(f"num_kept: got {num_kept}; expected 1..{num_channels}")
    # scikit-learn costs 1.7 s to import on this machine: only processes that run a LASSO selection pay it
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    design, response, scale = _least_squares_form(problem)
    solver = Lasso(
        alpha=alpha_start,
        fit_intercept=False,
        positive=True,
        warm_start=True,
        max_iter=20000,
        tol=1e-8,
        selection="cyclic",
    )

    def solve(alpha: float) -> np.ndarray:
        solver.set_params(alpha=alpha)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            solver.fit(design, response)
        return np.asarray(solver.coef_, dtype=np.float64).copy()

    if scale == 0.0:  # no channel explains any of the target: every coefficient is zero at any alpha
        coefficients = np.zeros(num_channels)
        return _selection(problem, coefficients, num_kept, 1.0, exact=False)
    low, low_coefficients = 0.0, None  # low: too many channels survive; high: too few
    alpha = alpha_start
    coefficients = solve(alpha)
    while np.count_nonzero(coefficients) >= num_kept:
        if np.count_nonzero(coefficients) == num_kept:
            return _selection(problem, coefficients, num_kept, alpha, exact=True)
        low, low_coefficients = alpha, coefficients
        alpha *= 2
        coefficients = solve(alpha)
    high, high_coefficients = alpha, coefficients
    if low_coefficients is None:  # fewer than num_kept channels carry signal even at the smallest alpha
        return _selection(problem, high_coefficients, num_kept, high, exact=False)
    for _ in range(max_bisections):
        middle = (low + high) / 2
        coefficients = solve(middle)
        count = np.count_nonzero(coefficients)
        if count == num_kept:
            return _selection(problem, coefficients, num_kept, middle, exact=True)
        if count > num_kept:
            low, low_coefficients = middle, coefficients
        else:
            high = middle
    return _selection(problem, low_coefficients, num_kept, low, exact=False)


def _least_squares_form(problem: ChannelProblem) -> tuple[np.ndarray, np.ndarray, float]:
    """(R, t, scale) with R^T R = gram * scale and R^T t = correlation * scale: a square problem that scikit-learn
    solves as fast as the Gram form. ``scale`` makes alpha = 1 the smallest L1 weight that zeroes every channel
    (for 1/(2n) ||t - R b||^2 + alpha ||b||_1 with n = channels rows that is max(correlation * scale) / n)."""
    num_channels = len(problem.correlation)
    peak = float(np.max(problem.correlation))
    if peak <= 0.0:
        return np.zeros((num_channels, num_channels)), np.zeros(num_channels), 0.0
    scale = num_channels / peak
    values, vectors = np.linalg.eigh((problem.gram + problem.gram.T) / 2 * scale)
    usable = values > max(values.max(), 0.0) * 1e-12
    roots = np.sqrt(values[usable])
    design = np.zeros((num_channels, num_channels))
    response = np.zeros(num_channels)
    design[usable] = roots[:, None] * vectors[:, usable].T
    response[usable] = (vectors[:, usable].T @ (problem.correlation * scale)) / roots
    return design, response, scale


def _selection(
    problem: ChannelProblem, coefficients: np.ndarray, num_kept: int, alpha: float, *, exact: bool
) -> LassoSelection:
    # sort by coefficient, then correlation with the target, then lower index first
    order = sorted(range(len(coefficients)), key=lambda c: (-coefficients[c], -problem.correlation[c], c))
    keep = tuple(sorted(order[:num_kept]))
    return LassoSelection(keep, float(alpha), coefficients, exact, tuple(order))


def selection_scores(selection: LassoSelection) -> torch.Tensor:
    """(channels,) scores, higher = keep, whose top ``len(selection.keep)`` are exactly the selection."""
    scores = torch.zeros(len(selection.order), dtype=torch.float64)
    scores[torch.tensor(selection.order)] = torch.arange(len(selection.order), 0, -1, dtype=torch.float64)
    return scores


# --------------------------------------------------------------------------------------------------------------
# Reconstruction


def least_squares_weights(
    inputs: torch.Tensor,
    target: torch.Tensor,
    kept_features: Sequence[int],
    initial: torch.Tensor,
    *,
    bias: bool,
    ridges: Sequence[float] = RIDGES,
    holdout: float = HOLDOUT,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refit a layer on its kept input features by regularised least squares, in closed form:

        argmin_W,b ||target - X_kept W^T - b||^2 + lambda ||W - W_initial||^2 + lambda ||b||^2

    Shrinking toward the layer's own (pruned) weights, not toward zero, makes a large lambda mean "do not
    reconstruct". lambda (relative to the mean diagonal of X^T X) is the one of ``ridges`` and infinity with the
    smallest error on the last ``holdout`` fraction of the points (later batches), fitted on the rest; the
    chosen one is then refitted on all points. So the refit is never worse than no refit on held-out points
    (bar noise), which matters when few points are sampled per weight (small images, few batches).

    Args:
        inputs: (points, in_features, kernel) sampled input patches of the layer before pruning.
        target: (points, out_features) the output to reproduce, before bias.
        kept_features: the input features that remain, ascending (their order in the pruned layer).
        initial: (out_features, in_features, kernel) or (out_features, in_features, kh, kw) the current weights.
        bias: also fit an additive bias (returned as the change to add to the layer's bias).

    Returns:
        (weight (out_features, len(kept_features), kernel), bias change (out_features,) or None), float64.
    """
    kept = torch.tensor(list(kept_features), dtype=torch.long)
    out_features, kernel = target.shape[1], inputs.shape[2]
    x = inputs[:, kept].double().flatten(1)  # (points, kept * kernel)
    start = initial.detach().double().cpu().reshape(out_features, inputs.shape[1], kernel)[:, kept].flatten(1).T
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        start = torch.cat([start, torch.zeros(1, out_features, dtype=start.dtype)])
    y = target.double()
    split = x.shape[0] - int(round(x.shape[0] * holdout))

    def solve(rows: slice, lambdas: Sequence[float]) -> list[torch.Tensor]:
        # (X^T X + lambda I)^-1 (X^T Y + lambda W0) for every lambda, from one eigendecomposition
        gram = x[rows].T @ x[rows]
        values, vectors = torch.linalg.eigh(gram)
        scale = max(gram.diagonal().mean().item(), 1e-12)
        right = x[rows].T @ y[rows]
        solutions = []
        for ridge in lambdas:
            projected = vectors.T @ (right + ridge * scale * start)
            solutions.append(vectors @ (projected / (values.clamp_min(0) + ridge * scale).unsqueeze(1)))
        return solutions

    best: float | None = ridges[0]  # None: lambda = infinity, no refit
    if 0 < split < x.shape[0]:
        candidates = [*ridges, None]
        fitted = [*solve(slice(0, split), ridges), start]
        errors = [float((y[split:] - x[split:] @ w).square().sum()) for w in fitted]
        best = candidates[min(range(len(errors)), key=errors.__getitem__)]
    solution = start if best is None else solve(slice(None), [best])[0]
    columns = len(kept) * kernel
    weight = solution[:columns].T.reshape(out_features, len(kept), kernel)
    return weight, (solution[columns] if bias else None)
