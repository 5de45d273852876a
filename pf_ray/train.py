"""Training and evaluation: an explicit loop; metrics leave through a ``report`` callback (no Ray in here).

The same ``fit`` runs in a trial's own process and inside each Ray Train worker: with ``distributed=True`` the
caller has already wrapped the model in DDP and started the process group; ``fit`` then shards the data with a
``DistributedSampler`` and all-reduces the metrics, so every rank reports the same numbers. Every step the ranks
agree (one all-reduce) that the loss is finite before any of them steps, so a NaN on one rank stops all of them
together. Evaluation shards without padding, so each example counts once.

Metrics accumulate as tensors on the training device: one host synchronisation per epoch (and per progress line
with a log), not three per step.
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
from pf_ray.devices import autocast, model_device, precision_for, prepare_for_device
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
                distributed: bool = False, pin_memory: bool = False) -> DataLoader:
    """A loader over ``dataset``; ``distributed``: this rank's shard (``DistributedSampler``, padded so every rank
    takes as many steps: for training only; ``evaluation_shard`` for evaluation). ``pin_memory``: page-locked
    batches, for asynchronous copies to a GPU."""
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, pin_memory=pin_memory)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, pin_memory=pin_memory)


def evaluation_shard(dataset: Dataset, distributed: bool) -> Dataset:
    """This rank's part of ``dataset`` for evaluation: examples rank, rank + world, ... (no padding, unlike
    ``DistributedSampler``: the ranks' parts add up to ``dataset`` exactly, each example once)."""
    if not distributed:
        return dataset
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Subset(dataset, range(rank, len(dataset), world))  # type: ignore[arg-type]


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


def _all_reduce_sum(values: list[float | torch.Tensor], distributed: bool, device: torch.device) -> list[float]:
    """Sums over the ranks (the values themselves without ``distributed``), as Python floats: one host sync."""
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if distributed:
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 512, distributed: bool = False,
             device: str | torch.device | None = None, precision: str = "fp32") -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``dataset`` (eval mode; mode restored).

    Args:
        distributed: each rank scores its own unpadded shard and the sums are all-reduced: every example counts
            once, and every rank returns the same numbers.
        device: where the inputs go; None: the model's device.
    """
    device = model_device(model) if device is None else torch.device(device)
    precision = precision_for(model, precision)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total = 0
    cuda = _is_cuda(device)
    for inputs, labels in make_loader(evaluation_shard(dataset, distributed), batch_size, shuffle=False,
                                      pin_memory=cuda):
        inputs, labels = inputs.to(device, non_blocking=cuda), labels.to(device, non_blocking=cuda)
        with autocast(device, precision):
            logits = model(inputs)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(dim=1) == labels).sum()
        total += labels.numel()
    model.train(was_training)
    correct, total, loss_sum = _all_reduce_sum([correct, total, loss_sum], distributed, device)
    if total == 0:
        return {ACCURACY: float("nan"), LOSS: float("nan")}
    return {ACCURACY: correct / total, LOSS: loss_sum / total}


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, *, images: int, batch_size: int = 128,
                          device: str | torch.device | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance on the first ``images`` of ``dataset`` (in place;
    returns ``model``, in eval mode). Nothing else changes: other modules stay in eval mode (activation quantizers
    keep their ranges), no weight moves, and a BatchNorm the forward pass never calls (one a quantization-aware
    conv folds into its weights in eval mode) keeps its statistics.

    Pruning or sparsifying a layer shifts the statistics of everything after it, and the stale running averages
    then make the compressed model look far worse than a short fine-tune shows; re-estimating them (adaptive
    BatchNorm, Li et al., "EagleEye", ECCV 2020) makes accuracy right after compression rank candidates much
    closer to how they rank after fine-tuning, for a few forward passes. The images go to ``device`` (None: the
    model's device).
    """
    device = model_device(model) if device is None else torch.device(device)
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
        model(inputs.to(device))
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
    precision: str = "fp32",
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
        device: where training runs: the model is moved there (a DDP-wrapped one must be there already), and
            the batches and the teacher with it. On CUDA: cudnn autotuning, channels-last, pinned batches.
        precision: "fp32", or "bf16" autocast for the forward passes and the loss (the learners' quantizer and
            codebook maths stay fp32; the weights and the optimiser stay fp32).
        log: receives a line per epoch, and within an epoch a progress bar (steps, running loss, ETA; a line at
            most every ``PROGRESS_SECONDS``, redrawn in place on a terminal); ``print`` on the command line,
            None in trials.
        teacher, distillation: distil from ``teacher`` (run in eval mode under no-grad, on ``device``): the loss
            becomes cross-entropy + ``distillation.weight * distillation_loss(..., distillation.temperature)``.

    Raises:
        FloatingPointError: the training loss became NaN or infinite on this rank or another (all ranks agree
            before any of them steps, so they raise together; deterministic, so not worth a retry).
    """
    device = torch.device(device)
    if (teacher is None) != (distillation is None):
        raise ValueError("fit: give teacher and distillation together, or neither")
    if distributed:
        if model_device(model).type != device.type:
            raise ValueError(f"fit: the DDP-wrapped model is on {model_device(model)}, training asked for {device}; "
                             f"move the model before wrapping it")
    else:
        prepare_for_device(model, device)
    if teacher is not None:
        teacher = prepare_for_device(teacher, device).eval()
    cuda = _is_cuda(device)
    if precision_for(model, precision) != precision:
        if log is not None:
            log(f"  precision: {precision} asked, fp32 used (a captured graph's fake quantizers take fp32 only)")
        precision = precision_for(model, precision)
    train_set = subset(train_set, config.train_subset)
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=seed, distributed=distributed,
                         pin_memory=cuda)
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
        # running sums on the device: read back once per epoch (and per progress line)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        bar = ProgressBar(f"  epoch {epoch + 1}/{config.epochs}", steps_per_epoch, unit="steps", log=log,
                          interval=PROGRESS_SECONDS)
        for inputs, labels in loader:
            inputs, labels = inputs.to(device, non_blocking=cuda), labels.to(device, non_blocking=cuda)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step)
            with autocast(device, precision):
                try:
                    logits = model(inputs)
                except RuntimeError:
                    # channels-last breaks a model that .view()s a conv output; go back to the default layout
                    if not (cuda and not distributed and step == start_epoch * steps_per_epoch):
                        raise
                    model.to(memory_format=torch.contiguous_format)
                    logits = model(inputs)
                loss = F.cross_entropy(logits.float(), labels)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(inputs)
                    loss = loss + distillation.weight * distillation_loss(logits.float(), teacher_logits.float(),
                                                                          distillation.temperature)
            # One host sync per step, and the one that matters: every rank learns whether any rank's loss is
            # finite before any of them steps, so a NaN on one rank stops all ranks together (none waits in an
            # all-reduce the others never reach).
            if not _all_finite(loss, distributed):
                value = loss.item()
                what = f"loss is {value}" if not math.isfinite(value) else "loss is not finite on another rank"
                raise FloatingPointError(f"training diverged: {what} at epoch {epoch + 1}, step {step}; lower the "
                                         f"learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if on_step is not None:
                on_step(_unwrap(model), step)
            loss_sum += loss.detach().double() * labels.numel()
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            seen += labels.numel()
            if bar.log is not None and time.perf_counter() - bar.last_shown >= bar.interval:
                bar.update(note=f"loss {loss_sum.item() / seen:.4f}")
            else:
                bar.update()
        bar.close()
        loss_sum, correct, seen = _all_reduce_sum([loss_sum, correct, float(seen)], distributed, device)
        metrics: dict[str, Any] = {
            EPOCH: epoch + 1,
            LOSS: loss_sum / max(seen, 1),
            TRAIN_ACCURACY: correct / max(seen, 1),
            SECONDS: time.perf_counter() - started,
        }
        if validation_set is not None:
            metrics[ACCURACY] = evaluate(model, validation_set, distributed=distributed, device=device,
                                         precision=precision)[ACCURACY]
        if log is not None:
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            log(f"  epoch {epoch + 1}/{config.epochs}: {shown}")
        if report is not None:
            report(metrics)
    return model


def _all_finite(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite on every rank (one all-reduce of a flag with ``distributed``)."""
    not_finite = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    if distributed:
        torch.distributed.all_reduce(not_finite)
    return bool(not_finite.item() == 0.0)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
