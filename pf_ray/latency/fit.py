"""Fitting a latency model to measured candidates: non-negative least squares on relative error, the feature set
chosen by cross-validation.

Rows are divided by their measured latency, so the fit minimises squared *relative* error (a 0.1 ms miss on a
0.2 ms candidate counts as much as 1 ms on a 2 ms one). Weights are non-negative: every feature is work or a
penalty that can only add time, which keeps predictions physical (never below the base) and lets NNLS drop the
features the data does not support. The feature set (rounding block, alignment levels, activation terms) is the one
with the lowest median error over ``folds``-fold cross-validation on the training candidates; ties go to the
smaller model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from pf_ray.latency.features import FeatureSet, Layout

Log = Callable[[str], None]

# The feature sets tried: rounding blocks x alignment levels x activation terms.
BLOCKS = (1, 2, 4, 8, 16, 32)
ALIGNS = ((), (4,), (8,), (16,), (4, 16), (8, 16), (4, 8, 16))


def candidate_feature_sets(sizes: Sequence[int]) -> list[FeatureSet]:
    """Every combination worth trying for groups of these sizes (no block or alignment above the largest group)."""
    largest = max(sizes)
    return [FeatureSet(block=block, aligns=aligns, activations=activations)
            for block in BLOCKS if block <= largest
            for aligns in ALIGNS if all(a <= largest for a in aligns)
            for activations in (False, True)]


def fit_weights(design: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Non-negative weights minimising the squared relative error of ``design @ weights`` against ``measured``."""
    scaled = design / measured[:, None]
    weights, _ = nnls(scaled, np.ones(len(measured)), maxiter=max(1000, 50 * design.shape[1]))
    return weights


def relative_errors(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(predicted - measured) / measured


@dataclass(frozen=True)
class Choice:
    """A feature set and its cross-validated relative errors."""

    features: FeatureSet
    median_error: float
    p90_error: float
    max_error: float
    columns: int


def cross_validate(layout: Layout, kept: np.ndarray, measured: np.ndarray, features: FeatureSet, *,
                   folds: int = 5, seed: int = 0, removed: np.ndarray | None = None,
                   fp32: np.ndarray | None = None) -> Choice:
    """``folds``-fold cross-validated relative errors of a model with ``features`` (every row predicted once, by a
    fit that did not see it). ``removed``, ``fp32``: the candidates' removed blocks and FP32 layers
    (``Layout.design``), if any."""
    design = layout.design(kept, features, removed, fp32)
    order = np.random.default_rng(seed).permutation(len(measured))
    errors = np.empty(len(measured))
    for fold in range(folds):
        held = order[fold::folds]
        train = np.setdiff1d(order, held)
        weights = fit_weights(design[train], measured[train])
        errors[held] = relative_errors(design[held] @ weights, measured[held])
    return Choice(features, float(np.median(errors)), float(np.percentile(errors, 90)), float(errors.max()),
                  design.shape[1])


def choose_features(layout: Layout, kept: np.ndarray, measured: np.ndarray, *, folds: int = 5,
                    candidates: Sequence[FeatureSet] | None = None, log: Log | None = None,
                    removed: np.ndarray | None = None, fp32: np.ndarray | None = None) -> list[Choice]:
    """Every candidate feature set cross-validated, best first (lowest median error; within 2% of it relative, the
    lowest 90th percentile; then the fewest columns)."""
    candidates = candidate_feature_sets(layout.sizes.astype(int).tolist()) if candidates is None else candidates
    choices = [cross_validate(layout, kept, measured, features, folds=folds, removed=removed, fp32=fp32)
               for features in candidates]
    best = min(choice.median_error for choice in choices)
    choices.sort(key=lambda c: (c.median_error > best * 1.02, c.p90_error if c.median_error <= best * 1.02
                                else c.median_error, c.columns))
    if log is not None:
        top = choices[0]
        log(f"  feature sets cross-validated: {len(choices)}; best {top.features.describe()}: median error "
            f"{100 * top.median_error:.1f}%, 90th percentile {100 * top.p90_error:.1f}%")
    return choices
