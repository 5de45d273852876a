"""The full-precision baseline every candidate starts from: given, cached, or trained here (no Ray)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from pf_ray.checkpoint import save_checkpoint
from pf_ray.config import ExperimentConfig
from pf_ray.data import DataBundle
from pf_ray.launch.cluster import cpu_count
from pf_ray.metrics import ACCURACY
from pf_ray.models import build_model
from pf_ray.storage import copy_file, exists, is_remote, join_uri, local_root
from pf_ray.strict import to_dict
from pf_ray.train import evaluate, fit

Log = Callable[[str], None]


def baseline_cache_path(config: ExperimentConfig) -> Path:
    """Where ``pf-ray train`` caches the baseline: keyed by everything that changes the trained weights."""
    key = json.dumps([to_dict(config.model), to_dict(config.dataset), to_dict(config.baseline.train),
                      config.seed], sort_keys=True)
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


def train_baseline(config: ExperimentConfig, data: DataBundle, *, log: Log = print, force: bool = False) -> Path:
    """Train the full-precision baseline in this process (all cores) and cache it; reuse the cache if present.

    With a remote storage.path the cache is uploaded there too (``remote_baseline``)."""
    path = Path(config.baseline.checkpoint) if config.baseline.checkpoint else baseline_cache_path(config)
    if not config.baseline.checkpoint and not force:
        path = cached_baseline(config, log=log) or path
    if path.exists() and not force:
        log(f"baseline: using {path}")
        return path
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.resources.num_cpus or cpu_count())
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    train = config.baseline.train
    size = min(len(data.train), train.train_subset or len(data.train))
    log(f"baseline: training {config.model.name} on {config.dataset.name} for {train.epochs} epoch(s), "
        f"{size} images")
    fit(model, data.train, train, validation_set=data.validation, seed=config.seed, log=log)
    metrics = evaluate(model, data.validation)
    save_checkpoint(path, model, model_config=config.model, input_shape=data.input_shape,
                    num_classes=data.num_classes, metrics={"validation_" + k: v for k, v in metrics.items()},
                    extra={"config": to_dict(config)})
    log(f"baseline: validation accuracy {metrics[ACCURACY]:.4f}; saved {path}")
    remote = remote_baseline(config)
    if remote is not None:
        copy_file(str(path), remote)
        log(f"baseline: uploaded to {remote}")
    return path
