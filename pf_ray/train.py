"""Training and evaluation: an explicit loop; metrics leave through a ``report`` callback (no Ray in here).

The same ``fit`` runs in a trial's own process and inside each Ray Train worker: with ``distributed=True`` the
caller has already wrapped the model in DDP and started the process group; ``fit`` then shards the data with a
``DistributedSampler`` and all-reduces the metrics, so every rank reports the same numbers.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from pf_ray.config import DistillationConfig, TrainConfig
from pf_ray.metrics import ACCURACY, EPOCH, LOSS, SECONDS, TRAIN_ACCURACY
from pf_ray.progress import ProgressBar

PROGRESS_SECONDS = 15.0  # with a log: a progress-bar line at most this often within an epoch

Report = Callable[[dict[str, Any]], None]


def subset(dataset: Dataset, size: int | None) -> Dataset:
    """The first ``size`` examples (datasets are shuffled once when split, so this is a random subset)."""
    if size is None or size >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(size))


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
                distributed: bool = False) -> DataLoader:
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def take_batches(dataset: Dataset, batch_size: int, count: int | None = None, *, seed: int = 0, cycle: bool = False,
                 reseed: bool = False, full_only: bool = False,
                 device: str | torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (inputs, labels) batches of ``dataset``, the first ``count`` of them (None: no limit).

    Args:
        cycle: after the last batch, pass over the data again (reshuffled) until ``count`` are taken; without it,
            one pass at most. A pass that yields nothing (an empty data set) ends it.
        reseed: pass p shuffles with its own loader seeded ``seed + p``; without it every pass draws its order
            from the one loader seeded ``seed``. (Two random streams, both kept: they are what the learners'
            results were measured with.)
        full_only: leave out batches smaller than ``batch_size`` (every step averages as many examples).
        device: where the batches go (None: left where the data set has them).
    """
    loader = make_loader(dataset, batch_size, shuffle=True, seed=seed)
    taken = 0
    for number in itertools.count():
        if count is not None and taken >= count:
            return
        if reseed and number > 0:
            loader = make_loader(dataset, batch_size, shuffle=True, seed=seed + number)
        taken_before = taken
        for inputs, labels in loader:
            if full_only and len(labels) != batch_size:
                continue
            yield (inputs, labels) if device is None else (inputs.to(device), labels.to(device))
            taken += 1
            if taken == count:
                return
        if not cycle or taken == taken_before:
            return


def _all_reduce_sum(values: list[float], distributed: bool, device: torch.device) -> list[float]:
    if not distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 512, distributed: bool = False,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``dataset`` (eval mode; mode restored)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = loss_sum = 0.0
    for inputs, labels in make_loader(dataset, batch_size, shuffle=False, distributed=distributed):
        inputs, labels = inputs.to(device), labels.to(device)
        logits = model(inputs)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    correct, total, loss_sum = _all_reduce_sum([correct, total, loss_sum], distributed, device)
    if total == 0:
        return {ACCURACY: float("nan"), LOSS: float("nan")}
    return {ACCURACY: correct / total, LOSS: loss_sum / total}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, *, images: int, batch_size: int = 128) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on the first ``images`` of ``dataset`` (in place;
    returns ``model``, in eval mode). Nothing else changes: other modules stay in eval mode (activation quantizers
    keep their ranges), no weight moves, and a BatchNorm the forward pass never calls (one a quantization-aware
    conv folds into its weights in eval mode) keeps its statistics.

    Pruning or sparsifying a layer shifts the statistics of everything after it, and the stale running averages
    then make the compressed model look far worse than a short fine-tune shows; re-estimating them (adaptive
    BatchNorm, Li et al., "EagleEye", ECCV 2020) makes accuracy right after compression rank candidates much
    closer to how they rank after fine-tuning, for a few forward passes.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    model.eval()
    if not norms or images <= 0:
        return model
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches seen
        norm.train()
    for inputs, _ in make_loader(subset(dataset, images), batch_size, shuffle=False):
        model(inputs)
    for norm, (momentum, state) in zip(norms, saved, strict=True):
        norm.momentum = momentum
        norm.eval()
        if int(norm.num_batches_tracked) == 0:  # never called on its own (a QAT conv folds it in eval mode)
            norm.load_state_dict(state)
    return model


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of the student's softened prediction against the teacher's softened one, batch mean:
    ``mean_b( -sum_k softmax(t_b / T)_k * log_softmax(s_b / T)_k )`` (Hinton et al. 2015; PocketFlow's form,
    without the T^2 factor). Its gradient equals that of KL(teacher || student); the teacher gets none."""
    targets = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return -(targets * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()


def fit(
    model: nn.Module,
    train_set: Dataset,
    config: TrainConfig,
    *,
    validation_set: Dataset | None = None,
    on_step: Callable[[nn.Module, int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    report: Report | None = None,
    start_epoch: int = 0,
    seed: int = 0,
    distributed: bool = False,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    teacher: nn.Module | None = None,
    distillation: DistillationConfig | None = None,
) -> nn.Module:
    """Train ``model`` in place with SGD + Nesterov momentum and a per-step cosine learning rate.

    Args:
        on_step: the learner's hook, called after every optimiser step with the global step number.
        on_start: called once before training with the run's total number of optimiser steps (this rank's,
            resumed epochs included), e.g. for a learner whose schedule spans the run (weight sparsification).
        report: called once per epoch with ``{epoch, accuracy, loss, train_accuracy, epoch_seconds}``; a caller
            that checkpoints saves the model it passed in from there.
        start_epoch: resume after this many finished epochs (the learning-rate schedule continues; the
            optimiser's momentum starts afresh).
        distributed: ``model`` is DDP-wrapped and a process group is up; shard data, all-reduce metrics.
        log: receives a line per epoch, and within an epoch a progress bar (steps, running loss, ETA; a line at
            most every ``PROGRESS_SECONDS``, redrawn in place on a terminal); ``print`` on the command line,
            None in trials.
        teacher, distillation: distil from ``teacher`` (run in eval mode under no-grad, on ``device``): the loss
            becomes cross-entropy + ``distillation.weight * distillation_loss(..., distillation.temperature)``.

    Raises:
        FloatingPointError: the training loss became NaN or infinite (the trial fails with this reason).
    """
    device = torch.device(device)
    if (teacher is None) != (distillation is None):
        raise ValueError("fit: give teacher and distillation together, or neither")
    if teacher is not None:
        teacher = teacher.to(device).eval()
    train_set = subset(train_set, config.train_subset)
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=seed, distributed=distributed)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    steps_per_epoch = max(1, len(loader))
    total_steps = steps_per_epoch * config.epochs
    if on_start is not None:
        on_start(total_steps)

    def learning_rate(step: int) -> float:  # cosine decay from the configured rate to 0 over the whole run
        return 0.5 * config.learning_rate * (1.0 + math.cos(math.pi * step / total_steps))

    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        model.train()
        started = time.perf_counter()
        loss_sum = correct = seen = 0.0
        bar = ProgressBar(f"  epoch {epoch + 1}/{config.epochs}", steps_per_epoch, unit="steps", log=log,
                          interval=PROGRESS_SECONDS)
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            logits = model(inputs)
            loss = F.cross_entropy(logits, labels)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(inputs)
                loss = loss + distillation.weight * distillation_loss(logits, teacher_logits,
                                                                      distillation.temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, "
                                         f"step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(_unwrap(model), step)
            loss_sum += loss.item() * labels.numel()
            correct += (logits.argmax(dim=1) == labels).sum().item()
            seen += labels.numel()
            bar.update(note=f"loss {loss_sum / seen:.4f}")
        bar.close()
        loss_sum, correct, seen = _all_reduce_sum([loss_sum, correct, seen], distributed, device)
        metrics: dict[str, Any] = {
            EPOCH: epoch + 1,
            LOSS: loss_sum / max(seen, 1),
            TRAIN_ACCURACY: correct / max(seen, 1),
            SECONDS: time.perf_counter() - started,
        }
        if validation_set is not None:
            metrics[ACCURACY] = evaluate(model, validation_set, distributed=distributed, device=device)[ACCURACY]
        if log is not None:
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            log(f"  epoch {epoch + 1}/{config.epochs}: {shown}")
        if report is not None:
            report(metrics)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
