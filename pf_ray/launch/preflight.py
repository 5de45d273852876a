"""Every input checked before the run folder exists: bad input exits 2 and leaves nothing on disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pf_ray.candidate import search_space
from pf_ray.checkpoint import load_checkpoint
from pf_ray.config import Budget, ExperimentConfig
from pf_ray.data import DataBundle, load_data
from pf_ray.errors import ConfigError
from pf_ray.launch.baseline import cached_baseline, given_state_dict, imported_baseline_path, load_given_weights
from pf_ray.launch.cluster import local_shape, max_concurrent_trials
from pf_ray.launch.resources import check_gpu_requests, check_precision
from pf_ray.launch.target import TableSource, check_target
from pf_ray.learners.base import SkipsUnsafeParts
from pf_ray.models import absolute_model_name, build_model, check_forward, run_name_prefix
from pf_ray.ops.latency_budget import TargetLatency
from pf_ray.spec import RunSpec
from pf_ray.storage import RunLocation, exists, is_remote, run_location
from trainables import get_trainable

Log = Callable[[str], None]


@dataclass(frozen=True)
class Prepared:
    """A run ready to start: everything checked, the learner's config resolved once (the run's spec)."""

    spec: RunSpec  # the experiment with absolute paths, and its learner's typed config
    data: DataBundle
    baseline_path: Path | None  # None: the baseline must be trained first
    location: RunLocation  # the local run folder, and where Ray writes search/ and retrain/
    latency: TargetLatency | None = None  # search.budget latency: the target's latency table and reference
    # what the learner's check found unsafe to compress and leaves alone ((name, reason), e.g. channel groups whose
    # pruning breaks the model): for results.json and the report; the spec's learner config already excludes them
    skipped_groups: tuple[tuple[str, str], ...] = ()

    @property
    def config(self) -> ExperimentConfig:
        return self.spec.experiment


def _absolute(path: str | None) -> str | None:
    if path is None or is_remote(path):  # None, or a URI (s3://, gs://) that is not ours to resolve
        return path
    return str(Path(path).expanduser().resolve())


def with_absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """Trials and Train workers run in their own working directories: resolve every relative path first."""
    return replace(
        config,
        model=replace(config.model, name=absolute_model_name(config.model.name)),
        dataset=replace(config.dataset, data_dir=_absolute(config.dataset.data_dir)),
        baseline=replace(config.baseline, checkpoint=_absolute(config.baseline.checkpoint)),
        storage=replace(config.storage, path=_absolute(config.storage.path),
                        staging_path=_absolute(config.storage.staging_path)),
        learner=replace(config.learner, options={
            key: _absolute(value) if key == "ratios_file" else value
            for key, value in config.learner.options.items()}),
    )


def _why_budget(config: ExperimentConfig, spec: RunSpec) -> str:
    """What ``search.budget: auto`` became for this run, and why."""
    search = spec.experiment.search
    if search.budget is Budget.LATENCY:
        return (f"latency: {', '.join(f'{s:g}x' for s in search.speedups)} faster than the FP32 ONNX Runtime "
                f"original on {config.target.runtime} {config.target.precision} (search.target_speedup)")
    if config.search.target_macs_ratio is not None:
        return f"macs: search.target_macs_ratio {search.macs_ratio:g} is given"
    return (f"learner {spec.learner_name} keeps its own budget (its searched values do not move latency on a CPU "
            "runtime, or it searches nothing)")


def preflight(config: ExperimentConfig, *, log: Log = print) -> Prepared:
    """Validate every input that can be checked up front: learner options, data, model, checkpoint, budget,
    resources, the run folder's name; returns the run's spec (the learner's config parsed once) and data."""
    spec = RunSpec.resolve(with_absolute_paths(config))
    if config.search.budget is Budget.AUTO:
        log(f"search.budget auto: {_why_budget(config, spec)}")
    config = spec.experiment
    get_trainable(spec.learner_name)  # a learner without one would fail only at the search, after the baseline
    data = load_data(config.dataset, seed=config.seed)
    model = build_model(config.model, in_channels=data.input_shape[0], num_classes=data.num_classes,
                        input_shape=data.input_shape)
    check_forward(model, config.model.name, data.input_shape, data.num_classes)
    baseline_path: Path | None = None
    state_dict = given_state_dict(config)
    if state_dict is not None:  # the user's own weights: refused now if they are another model's
        model, _ = load_given_weights(config, data, state_dict)
        imported = imported_baseline_path(config)
        baseline_path = imported if imported.exists() else None
    elif config.baseline.checkpoint:
        baseline_path = Path(config.baseline.checkpoint)
        model, info = load_checkpoint(baseline_path, expect_input_shape=data.input_shape,
                                      expect_num_classes=data.num_classes, user_model=config.model.name)
        if info.model != config.model:
            raise ConfigError(f"baseline.checkpoint: {str(baseline_path)!r} holds model {info.model.name!r}; "
                              f"model.name is {config.model.name!r}")
    else:
        baseline_path = cached_baseline(config, log=log)
    # What the learner's prepare() would refuse inside every trial (ratios for another model, more stages than
    # prunable groups, nothing prunable), refused now. Channel pruning also prunes copies of the model here and
    # leaves the groups that break it unpruned: every trial and the retrain get the config that excludes them.
    learner = spec.build_learner()
    learner.check(model, data.input_shape)
    skipped: tuple[tuple[str, str], ...] = ()
    if isinstance(learner, SkipsUnsafeParts):
        skipped = tuple((group.name, group.reason) for group in learner.skipped_groups())
        spec = spec.with_learner_config(learner.checked_config())
        if skipped:
            log(f"{config.learner.name}: {len(skipped)} channel group(s) left unpruned: "
                f"{', '.join(name for name, _ in skipped)}")
    check_target(config)
    if config.resources.ray_address is None:  # a local Ray: its size is known now (a remote cluster's is checked
        check_local_resources(config, log=log)  # once connected: cluster.check_cluster)
    name = config.storage.name or \
        f"{run_name_prefix(config.model.name)}-{config.learner.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    location = run_location(config.storage, name)
    taken = [str(location.folder)] if location.folder.exists() else []
    if is_remote(location.storage) and exists(location.storage):
        taken.append(location.storage)
    if taken:
        raise ConfigError(f"storage.name: run folder {taken[0]!r} already exists; choose another name")
    # Last: with search.budget latency this measures the target's latency table (minutes, once per CPU: cached).
    latency = TableSource(model, data.input_shape, config.target, log, tuple(name for name, _ in skipped)) \
        if config.search.budget is Budget.LATENCY else None
    spaces = [search_space(target_spec, model, data.input_shape, latency) for _, target_spec in spec.per_target()]
    for space in spaces:
        if space is not None:
            space.project([space.low] * len(space.names))  # raises if the budget (each target's) is out of reach
    if spaces[0] is None and latency is not None:
        raise ConfigError(f"search.budget: got 'latency'; learner {config.learner.name} searches no per-layer "
                          "values here, so nothing is budgeted; a latency budget applies to channel_pruning in "
                          "mode auto (or leave search.budget at macs)")
    return Prepared(spec, data, baseline_path, location, latency.built if latency is not None else None, skipped)


def check_local_resources(config: ExperimentConfig, *, log: Log = print) -> None:
    """The run's Ray requests against the local Ray it will start (``cluster.local_shape``): CPUs, GPUs and bf16.

    Raises:
        ConfigError: a request no node could grant (it would wait for ever), bf16 on a GPU without it.
    """
    import torch

    shape = local_shape(config)
    node = shape.node_types[0]
    check_gpu_requests(config, shape)
    max_concurrent_trials(config, node.cpus, node.gpus)
    if config.retrain.num_workers > node.cpus:  # a worker takes at least one CPU: it would wait for ever
        raise ConfigError(f"retrain.num_workers: got {config.retrain.num_workers}; the local Ray has "
                          f"{node.cpus:g} CPUs, and each Ray Train worker takes at least one")
    cuda = torch.cuda.is_available()
    # is_bf16_supported() starts CUDA in this process: only when bf16 is asked for
    wants_bf16 = config.resources.precision == "bf16" and config.resources.use_gpu
    note = check_precision(config.resources, cuda_available=cuda,
                           bf16_supported=cuda and wants_bf16 and torch.cuda.is_bf16_supported())
    if note:
        log(note)
