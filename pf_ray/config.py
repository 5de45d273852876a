"""The experiment: one frozen dataclass per section, the embedded defaults, YAML loading and ``--set`` overrides.

A YAML file or dict becomes an ``ExperimentConfig`` through ``pf_ray.strict.from_dict`` (unknown keys, wrong types
and out-of-range values raise ``ConfigError`` naming the dotted field); ``to_dict`` is its inverse.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pf_ray.arm_cpus import CpuModel
from pf_ray.errors import ConfigError
from pf_ray.resources_config import PRECISIONS, ResourcesConfig  # noqa: F401  (the resources section, kept apart)
from pf_ray.storage import URI_SCHEMES, is_remote, unsupported_scheme
from pf_ray.strict import (
    check_choice,
    check_path,
    check_range,
    describe_value,
    from_dict,
    parse_yaml,
    show_value,
)

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------------
# The experiment's sections.


class SearchAlgorithm(enum.StrEnum):
    RANDOM = "random"  # uniform sampling of the per-layer box: the control
    TPE = "tpe"  # tree-structured Parzen estimator (hyperopt)
    GP = "gp"  # Gaussian-process Bayesian optimisation (bayesian-optimization 3.x)
    DDPG = "ddpg"  # the AMC / PocketFlow reinforcement-learning agent, one layer per step
    KNAPSACK = "knapsack"  # the uniform candidate and the learner's knapsack allocation only (two trials)


class Scoring(enum.StrEnum):
    FINE_TUNED = "fine_tuned"  # validation accuracy after each fine-tuning epoch (ASHA compares per epoch)
    PROXY = "proxy"  # validation accuracy right after compression, no fine-tuning (PocketFlow's fast reward)


DEFAULT_MACS_RATIO = 0.5  # search.target_macs_ratio when none is given


class Budget(enum.StrEnum):
    MACS = "macs"  # keep search.target_macs_ratio of the baseline's MACs
    LATENCY = "latency"  # be search.target_speedup times faster than the baseline, measured on the target
    # latency where the learner's values move latency on a CPU runtime (channel pruning, mode auto) and no
    # target_macs_ratio is given; otherwise macs (a learner with its own budget keeps it). Resolved once, in
    # pf_ray.spec.RunSpec.resolve: config.yaml, trials and a resume see the concrete budget
    AUTO = "auto"


class Runtime(enum.StrEnum):
    ONNXRUNTIME = "onnxruntime"  # ONNX Runtime (the .onnx / .ort files)
    EXECUTORCH = "executorch"  # ExecuTorch with the XNNPACK delegate (the .pte files; optional extra)


class Precision(enum.StrEnum):
    FP32 = "fp32"
    INT8 = "int8"  # ONNX Runtime static QDQ, or XNNPACK's pt2e quantizer


class Reward(enum.StrEnum):
    ACCURACY = "accuracy"  # the score is the accuracy itself
    AMC = "amc"  # -(1 - accuracy) * ln(MACs) (He et al., AMC, ECCV 2018): trades accuracy against MACs
    # accuracy * (latency / target)^-0.07 (MnasNet's soft constraint, Tan et al., CVPR 2019), latency measured
    # in ONNX Runtime on the trial's node, target = target_macs_ratio * the baseline's latency there
    LATENCY = "latency"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"  # a registered name, "path/to/file.py:function" or "package.module:function"
    width_multiplier: float = 1.0  # MobileNets only: scales every layer's channel count

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name: got ''; expected a model name")
        check_path("model.name", self.name)  # "path/to/file.py:function" names a file
        check_range("model.width_multiplier", self.width_multiplier, low=0.0, low_inclusive=False, high=4.0)


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "fashion_mnist"
    data_dir: str | None = None  # searched first; then $PF_RAY_DATA, Debian's folder, torchvision's cache
    validation_fraction: float = 0.1  # carved from the training set; the search scores on it
    train_subset: int | None = None  # use only this many training examples (None = all)
    test_subset: int | None = None  # evaluate on only this many test examples (None = all)
    # imagefolder only: every image resized (shorter side) and centre-cropped to this many pixels square, up or
    # down; None = the smallest side among the images, at most 32 (CIFAR's size: the 2-core quick-start's cost)
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            check_path("dataset.data_dir", self.data_dir)
        if self.image_size is not None:
            check_range("dataset.image_size", self.image_size, low=1, high=4096)
            if self.name != "imagefolder":
                raise ConfigError(f"dataset.image_size: got {self.image_size!r} with dataset {self.name!r}; only "
                                  "the imagefolder dataset is resized (the others have their own fixed size): "
                                  "leave it null")
        check_range("dataset.validation_fraction", self.validation_fraction, low=0.0, high=0.5,
                    low_inclusive=False)
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None:
                check_range(f"dataset.{name}", value, low=1)


@dataclass(frozen=True)
class TrainConfig:
    """An optimisation schedule: SGD with momentum and cosine decay (the CIFAR ResNet recipe)."""

    epochs: int = 1
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    train_subset: int | None = None  # use only this many training examples (None = all)

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, low=1)
        check_range("batch_size", self.batch_size, low=1)
        check_range("learning_rate", self.learning_rate, low=0.0, low_inclusive=False, high=10.0)
        check_range("momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_range("weight_decay", self.weight_decay, low=0.0, high=1.0)
        if self.train_subset is not None:
            check_range("train_subset", self.train_subset, low=1)


@dataclass(frozen=True)
class BaselineConfig:
    checkpoint: str | None = None  # a trained checkpoint; None = train one (cached under storage.path)
    # The embedded default is sized so the whole quick-start runs in about ten minutes on two CPU cores.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, learning_rate=0.1,
                                                                   train_subset=20000))

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            check_path("baseline.checkpoint", self.checkpoint)


@dataclass(frozen=True)
class DistillationConfig:
    """Knowledge distillation in every fine-tuning of the compressed model (search trials and the retrain): the
    loss gains ``weight * CE(softmax(teacher / T), softmax(student / T))``, the teacher being the uncompressed
    baseline, frozen (Hinton et al. 2015). PocketFlow's defaults, and like PocketFlow without Hinton's T^2
    factor: ``weight`` carries the scale."""

    weight: float = 4.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        check_range("weight", self.weight, low=0.0, low_inclusive=False, high=1000.0)
        check_range("temperature", self.temperature, low=0.0, low_inclusive=False, high=100.0)


@dataclass(frozen=True)
class LearnerConfig:
    """Which learner compresses the model, its options (parsed by the learner's own config class into a
    ``pf_ray.spec.RunSpec``), and
    whether its fine-tuning distils from the baseline (null: no distillation; ``{}``: PocketFlow's defaults)."""

    name: str = "channel_pruning"
    options: dict[str, Any] = field(default_factory=dict)
    distillation: DistillationConfig | None = None


@dataclass(frozen=True)
class SearchConfig:
    algorithm: SearchAlgorithm = SearchAlgorithm.TPE
    num_trials: int = 8
    scoring: Scoring = Scoring.FINE_TUNED
    reward: Reward = Reward.ACCURACY
    budget: Budget = Budget.AUTO  # what every candidate is projected onto: MACs, or latency on the target
    target_macs_ratio: float | None = None  # budget macs: keep this fraction of the baseline's MACs (None: 0.5)
    # budget latency: this many times faster on the deployment target than the baseline in FP32 ONNX Runtime
    # (the same threads and batch size). A list (e.g. [1.5, 2, 3]): a Pareto set in one run, one search per
    # target sharing the baseline and the latency table; the retrain takes the fastest target's best candidate
    # whose validation accuracy is within max_accuracy_loss of the most accurate target's best
    target_speedup: float | tuple[float, ...] = 3.0
    max_accuracy_loss: float = 0.01  # several targets: the accuracy (a fraction) traded for the faster one
    fine_tune: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=2, learning_rate=0.01, train_subset=4096)
    )
    grace_period: int = 1  # ASHA: epochs every trial runs before it may be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    validation_subset: int | None = 2000  # validation examples used to score trials (None = all)
    # Training images that re-estimate BatchNorm statistics before the proxy (accuracy right after compression)
    # is measured; 0 keeps the baseline's statistics. See pf_ray.train.recalibrate_batchnorm.
    proxy_bn_images: int = 512
    max_failures: int = 1  # retries of a trial that raised (a lost node, a crash) before it is recorded failed
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("search.num_trials", self.num_trials, low=1)
        check_range("search.max_failures", self.max_failures, low=0)
        check_range("search.proxy_bn_images", self.proxy_bn_images, low=0)
        if self.target_macs_ratio is not None:
            check_range("search.target_macs_ratio", self.target_macs_ratio, low=0.0, high=1.0,
                        low_inclusive=False)
        several = isinstance(self.target_speedup, tuple)
        for index, speedup in enumerate(self.target_speedup if several else (self.target_speedup,)):
            check_range("search.target_speedup" + (f"[{index}]" if several else ""), speedup, low=1.0,
                        low_inclusive=False, high=1000.0)
        if several:
            if not self.target_speedup or len(set(self.target_speedup)) != len(self.target_speedup):
                raise ConfigError(f"search.target_speedup: got {list(self.target_speedup)}; expected a number or a "
                                  "list of different numbers")
            if self.budget is Budget.MACS:
                raise ConfigError(f"search.target_speedup: got {list(self.target_speedup)} with search.budget "
                                  f"{self.budget.value}; several targets need search.budget latency")
        check_range("search.max_accuracy_loss", self.max_accuracy_loss, low=0.0, high=1.0)
        check_range("search.grace_period", self.grace_period, low=1)
        check_range("search.reduction_factor", self.reduction_factor, low=2)
        if self.validation_subset is not None:
            check_range("search.validation_subset", self.validation_subset, low=1)

    @property
    def macs_ratio(self) -> float:
        """The MACs budget's fraction: ``target_macs_ratio``, or 0.5 where none is given."""
        return DEFAULT_MACS_RATIO if self.target_macs_ratio is None else self.target_macs_ratio

    def resolved(self, budgets_latency: bool) -> SearchConfig:
        """This search with ``budget: auto`` made concrete: latency where the learner can be budgeted in latency
        (``budgets_latency``) and no ``target_macs_ratio`` is given, else macs. ConfigError for a Pareto set
        (several target speed-ups) that resolves to macs."""
        if self.budget is not Budget.AUTO:
            return self
        budget = Budget.LATENCY if budgets_latency and self.target_macs_ratio is None else Budget.MACS
        if budget is Budget.MACS and isinstance(self.target_speedup, tuple):
            raise ConfigError(f"search.target_speedup: got {list(self.target_speedup)}; several targets need a "
                              "latency budget, and search.budget auto resolves to macs here (a target_macs_ratio "
                              "is given, or the learner is not budgeted in latency)")
        return replace(self, budget=budget)

    @property
    def speedups(self) -> tuple[float, ...]:
        """The target speed-ups, in increasing order (one, or a Pareto set's)."""
        return tuple(sorted(self.target_speedup)) if isinstance(self.target_speedup, tuple) \
            else (self.target_speedup,)

    def for_speedup(self, speedup: float) -> SearchConfig:
        """This search with one target speed-up (each search of a Pareto set)."""
        return replace(self, target_speedup=float(speedup))


@dataclass(frozen=True)
class RetrainConfig:
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, learning_rate=0.02,
                                                                   train_subset=20000))
    num_workers: int = 1  # Ray Train workers (DDP); 1 still runs under Ray Train for checkpointing

    def __post_init__(self) -> None:
        check_range("retrain.num_workers", self.num_workers, low=1)


EXPORT_FORMATS = ("onnx", "onnx_int8", "ort", "ort_int8", "pte", "pte_int8")
EXECUTORCH_FORMATS = ("pte", "pte_int8")  # need the optional ExecuTorch extra


def executorch_installed() -> bool:
    return importlib.util.find_spec("executorch") is not None


def default_export_formats() -> tuple[str, ...]:
    """Every format this installation can write: the ExecuTorch ones only where ExecuTorch is installed."""
    return EXPORT_FORMATS if executorch_installed() else tuple(f for f in EXPORT_FORMATS
                                                                if f not in EXECUTORCH_FORMATS)


@dataclass(frozen=True)
class ExportConfig:
    # onnx: FP32 ONNX (always written); onnx_int8: ONNX Runtime static INT8 QDQ; ort / ort_int8: the same two in
    # ONNX Runtime Mobile's .ort format (Android, iOS); pte / pte_int8: ExecuTorch programs with the XNNPACK
    # delegate (optional extra). The default: every format this installation can write.
    formats: tuple[str, ...] = field(default_factory=default_export_formats)
    opset: int = 17
    calibration_samples: int = 256  # training images used to calibrate INT8 activations
    latency_threads: int = 1  # ONNX Runtime intra-op threads when timing
    latency_batch_sizes: tuple[int, ...] = (1,)
    latency_repeats: int = 200  # timed runs per measurement (after warm-up); the median is reported
    # The accuracy guard: the run fails if an artifact's test accuracy on its runtime is more than this below its
    # PyTorch model's (a fraction: 0.02 = 2 points). None: report only.
    max_accuracy_drop: float | None = 0.02
    # Also verify every artifact on emulated aarch64 kernels (pf_ray.aarch64) on each of these CPUs, on the first
    # aarch64_images test images: accuracy, agreement with x86 and PyTorch, the accuracy guard. Empty: x86 only.
    aarch64_cpus: tuple[str, ...] = ()
    aarch64_images: int = 256

    def __post_init__(self) -> None:
        for cpu in self.aarch64_cpus:
            check_choice("export.aarch64_cpus", cpu, list(CpuModel))
        check_range("export.aarch64_images", self.aarch64_images, low=1)
        for fmt in self.formats:
            check_choice("export.formats", fmt, EXPORT_FORMATS)
            if fmt in EXECUTORCH_FORMATS and not executorch_installed():
                raise ConfigError(f"export.formats: {fmt!r} needs ExecuTorch, which is not installed; "
                                  "pip install 'pf-ray[executorch]', or leave it out")
        check_range("export.opset", self.opset, low=13, high=20)  # the TorchScript exporter stops at 20
        check_range("export.calibration_samples", self.calibration_samples, low=1)
        check_range("export.latency_threads", self.latency_threads, low=1)
        check_range("export.latency_repeats", self.latency_repeats, low=1)
        for size in self.latency_batch_sizes:
            check_range("export.latency_batch_sizes", size, low=1)
        if self.max_accuracy_drop is not None:
            check_range("export.max_accuracy_drop", self.max_accuracy_drop, low=0.0, high=1.0)


@dataclass(frozen=True)
class TargetConfig:
    """What the model is deployed on: the runtime and precision whose measured latency the search budgets (with
    ``search.budget: latency``) and the report's headline speed-up is about."""

    runtime: Runtime = Runtime.ONNXRUNTIME
    precision: Precision = Precision.INT8
    threads: int = 1  # the runtime's intra-op threads
    batch_size: int = 1

    def __post_init__(self) -> None:
        check_range("target.threads", self.threads, low=1, high=256)
        check_range("target.batch_size", self.batch_size, low=1, high=4096)
        if self.runtime is Runtime.EXECUTORCH and not executorch_installed():
            raise ConfigError("target.runtime: got 'executorch', which is not installed; pip install "
                              "'pf-ray[executorch]', or use 'onnxruntime'")


@dataclass(frozen=True)
class StorageConfig:
    path: str = "runs"  # run folders and the baseline cache go here (local path, s3://, gs://, gcs://, file://)
    name: str | None = None  # run folder name; None = "<model>-<learner>-<timestamp>"
    shared: bool = False  # a local path that is one shared filesystem (NFS) mounted alike on every node
    # Local folder on the driver for runs whose storage.path is remote; the run folder is written here and
    # uploaded to storage.path/<name> when the run ends, and after the config is written.
    staging_path: str = "runs"

    def __post_init__(self) -> None:
        check_path("storage.path", self.path)
        scheme = unsupported_scheme(self.path)
        if scheme is not None:
            raise ConfigError(f"storage.path: got {show_value(self.path)}; pf-ray cannot write to {scheme} URIs; "
                              f"allowed: a local folder or a URI starting {', '.join(URI_SCHEMES)}")
        check_path("storage.staging_path", self.staging_path)
        if is_remote(self.staging_path):
            raise ConfigError(f"storage.staging_path: got {show_value(self.staging_path)}; expected a local folder "
                              "on the driver (storage.path takes the s3:// or gs:// URI)")
        if self.name is not None:
            check_path("storage.name", self.name)


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    seed: int = 0


# --------------------------------------------------------------------------------------------------------------
# YAML files and --set overrides.


def read_values_file(path: str, field: str) -> tuple[float, ...]:
    """Per-layer values in (0, 1] from a file (a config's ``field``, named in errors, e.g. a ratios file):
    ``.json``/``.yaml``/``.yml`` holding a list of numbers, or any other file holding numbers separated by spaces,
    commas or new lines (``#`` starts a comment)."""
    check_path(field, path)
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{field}: {path!r} does not exist (or is not a file)")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{field}: {path!r} is not readable text: {error}") from None
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        elif file.suffix.lower() in (".yaml", ".yml"):
            values = yaml.safe_load(text)
        else:
            lines = (line.split("#", 1)[0] for line in text.splitlines())
            values = [float(token) for line in lines for token in line.replace(",", " ").split()]
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{field}: {path!r} is not a list of numbers: {error}") from None
    if not isinstance(values, list) or not values:
        held = "nothing" if values in ([], None) else type(values).__name__
        raise ConfigError(f"{field}: {path!r} holds {held}; expected a list of numbers")
    ratios = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ConfigError(
                f"{field}: value {index} of {path!r} is {value!r}; allowed: numbers in (0, 1]"
            )
        ratios.append(float(value))
    return tuple(ratios)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as error:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {error.start} is "
                          f"{error.object[error.start:error.start + 1]!r})") from None
    data = parse_yaml(text, f"config file {str(path)!r}")
    if data is None:  # likely a file cut short or the wrong file: the defaults need no file at all
        raise ConfigError(f"config file {str(path)!r} is empty (or holds only comments); expected a mapping of "
                          "sections (leave the file out to use the defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: got {describe_value(data)}; expected a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` strings (value parsed as YAML) to a copy of ``data``."""
    import copy

    data = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {show_value(override)}: expected dotted.key=value")
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set {show_value(override)}: empty key in {show_value(key)}; "
                              "expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or not buildable): keep it as a string
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {show_value(override)}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_experiment(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> ExperimentConfig:
    """Load an experiment: the embedded defaults, then the YAML file (if any), then ``--set`` overrides.

    ``learner.options`` stay a mapping here (their fields depend on the learner): ``pf_ray.spec.RunSpec.resolve``
    parses them, first thing in a run's preflight (``pf_ray.spec.load_spec`` does both)."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return from_dict(ExperimentConfig, data)
