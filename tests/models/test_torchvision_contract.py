"""Contract over torchvision's classifiers (issue 15): each is built untrained for a small synthetic input, its
unsafe channel groups are found and left unpruned (``ops.safe_pruning``, as the channel_pruning learner does),
the rest are pruned uniformly by L1 norm toward half the MACs, and the pruned model must run, export to ONNX and
give ONNX Runtime the same top-1 class as PyTorch on at least 99% of the images.

The default run takes a representative subset (one model per family that is fast on 2 cores); the full sweep
over every classifier is marked slow (``make test-slow``). ``EXCLUDED`` (pf_ray.models.torchvision_models) says
which classifiers the contract does not cover and why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from pf_ray.config import ModelConfig
from pf_ray.export.onnx import export_onnx
from pf_ray.export.verify import MAX_ABS_DIFF, TOP1_AGREEMENT, agreement, onnx_session
from pf_ray.metrics import model_stats
from pf_ray.models import build_model, check_forward
from pf_ray.models.torchvision_models import EXCLUDED, classifier_names, example_input_shape
from pf_ray.ops.macs_budget import macs_table, uniform_keep_ratio, without_groups
from pf_ray.ops.pruning import prune_channels_
from pf_ray.ops.safe_pruning import SkippedGroup, unsafe_groups

NUM_CLASSES = 10
SIDE = 64  # pixels: small enough for 2 cores, large enough for every family's strides
TARGET_MACS_RATIO = 0.5  # prune toward half the MACs
MACS_BOUND = 0.75  # what the contract asserts: the pruned model has at most this fraction of the MACs
LOWEST_KEEP_RATIO = 0.3  # the uniform keep ratio never goes below this (and the safety check prunes to it)
ROUND_TO = 8  # the channel_pruning learner's default
NUM_IMAGES = 128  # ONNX Runtime vs PyTorch top-1: 99% allows one disagreement in 128
MIN_AGREEMENT = 0.99
MAX_LOGIT_DIFF = 1e-3  # ONNX Runtime vs PyTorch, relative to the largest logit (at least 1)
CALIBRATION_IMAGES = 16  # one train-mode batch sets the batch-norm statistics

# Models whose pruning falls short of MACS_BOUND (the safety check leaves groups that hold most MACs unpruned):
# name -> (the MACs fraction asserted instead, why).
REDUCTION_BOUNDS: dict[str, tuple[float, str]] = {}

# One per family, each a few seconds on 2 cores: the default run.
FAST_SUBSET = ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "shufflenet_v2_x0_5", "efficientnet_b0",
               "regnet_x_400mf", "densenet121"]


@dataclass(frozen=True)
class ContractResult:
    name: str
    macs_before: int
    macs_after: int
    keep_ratio: float  # the uniform keep ratio of the groups pruned
    num_groups: int  # prunable channel groups (torch-pruning's dependency analysis)
    skipped: tuple[SkippedGroup, ...]  # left unpruned, with why
    top1_agreement: float
    max_abs_diff: float  # largest |ONNX Runtime logit - PyTorch logit|
    max_logit: float  # largest |PyTorch logit|
    num_predicted_classes: int  # distinct top-1 classes over the images (untrained models often predict one)
    seconds: float


def calibrate_batch_norm_(model: nn.Module, input_shape: tuple[int, int, int]) -> None:
    """Batch-norm statistics of one batch of random images, as a trained model has: untrained, with mean 0 and
    variance 1, deep models' activations shrink towards logits of 1e-20, whose top-1 would compare nothing. The
    model is left in eval mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(CALIBRATION_IMAGES, *input_shape, generator=torch.Generator().manual_seed(2)))
    model.eval()


def randomize_zero_layers_(model: nn.Module) -> None:
    """Give the layers torchvision initialises to zero (ViT's classifier head) small random weights: with zero
    weights every image gets the same logits, and a top-1 comparison would compare nothing."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.any():
                module.weight.copy_(0.01 * torch.randn(module.weight.shape, generator=generator))


def prune_export_and_compare(name: str, folder) -> ContractResult:
    """Build ``torchvision:name``, leave its unsafe groups unpruned, prune the others toward half the MACs, export
    to ONNX and compare ONNX Runtime with PyTorch on NUM_IMAGES random images."""
    start = time.perf_counter()
    shape = example_input_shape(name, SIDE)  # larger for a few (SMALLEST_SIDES)
    torch.manual_seed(0)
    model = build_model(ModelConfig(f"torchvision:{name}"), in_channels=shape[0], num_classes=NUM_CLASSES,
                        input_shape=shape)
    randomize_zero_layers_(model)
    calibrate_batch_norm_(model, shape)
    check_forward(model, name, shape, NUM_CLASSES)
    before = model_stats(model, shape).macs
    groups = macs_table(model, shape).names
    skipped = unsafe_groups(model, shape, LOWEST_KEEP_RATIO, ROUND_TO)
    skipped_names = {group.name for group in skipped}
    ratio = uniform_keep_ratio(without_groups(macs_table(model, shape), skipped_names), TARGET_MACS_RATIO, ROUND_TO,
                               LOWEST_KEEP_RATIO)
    prune_channels_(model, shape, {g: ratio for g in groups if g not in skipped_names}, round_to=ROUND_TO,
                    criterion="l1")
    check_forward(model, name, shape, NUM_CLASSES)
    after = model_stats(model, shape).macs
    path = export_onnx(model, shape, folder / f"{name}.onnx")
    inputs = torch.randn(NUM_IMAGES, *shape, generator=torch.Generator().manual_seed(1))
    parity = agreement(model, onnx_session(path, threads=2), inputs)
    with torch.no_grad():
        logits = model(inputs)
    return ContractResult(name, before, after, ratio, len(groups), skipped, parity[TOP1_AGREEMENT],
                          parity[MAX_ABS_DIFF], float(logits.abs().max()), len(logits.argmax(1).unique()),
                          time.perf_counter() - start)


def check_contract(name: str, folder) -> None:
    result = prune_export_and_compare(name, folder)
    print(f"\n{name}: MACs {result.macs_before / 1e6:.1f}M -> {result.macs_after / 1e6:.1f}M "
          f"({result.macs_after / result.macs_before:.3f}) at keep ratio {result.keep_ratio:.2f}; "
          f"{len(result.skipped)} of {result.num_groups} groups left unpruned; top-1 agreement "
          f"{result.top1_agreement:.4f} ({result.num_predicted_classes} classes predicted), max |diff| "
          f"{result.max_abs_diff:.2e} of logits up to {result.max_logit:.2e}; {result.seconds:.1f} s")
    for group in result.skipped:
        print(f"  left unpruned: {group.name}: {group.reason}")
    bound, why = REDUCTION_BOUNDS.get(name, (MACS_BOUND, ""))
    assert result.macs_after <= bound * result.macs_before, (
        f"{name}: MACs {result.macs_after} of {result.macs_before} after pruning; expected at most {bound:g} "
        f"of them{' (' + why + ')' if why else ''}; left unpruned: {[g.name for g in result.skipped]}")
    assert result.top1_agreement >= MIN_AGREEMENT, (
        f"{name}: ONNX Runtime agrees with PyTorch on {result.top1_agreement:.3f} of {NUM_IMAGES} images "
        f"(max |diff| {result.max_abs_diff:.2e})")
    # An untrained model may give every random image the same class, so the logits are compared too
    assert result.max_abs_diff <= MAX_LOGIT_DIFF * max(1.0, result.max_logit), (
        f"{name}: ONNX Runtime's logits differ from PyTorch's by up to {result.max_abs_diff:.2e} (logits up to "
        f"{result.max_logit:.2e})")


@pytest.mark.parametrize("name", FAST_SUBSET)
def test_torchvision_contract_on_a_representative_subset(name, tmp_path):
    check_contract(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in classifier_names() if n not in FAST_SUBSET])
def test_torchvision_contract_on_every_other_classifier(name, tmp_path):
    check_contract(name, tmp_path)


def test_the_subset_and_the_exclusions_name_real_classifiers():
    every = classifier_names(include_excluded=True)
    assert len(every) >= 80  # torchvision 0.29
    assert set(FAST_SUBSET) <= set(classifier_names())
    assert set(EXCLUDED) <= set(every)
    assert set(REDUCTION_BOUNDS) <= set(classifier_names())
    assert all(reason for reason in EXCLUDED.values())
