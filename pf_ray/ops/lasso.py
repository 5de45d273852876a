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
outputs x 960 channels would be 2 billion numbers for one MobileNet-v2 layer). The samples come from
``pf_ray.ops.feature_sampling``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

ALPHA_START = 1e-4  # PocketFlow's first L1 weight; here relative to the smallest alpha that zeroes every channel
MAX_BISECTIONS = 60
# Least-squares refit: the ridge weights tried (relative to the mean diagonal of X^T X), chosen on held-out points
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
HOLDOUT = 0.2


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
    energy = float(y.double().square().sum())
    return _problem_from_gram(xg.T @ xg, y.T @ xg, energy, w[:, grouped].flatten(1), channels, num_channels,
                              normalise=normalise)


def channel_problem_from_statistics(
    statistics: RefitStatistics,
    weight: torch.Tensor,
    features: Sequence[int],
    channels: Sequence[int],
    num_channels: int,
    *,
    outputs: Sequence[int] | None = None,
    normalise: bool = True,
) -> ChannelProblem:
    """``channel_problem`` from a layer's sufficient statistics (``refit_statistics``) instead of its samples:
    the same problem, without a pass over the points. The target is the statistics' target.

    Args:
        weight: (out_features, in_features, *kernel) in the statistics' feature numbering; a feature already
            removed has zero weight.
        outputs: the statistics' target columns that ``weight``'s rows are (all of them when None).
    """
    w = weight.detach().double().cpu().reshape(weight.shape[0], weight.shape[1], -1)
    kernel = w.shape[2]
    columns = statistics.num_features  # in_features * kernel: the bias column of ones (last) is not used
    if w.shape[1] * kernel != columns:
        raise ValueError(f"channel_problem_from_statistics: weight has {w.shape[1]} x {kernel} input features; "
                         f"the statistics have {columns}")
    rows = torch.arange(w.shape[0]) if outputs is None else torch.tensor(list(outputs), dtype=torch.long)
    grouped = torch.tensor(list(features), dtype=torch.long)
    mask = torch.zeros(w.shape[1], dtype=torch.bool)
    mask[grouped] = True
    group_columns = (grouped.unsqueeze(1) * kernel + torch.arange(kernel)).flatten()
    other_columns = torch.arange(columns).reshape(-1, kernel)[~mask].flatten()
    gram = statistics.gram.double()
    cross = statistics.right[:, rows].double().T  # (out, columns + 1): Y^T X
    energy = float(statistics.energy[rows].double().sum())
    wo = w[:, ~mask].flatten(1)  # (out, other columns): subtract the other features' contribution from Y
    correlation = cross[:, group_columns]
    if wo.numel():
        g_oo = gram[other_columns][:, other_columns]
        energy += float(-2 * (wo * cross[:, other_columns]).sum() + (wo @ g_oo * wo).sum())
        correlation = correlation - wo @ gram[other_columns][:, group_columns]
    return _problem_from_gram(gram[group_columns][:, group_columns], correlation, energy, w[:, grouped].flatten(1),
                              channels, num_channels, normalise=normalise)


def _problem_from_gram(
    feature_gram: torch.Tensor,
    cross: torch.Tensor,
    energy: float,
    wg: torch.Tensor,
    channels: Sequence[int],
    num_channels: int,
    *,
    normalise: bool,
) -> ChannelProblem:
    """The ChannelProblem from X^T X (features * kernel)^2, Y^T X (out, features * kernel), ||Y||^2 and the
    grouped weights ``wg`` (out, features * kernel)."""
    num_features = len(channels)
    kernel = wg.shape[1] // num_features
    # Z_a . Z_b = sum_{k,k'} (X^T X)[(a,k),(b,k')] (W^T W)[(a,k),(b,k')]: two small Gram matrices
    products = feature_gram.double() * (wg.T @ wg).double()
    per_feature = products.reshape(num_features, kernel, num_features, kernel).sum((1, 3))
    correlation_per_feature = (wg.double() * cross.double()).reshape(wg.shape[0], num_features, kernel)
    correlation_per_feature = correlation_per_feature.sum((0, 2))
    assign = torch.zeros(num_features, num_channels, dtype=torch.float64)
    assign[torch.arange(num_features), torch.tensor(list(channels), dtype=torch.long)] = 1.0
    gram = assign.T @ per_feature @ assign
    correlation = assign.T @ correlation_per_feature
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
    problem: ChannelProblem,
    num_kept: int,
    *,
    alpha_start: float = ALPHA_START,
    max_bisections: int = MAX_BISECTIONS,
    use_path: bool = True,
) -> LassoSelection:
    """Keep ``num_kept`` channels: search the L1 weight alpha of a non-negative LASSO until exactly that many
    coefficients are non-zero (He et al.; PocketFlow's schedule: start at ``alpha_start``, double until fewer
    than ``num_kept`` remain, then bisect). If the count jumps over ``num_kept`` (coefficients vanishing
    together), the largest coefficients of the last alpha that kept too many win; channels with equal
    coefficients are ranked by their correlation with the target, then by index. With ``use_path`` the answer is
    read off the LARS path first where it is unique there (``_from_lars_path``): the same channels, found faster.
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
    on_path = _from_lars_path(problem, num_kept, scale) if use_path else None
    if on_path is not None:
        return on_path
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


def _from_lars_path(problem: ChannelProblem, num_kept: int, scale: float) -> LassoSelection | None:
    """The selection read off the whole non-negative LASSO path (LARS, from the Gram form: one pass, ~15x faster
    than the alpha search's coordinate-descent solves), where that answer is unique: along the path the count of
    non-zero coefficients only grows until it reaches ``num_kept``, and stays there for one stretch of alphas, so
    every alpha with exactly ``num_kept`` non-zeros has the same channels, those the alpha search finds. The
    coefficients are taken mid-stretch. None (the alpha search decides) when the path drops a channel first, jumps
    over the count, or LARS fails."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import lars_path_gram

    num_channels = len(problem.correlation)
    if not (np.isfinite(problem.gram).all() and np.isfinite(problem.correlation).all()):
        return None  # sklearn's LARS retries a non-finite Gram until 2**i overflows (a diverged model's features)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            alphas, _, path = lars_path_gram(Xy=problem.correlation, Gram=(problem.gram + problem.gram.T) / 2,
                                             n_samples=num_channels, method="lasso", positive=True,
                                             max_iter=4 * num_channels)
    except (ValueError, OverflowError, np.linalg.LinAlgError, FloatingPointError):
        return None
    counts = np.count_nonzero(path, axis=0)  # (path points,) from the largest alpha down
    hits = np.nonzero(counts == num_kept)[0]
    if not len(hits):
        return None
    first, last = hits[0], hits[-1]
    if np.any(np.diff(counts[: first + 1]) < 0) or last - first + 1 != len(hits) or last + 1 >= len(alphas):
        return None  # a drop before the count, the count reached twice, or no end to the stretch on the path
    if np.count_nonzero(counts[last + 1 :] < num_kept):
        return None  # it comes back below later: another stretch's channels would qualify too
    supports = {tuple(np.nonzero(path[:, i])[0]) for i in hits}
    if len(supports) != 1:
        return None
    # the stretch runs from alphas[first] down to alphas[last + 1] (where the next channel enters): its middle
    middle = (alphas[first] + alphas[last + 1]) / 2
    upper = next(i for i in range(first, last + 2) if alphas[i] <= middle) - 1
    weight = (alphas[upper] - middle) / max(alphas[upper] - alphas[upper + 1], 1e-300)
    coefficients = (1 - weight) * path[:, upper] + weight * path[:, upper + 1]
    support = set(supports.pop())
    coefficients[[c for c in range(num_channels) if c not in support]] = 0.0
    return _selection(problem, np.maximum(coefficients, 0.0), num_kept, float(middle * scale), exact=True)


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



@dataclass
class RefitStatistics:
    """What a layer's least-squares refit needs from its sampled points, without the points: X = the input
    patches flattened to (points, in_features * kernel) plus a last column of ones (the bias), Y = the target.
    The last ``HOLDOUT`` fraction of the points (later batches) is also kept as it is, to choose the ridge on."""

    gram: torch.Tensor  # (columns + 1, columns + 1) X^T X over every point
    right: torch.Tensor  # (columns + 1, out_features) X^T Y
    energy: torch.Tensor  # (out_features,) Y . Y per output
    holdout_inputs: torch.Tensor  # (holdout points, columns) the held-out rows of X, without the ones
    holdout_target: torch.Tensor  # (holdout points, out_features)
    kernel: int  # kernel positions per input feature: columns = in_features * kernel

    @property
    def num_features(self) -> int:
        return self.gram.shape[0] - 1


def refit_statistics(
    inputs: torch.Tensor,
    target: torch.Tensor,
    *,
    holdout: float = HOLDOUT,
    dtype: torch.dtype = torch.float64,
    chunk: int = 4096,
) -> RefitStatistics:
    """The ``RefitStatistics`` of (points, in_features, kernel) ``inputs`` and (points, out_features) ``target``.
    ``dtype``: the products' precision (float32 sums chunks of ``chunk`` points in float64: ~1e-7 relative)."""
    points, kernel = inputs.shape[0], inputs.shape[2]
    statistics = empty_statistics(inputs.shape[1] * kernel, target.shape[1], kernel)
    split = points - int(round(points * holdout))
    for start in range(0, points, chunk):
        add_points_(statistics, inputs[start : start + chunk], target[start : start + chunk], dtype=dtype)
    statistics.holdout_inputs = inputs[split:].flatten(1).float().clone()
    statistics.holdout_target = target[split:].float().clone()
    return statistics


def empty_statistics(columns: int, out_features: int, kernel: int) -> RefitStatistics:
    """Statistics of no points, to accumulate into with ``add_points_``."""
    return RefitStatistics(
        torch.zeros(columns + 1, columns + 1, dtype=torch.float64),
        torch.zeros(columns + 1, out_features, dtype=torch.float64),
        torch.zeros(out_features, dtype=torch.float64),
        torch.zeros(0, columns),
        torch.zeros(0, out_features),
        kernel,
    )


def add_points_(statistics: RefitStatistics, inputs: torch.Tensor, target: torch.Tensor, *,
                dtype: torch.dtype = torch.float64) -> None:
    """Add (points, in_features, kernel) ``inputs`` and their ``target`` to the sums (not to the held-out rows)."""
    x = torch.cat([inputs.flatten(1).to(dtype), torch.ones(inputs.shape[0], 1, dtype=dtype)], dim=1)
    y = target.to(dtype)
    statistics.gram += (x.T @ x).double()
    statistics.right += (x.T @ y).double()
    statistics.energy += y.double().square().sum(0)


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
    start = initial.detach().cpu().reshape(target.shape[1], inputs.shape[1], -1)[:, kept]
    statistics = refit_statistics(inputs[:, kept], target, holdout=holdout)
    return least_squares_from_statistics(statistics, range(len(kept)), start, bias=bias, ridges=ridges)


def least_squares_from_statistics(
    statistics: RefitStatistics,
    kept_features: Sequence[int],
    initial: torch.Tensor,
    *,
    bias: bool,
    outputs: Sequence[int] | None = None,
    ridges: Sequence[float] = RIDGES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``least_squares_weights`` from the layer's ``refit_statistics``: each lambda is one Cholesky solve of the
    kept features' block of X^T X (minus the held-out rows' share), not a pass over the points.

    Args:
        kept_features: the statistics' input features that remain, ascending.
        initial: (out_features, len(kept_features), kernel) the current weights of the kept features.
        outputs: the statistics' target columns that ``initial``'s rows are (all of them when None).
    """
    kernel = statistics.kernel
    kept = torch.tensor(list(kept_features), dtype=torch.long)
    columns = (kept.unsqueeze(1) * kernel + torch.arange(kernel)).flatten()
    rows = slice(None) if outputs is None else torch.tensor(list(outputs), dtype=torch.long)
    out_features = initial.shape[0]
    start = initial.detach().double().cpu().reshape(out_features, -1).T  # (kept * kernel, out)
    xh = statistics.holdout_inputs[:, columns].double()
    yh = statistics.holdout_target[:, rows].double()
    if bias:
        columns = torch.cat([columns, torch.tensor([statistics.num_features])])
        xh = torch.cat([xh, torch.ones(xh.shape[0], 1, dtype=xh.dtype)], dim=1)
        start = torch.cat([start, torch.zeros(1, out_features, dtype=start.dtype)])
    gram = statistics.gram.double()[columns][:, columns]
    right = statistics.right.double()[columns][:, rows]

    def solve(gram: torch.Tensor, right: torch.Tensor, lambdas: Sequence[float]) -> list[torch.Tensor]:
        # (X^T X + lambda I)^-1 (X^T Y + lambda W0) for every lambda
        scale = max(gram.diagonal().mean().item(), 1e-12)
        identity = torch.eye(gram.shape[0], dtype=gram.dtype)
        solutions = []
        for ridge in lambdas:
            factor, info = torch.linalg.cholesky_ex(gram + ridge * scale * identity)
            if info.item() == 0:
                solutions.append(torch.cholesky_solve(right + ridge * scale * start, factor))
            else:  # not numerically positive definite (a tiny ridge on a rank-deficient Gram): eigenvalues clamped
                values, vectors = torch.linalg.eigh(gram)
                projected = vectors.T @ (right + ridge * scale * start)
                solutions.append(vectors @ (projected / (values.clamp_min(0) + ridge * scale).unsqueeze(1)))
        return solutions

    best: float | None = ridges[0]  # None: lambda = infinity, no refit
    if 0 < xh.shape[0] < statistics.gram[-1, -1].item():  # that entry sums the ones column: the point count
        fitted = [*solve(gram - xh.T @ xh, right - xh.T @ yh, ridges), start]
        errors = [float((yh - xh @ w).square().sum()) for w in fitted]
        best = [*ridges, None][min(range(len(errors)), key=errors.__getitem__)]
    solution = start if best is None else solve(gram, right, [best])[0]
    count = len(kept) * kernel
    weight = solution[:count].T.reshape(out_features, len(kept), kernel)
    return weight, (solution[count] if bias else None)
