"""The full-precision baseline every candidate starts from: given, cached, or trained (here on the driver's CPUs;
with ``resources.use_gpu``, as a Ray task on a GPU node, whose checkpoint comes back as bytes)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pf_ray.checkpoint import save_checkpoint, sha256_of
from pf_ray.config import ExperimentConfig
from pf_ray.data import DataBundle, load_data
from pf_ray.files import atomic_write
from pf_ray.launch.cluster import cpu_count
from pf_ray.metrics import ACCURACY
from pf_ray.models import build_model, check_forward
from pf_ray.storage import copy_file, exists, is_remote, join_uri, local_root
from pf_ray.strict import to_dict
from pf_ray.train import evaluate, fit
from pf_ray.weights import LoadedWeights, load_state_dict_into, plain_state_dict, read_weights_file

Log = Callable[[str], None]


def baseline_cache_path(config: ExperimentConfig) -> Path:
    """Where ``pf-ray train`` caches the baseline: keyed by everything that changes the trained weights."""
    dataset = {k: v for k, v in to_dict(config.dataset).items() if not (k == "image_size" and v is None)}
    key = json.dumps([to_dict(config.model), dataset, to_dict(config.baseline.train), config.seed],
                     sort_keys=True)  # image_size: null left out: the caches of runs made before it still match
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return local_root(config.storage) / "baselines" / f"{config.model.name.replace('/', '_').replace(':', '_')}-" \
                                                      f"{config.dataset.name}-{digest}.pt"


def remote_baseline(config: ExperimentConfig) -> str | None:
    """With a remote storage.path, the baseline cache is also kept there (``<storage.path>/baselines/<file>``), so a
    run resumed or started from another machine finds it; None for a local storage path or a given checkpoint."""
    if config.baseline.checkpoint or not is_remote(config.storage.path):
        return None
    return join_uri(config.storage.path, "baselines", baseline_cache_path(config).name)


def cached_baseline(config: ExperimentConfig, *, log: Log = print) -> Path | None:
    """The cached baseline on this machine, fetched from the remote storage first if only that has it."""
    local = baseline_cache_path(config)
    remote = remote_baseline(config)
    if not local.exists() and remote is not None and exists(remote):
        copy_file(remote, str(local))
        log(f"baseline: fetched {remote}")
    return local if local.exists() else None


def train_baseline(config: ExperimentConfig, data: DataBundle, *, log: Log = print, force: bool = False,
                   device: str = "cuda") -> Path:
    """Train the full-precision baseline and cache it; reuse the cache if present. It trains in this process (all
    cores), or with ``resources.use_gpu`` on ``device`` in a Ray task holding a GPU (``_train_and_save``).

    With a remote storage.path the cache is uploaded there too (``remote_baseline``). A plain state dict in
    baseline.checkpoint is imported instead (``import_baseline``).

    Args:
        device: what the baseline trains on with use_gpu ("cuda"; tests on CPU-only machines pass "cpu").
    """
    state_dict = given_state_dict(config)
    if state_dict is not None:
        return import_baseline(config, data, state_dict, log=log, force=force, device=device)
    path = Path(config.baseline.checkpoint) if config.baseline.checkpoint else baseline_cache_path(config)
    if not config.baseline.checkpoint and not force:
        path = cached_baseline(config, log=log) or path
    if path.exists() and not force:
        log(f"baseline: using {path}")
        return path
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.resources.num_cpus or cpu_count())
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes,
                        input_shape=data.input_shape)
    _train_and_save(path, model, config, data, "", {"config": to_dict(config)}, log=log, device=device)
    remote = remote_baseline(config)
    if remote is not None:
        copy_file(str(path), remote)
        log(f"baseline: uploaded to {remote}")
    return path


# --------------------------------------------------------------------------------------------------------------
# The user's own weights: baseline.checkpoint naming a plain state dict instead of a pf-ray checkpoint.


def given_state_dict(config: ExperimentConfig) -> dict[str, torch.Tensor] | None:
    """The plain state dict ``baseline.checkpoint`` names; None when it names a pf-ray checkpoint, or nothing.

    Raises:
        CheckpointError: the file cannot be read with ``weights_only=True`` (a whole pickled model is named as
            such), or holds neither a pf-ray checkpoint nor a state dict.
    """
    if not config.baseline.checkpoint:
        return None
    payload = read_weights_file(config.baseline.checkpoint)
    if isinstance(payload, dict) and "format" in payload:  # pf-ray's own (read_checkpoint checks its version)
        return None
    return plain_state_dict(payload, config.baseline.checkpoint)


def imported_baseline_path(config: ExperimentConfig) -> Path:
    """Where the baseline made from a plain state dict is cached: keyed by the file's bytes and everything else
    that changes the result (the model, the dataset, the baseline's training and the seed)."""
    key = json.dumps([to_dict(config.model), to_dict(config.dataset), to_dict(config.baseline.train),
                      config.seed, sha256_of(config.baseline.checkpoint)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = config.model.name.replace("/", "_").replace(":", "_")
    return local_root(config.storage) / "baselines" / f"{name}-{config.dataset.name}-imported-{digest}.pt"


def load_given_weights(config: ExperimentConfig, data: DataBundle, state_dict: dict[str, torch.Tensor]
                       ) -> tuple[nn.Module, LoadedWeights]:
    """``model.name`` built for the dataset with ``state_dict`` loaded (head and stem adapted: pf_ray.weights)."""
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes,
                        input_shape=data.input_shape)
    check_forward(model, config.model.name, data.input_shape, data.num_classes)
    loaded = load_state_dict_into(model, state_dict, data.input_shape, model_name=config.model.name,
                                  path=config.baseline.checkpoint)
    return model, loaded


def import_baseline(config: ExperimentConfig, data: DataBundle, state_dict: dict[str, torch.Tensor], *,
                    log: Log = print, force: bool = False, device: str = "cuda") -> Path:
    """Make a pf-ray baseline checkpoint from the user's state dict, and cache it (``imported_baseline_path``).

    Weights that fit as stored are the baseline as they are (evaluated, not trained). Where the head (other
    class count) or the first layer (other channel count) had to be re-initialised, the model is trained with
    ``baseline.train`` starting from the given weights, as any baseline is."""
    path = imported_baseline_path(config)
    if path.exists() and not force:
        log(f"baseline: using {path} (imported from {config.baseline.checkpoint})")
        return path
    torch.manual_seed(config.seed)  # the re-initialised layers' weights
    torch.set_num_threads(config.resources.num_cpus or cpu_count())
    model, loaded = load_given_weights(config, data, state_dict)
    log(f"baseline: loaded the state dict {config.baseline.checkpoint} into {config.model.name}"
        + ("" if loaded.changes else ", every tensor as stored"))
    for change in loaded.changes:
        log(f"baseline:   {change}")
    weights = {"file": str(config.baseline.checkpoint), "sha256": sha256_of(config.baseline.checkpoint),
               "changes": list(loaded.changes)}
    why = "layers were re-initialised; from the given weights, " if loaded.reinitialised else None
    _train_and_save(path, model, config, data, why,
                    {"config": to_dict(config), "weights": weights}, log=log, device=device)
    return path


def _train_and_save(path: Path, model: nn.Module, config: ExperimentConfig, data: DataBundle,
                    why: str | None, extra: dict[str, Any], *, log: Log, device: str = "cuda") -> None:
    """Train ``model`` with ``baseline.train`` (unless ``why`` is None: weights used as given), then save it as the
    baseline checkpoint with its validation metrics. ``why``: what the training line says first.

    Without use_gpu: in this process, on its CPUs, as before GPUs. With use_gpu and Ray running (``pf-ray
    compress``): in a Ray task that holds one GPU and the CPUs of a retrain worker, on ``device``, so it lands on a
    GPU node (the clusters/ YAMLs' driver is the CPU-only head); the checkpoint's bytes and the log lines come back.
    With use_gpu and no Ray (``pf-ray train``): here, on ``device`` if CUDA is available, else on the CPU."""
    if why is None or not config.resources.use_gpu:
        accuracy = _train_here(path, model, config, data, why, extra, log=log, device="cpu")
        log(f"baseline: validation accuracy {accuracy:.4f}; saved {path}")
        return
    ray = _running_ray()
    if ray is None:  # `pf-ray train`, or a machine without Ray (pf_ray imports without it)
        here = device if device == "cpu" or torch.cuda.is_available() else "cpu"
        if here != device:
            log("baseline: resources.use_gpu, but no Ray is running and CUDA is not available here: training on "
                "the CPU")
        accuracy = _train_here(path, model, config, data, why, extra, log=log, device=here)
        log(f"baseline: validation accuracy {accuracy:.4f}; saved {path}")
        return
    from pf_ray.launch.cluster import live_shape
    from pf_ray.launch.resources import worker_cpus

    cpus = worker_cpus(1, True, live_shape(config))
    log(f"baseline: training as a Ray task on a GPU node (1 GPU, {cpus} CPU(s), device {device})")
    task = ray.remote(_train_in_task).options(num_cpus=cpus, num_gpus=1, max_retries=0)
    checkpoint, lines, accuracy = ray.get(task.remote(model, config, why, extra, device, cpus))
    for line in lines:  # the task's log, replayed here once it is done
        log(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, checkpoint)
    log(f"baseline: validation accuracy {accuracy:.4f}; saved {path}")


def _running_ray():
    """The ``ray`` module if Ray is installed and this process is connected to a Ray; else None."""
    try:
        import ray
    except ImportError:
        return None
    return ray if ray.is_initialized() else None


def _train_in_task(model: nn.Module, config: ExperimentConfig, why: str, extra: dict[str, Any], device: str,
                   cpus: int) -> tuple[bytes, list[str], float]:
    """The Ray task of ``_train_and_save``: the data loaded on its node, the model trained on ``device``; returns
    the checkpoint file's bytes (the same format as a baseline trained on the driver), its log lines and the
    validation accuracy."""
    import ray

    torch.set_num_threads(cpus)
    context = ray.get_runtime_context()
    lines = [f"baseline: in a Ray task on node {context.get_node_id()[:12]}, GPU(s) {ray.get_gpu_ids()}, "
             f"{cpus} CPU thread(s)"]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "baseline.pt"
        accuracy = _train_here(path, model, config, load_data(config.dataset, seed=config.seed), why, extra,
                               log=lines.append, device=device)
        return path.read_bytes(), lines, accuracy


def _train_here(path: Path, model: nn.Module, config: ExperimentConfig, data: DataBundle, why: str | None,
                extra: dict[str, Any], *, log: Log, device: str) -> float:
    """``_train_and_save`` in this process, on ``device``; returns the validation accuracy."""
    model.to(device)
    if why is not None:
        train = config.baseline.train
        size = min(len(data.train), train.train_subset or len(data.train))
        log(f"baseline: {why}training {config.model.name} on {config.dataset.name} for {train.epochs} epoch(s), "
            f"{size} images" + ("" if device == "cpu" else f" on {device}"))
        fit(model, data.train, train, validation_set=data.validation, seed=config.seed, log=log, device=device)
    metrics = evaluate(model, data.validation, device=device)
    save_checkpoint(path, model, model_config=config.model, input_shape=data.input_shape,
                    num_classes=data.num_classes, metrics={"validation_" + k: v for k, v in metrics.items()},
                    extra=extra)
    return metrics[ACCURACY]
