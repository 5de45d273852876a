"""Bad input through the real ``pf-ray`` entry point: each case ends with one line on stderr naming the problem,
exit code 2, and nothing new on disk (no run folder, no baseline cache, no partial file).

Every case runs ``pf_ray.cli.main`` in this process on the digits dataset; ``compress`` cases fail in
``pf_ray.launch.preflight`` (or before), and a guard fails the test at once if ``preflight`` accepts one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import pf_ray.launch.pipeline as pipeline
from pf_ray.checkpoint import FORMAT, save_checkpoint
from pf_ray.cli import EXIT_BAD_INPUT, main
from pf_ray.config import ExperimentConfig, ModelConfig
from pf_ray.data import FASHION_MNIST_FILES
from pf_ray.models import build_model
from pf_ray.strict import to_dict

DIGITS = (1, 8, 8)  # scikit-learn's digits: 1x8x8 images, 10 classes

USER_MODELS = '''
import torch
from torch import nn


def linear_only(in_channels, num_classes):  # its one layer produces the classes: nothing to prune
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes))


def flatten_only(num_classes):  # no parameters at all (the 64 pixels averaged down to the classes)
    return nn.Sequential(nn.Flatten(), nn.AdaptiveAvgPool1d(num_classes))


def not_a_module(num_classes):
    return "a model"


def broken(num_classes):
    raise RuntimeError("out of memory on purpose\\nsecond line of the message")


NOT_CALLABLE = 3


class KthValueNet(nn.Module):  # aten::kthvalue has no ONNX equivalent at opset 17
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.conv(x)
        x = x - torch.kthvalue(x, 2, dim=-1, keepdim=True).values
        return self.fc(x.mean(dim=(2, 3)))


def unexportable(in_channels, num_classes):
    return KthValueNet(in_channels, num_classes)


def needs_rgb(num_classes):  # a fixed 3-channel first layer: the digits have 1 channel
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


class TupleNet(nn.Module):  # logits and features, as some research code returns them
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        features = self.conv(x).mean(dim=(2, 3))
        return self.fc(features), features


def returns_a_tuple(in_channels, num_classes):
    return TupleNet(in_channels, num_classes)


def seven_classes(in_channels):  # ignores num_classes
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 7))
'''


class _RunsCodeWhenUnpickled:
    """A checkpoint payload that creates ``marker`` if unpickled with ``weights_only=False``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class Inputs:
    """Writes the files a case needs into ``root`` (the test's tmp_path) before the test notes what exists."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.storage = root / "runs"  # storage.path of every compress case

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def models(self) -> Path:
        return self.file("models.py", USER_MODELS)

    def checkpoint(self, name: str = "baseline.pt", *, model: str = "resnet20", header: str | None = None,
                   input_shape: tuple[int, int, int] = DIGITS, num_classes: int = 10) -> Path:
        """A pf-ray checkpoint of ``model`` (fresh weights) whose header says ``header`` (default: the same)."""
        torch.manual_seed(0)
        net = build_model(ModelConfig(model), in_channels=input_shape[0], num_classes=num_classes)
        return save_checkpoint(self.root / name, net, model_config=ModelConfig(header or model),
                               input_shape=input_shape, num_classes=num_classes)

    def raw_checkpoint(self, name: str, payload: object) -> Path:
        path = self.root / name
        torch.save(payload, path)
        return path

    def header(self, **changes: object) -> dict:
        """A pf-ray checkpoint payload of resnet20 on digits, with some entries replaced."""
        net = build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10)
        payload = {"format": FORMAT, "model": to_dict(ModelConfig("resnet20")), "input_shape": list(DIGITS),
                   "num_classes": 10, "state_dict": net.state_dict(), "metrics": {}, "extra": {}}
        payload.update(changes)
        return payload

    def image_folder(self, *, classes_train=("a", "b"), classes_val=("a", "b"), corrupt: bool = False) -> Path:
        from PIL import Image

        root = self.root / "images"
        for split, classes in (("train", classes_train), ("val", classes_val)):
            for label in classes:
                folder = root / split / label
                folder.mkdir(parents=True)
                for index in range(3):
                    Image.new("L", (8, 8), color=40 * index).save(folder / f"{index}.png")
        if corrupt:
            (root / "train" / classes_train[0] / "broken.png").write_bytes(b"\x89PNG not really")
        return root


def compress(inputs: Inputs, *overrides: str, config: Path | None = None) -> list[str]:
    """``pf-ray compress [CONFIG] --set storage.path=<tmp>/runs --set dataset.name=digits --set ...``."""
    argv = ["compress", *([str(config)] if config else [])]
    for override in (f"storage.path={inputs.storage}", "dataset.name=digits", *overrides):
        argv += ["--set", override]
    return argv


def sets(*overrides: str) -> Callable[[Inputs], list[str]]:
    return lambda inputs: compress(inputs, *overrides)


def yaml_file(text: str | bytes) -> Callable[[Inputs], list[str]]:
    return lambda inputs: compress(inputs, config=inputs.file("experiment.yaml", text))


def user_model(function: str, *overrides: str) -> Callable[[Inputs], list[str]]:
    return lambda inputs: compress(inputs, f"model.name={inputs.models()}:{function}", *overrides)


def checkpoint(make: Callable[[Inputs], Path]) -> Callable[[Inputs], list[str]]:
    return lambda inputs: compress(inputs, f"baseline.checkpoint={make(inputs)}")


def _verify_args(inputs: Inputs, name: str, content: bytes, *options: str) -> list[str]:
    return ["verify", str(inputs.file(name, content)), *options]


def _unexportable_checkpoint(inputs: Inputs) -> Path:
    reference = f"{inputs.models()}:unexportable"
    torch.manual_seed(0)
    net = build_model(ModelConfig(reference), in_channels=1, num_classes=10)
    return save_checkpoint(inputs.root / "odd.pt", net, model_config=ModelConfig(reference), input_shape=DIGITS,
                           num_classes=10, extra={"dataset": {"name": "digits"}})


def _broken_manifest_verify(inputs: Inputs) -> list[str]:
    inputs.file("artifacts/manifest.json", "{not json")
    return ["verify", str(inputs.file("artifacts/model.onnx", b"\x00" * 16)), "--dataset", "digits"]


def _malformed_run_config(inputs: Inputs) -> list[str]:
    inputs.file("run/config.yaml", "model: [unclosed\n")
    return ["report", str(inputs.root / "run")]


def _remote_run_with_a_local_storage_path(inputs: Inputs) -> list[str]:
    inputs.file("bucket/run/config.yaml", f"storage: {{path: {inputs.root / 'runs'}}}\n")
    return ["resume", f"file://{inputs.root}/bucket/run", "--staging", str(inputs.root / "new")]


def _corrupt_idx_files(inputs: Inputs) -> list[str]:
    for name in FASHION_MNIST_FILES.values():
        inputs.file(f"fmnist/{name}", b"garbage, not IDX")
    return compress(inputs, "dataset.name=fashion_mnist", f"dataset.data_dir={inputs.root / 'fmnist'}")


def _python_tag(inputs: Inputs) -> list[str]:
    """YAML that would create a file in tmp_path if it were loaded unsafely (the snapshot would show it)."""
    text = f"seed: !!python/object/apply:os.system ['touch {inputs.root / 'executed'}']\n"
    return compress(inputs, config=inputs.file("experiment.yaml", text))


def _existing_run_folder(inputs: Inputs) -> list[str]:
    (inputs.storage / "taken").mkdir(parents=True)
    return compress(inputs, "storage.name=taken")


CASES = [
    # -- unknown names --------------------------------------------------------------------------------------------
    pytest.param(sets("serch.num_trials=3"), ["unknown field serch; valid fields of ExperimentConfig: model"],
                 id="unknown-top-level-key"),
    pytest.param(sets("search.num_trails=3"), ["unknown field search.num_trails; valid fields of search"],
                 id="unknown-nested-key"),
    pytest.param(sets("learner.options.keep=0.5"), ["unknown field learner.options.keep; valid fields"],
                 id="unknown-learner-option"),
    pytest.param(sets("model.name=resnet21"), ["model.name: unknown model 'resnet21'; known: mobilenet_v1"],
                 id="unknown-model"),
    pytest.param(sets("learner.name=lasso"), ["unknown learner 'lasso'; known: channel_pruning"],
                 id="unknown-learner"),
    pytest.param(sets("search.algorithm=grid"), ["search.algorithm: got 'grid'; allowed: random, tpe, gp, ddpg"],
                 id="unknown-searcher"),
    pytest.param(sets("dataset.name=mnist"), ["dataset.name: unknown dataset 'mnist'; known: cifar10, digits"],
                 id="unknown-dataset"),
    pytest.param(sets("export.formats=[onnx, tflite]"), ["export.formats: got 'tflite'; allowed: onnx"],
                 id="unknown-export-format"),
    pytest.param(sets("search.scoring=fast"), ["search.scoring: got 'fast'; allowed: fine_tuned, proxy"],
                 id="unknown-scoring"),
    pytest.param(sets("search.reward=speed"), ["search.reward: got 'speed'; allowed: accuracy, amc, latency"],
                 id="unknown-reward"),
    pytest.param(sets("target.threads=0"), ["target.threads: got 0; allowed range is [1, 256]"],
                 id="target-without-threads"),
    pytest.param(sets("target.runtime=tflite"), ["target.runtime: got 'tflite'; allowed: onnxruntime, executorch"],
                 id="unknown-target-runtime"),
    pytest.param(sets("search.budget=latency", "search.target_speedup=1"),
                 ["search.target_speedup: got 1.0; allowed range is (1, 1000]"], id="speedup-of-one"),
    pytest.param(sets("retrain.num_workers=0"), ["retrain.num_workers: got 0; allowed range is [1, inf]"],
                 id="retrain-without-workers"),
    pytest.param(sets("retrain.num_workers=64", "resources.num_cpus=2"),
                 ["retrain.num_workers: got 64; the local Ray has 2 CPUs"], id="retrain-workers-beyond-the-cpus"),
    pytest.param(sets("retrain.train.epochs=0"), ["retrain.train.epochs: got 0; allowed range is [1, inf]"],
                 id="retrain-without-epochs"),
    pytest.param(sets("learner.options.criterion=random"), ["learner.options.criterion: got 'random'; allowed"],
                 id="unknown-pruning-criterion"),
    pytest.param(sets("learner.options.mode=greedy"), ["learner.options.mode: got 'greedy'; allowed: uniform"],
                 id="unknown-pruning-mode"),
    # -- wrong types ----------------------------------------------------------------------------------------------
    pytest.param(sets("search.num_trials=lots"), ["search.num_trials: got 'lots' (str); expected an integer"],
                 id="string-for-int"),
    pytest.param(sets("search.num_trials=2.5"), ["search.num_trials: got 2.5 (float); expected an integer"],
                 id="float-for-int"),
    pytest.param(sets("search.num_trials=null"), ["search.num_trials: got None (NoneType); expected an integer"],
                 id="null-for-int"),
    pytest.param(sets("model=[1, 2]"), ["model: got [1, 2] (list); expected a mapping of fields"],
                 id="list-for-section"),
    pytest.param(sets("learner.options=[0.5]"), ["learner.options: got [0.5] (list); expected a mapping"],
                 id="list-for-options-mapping"),
    pytest.param(sets("search.target_macs_ratio=true"),
                 ["search.target_macs_ratio: got True (bool); expected a number"], id="bool-for-float"),
    pytest.param(sets("resources.use_gpu=maybe"), ["resources.use_gpu: got 'maybe' (str); expected true or false"],
                 id="string-for-bool"),
    pytest.param(sets("export.latency_batch_sizes=1"), ["export.latency_batch_sizes: got 1 (int); expected a list"],
                 id="int-for-list"),
    pytest.param(sets("model.name=[resnet20]"), ["model.name: got ['resnet20'] (list); expected a string"],
                 id="list-for-string"),
    # -- out of range ---------------------------------------------------------------------------------------------
    pytest.param(sets("search.fine_tune.epochs=-1"), ["search.fine_tune.epochs: got -1; allowed range is [1, inf]"],
                 id="negative-epochs"),
    pytest.param(sets("search.target_macs_ratio=0"), ["search.target_macs_ratio: got 0.0; allowed range is (0, 1]"],
                 id="target-macs-ratio-0"),
    pytest.param(sets("search.target_macs_ratio=1.5"), ["search.target_macs_ratio: got 1.5; allowed range is (0, 1]"],
                 id="target-macs-ratio-1.5"),
    pytest.param(sets("search.target_macs_ratio=.nan"), ["search.target_macs_ratio: got nan; expected a number"],
                 id="target-macs-ratio-nan"),
    pytest.param(sets("search.num_trials=0"), ["search.num_trials: got 0; allowed range is [1, inf]"],
                 id="num-trials-0"),
    pytest.param(sets("search.reduction_factor=1"), ["search.reduction_factor: got 1; allowed range is [2, inf]"],
                 id="reduction-factor-1"),
    pytest.param(sets("search.grace_period=0"), ["search.grace_period: got 0; allowed range is [1, inf]"],
                 id="grace-period-0"),
    pytest.param(sets("export.max_accuracy_drop=-0.1"), ["export.max_accuracy_drop: got -0.1; allowed range is [0, 1]"],
                 id="negative-max-accuracy-drop"),
    pytest.param(sets("learner.options.min_keep_ratio=1.5"),
                 ["learner.options.min_keep_ratio: got 1.5; allowed range is (0, 1]"], id="min-keep-ratio-1.5"),
    pytest.param(sets("learner.options.keep_ratio=0"), ["learner.options.keep_ratio: got 0.0; allowed range is (0, 1]"],
                 id="keep-ratio-0"),
    pytest.param(sets("export.opset=9"), ["export.opset: got 9; allowed range is [13, 20]"], id="opset-9"),
    pytest.param(sets("baseline.train.learning_rate=-1"),
                 ["baseline.train.learning_rate: got -1.0; allowed range is (0, 10]"], id="negative-learning-rate"),
    pytest.param(sets("dataset.validation_fraction=0.9"),
                 ["dataset.validation_fraction: got 0.9; allowed range is (0, 0.5]"], id="validation-fraction-0.9"),
    pytest.param(sets("dataset.train_subset=0"), ["dataset.train_subset: got 0; allowed range is [1, inf]"],
                 id="train-subset-0"),
    pytest.param(sets("resources.num_cpus=0"), ["resources.num_cpus: got 0; allowed range is [1, inf]"],
                 id="num-cpus-0"),
    pytest.param(sets("export.latency_batch_sizes=[1, 0]"), ["export.latency_batch_sizes: got 0; allowed range"],
                 id="latency-batch-size-0"),
    pytest.param(sets("model.width_multiplier=0"), ["model.width_multiplier: got 0.0; allowed range is (0, 4]"],
                 id="width-multiplier-0"),
    pytest.param(sets("resources.driver_resource=head-node"),
                 ["resources.driver_resource: 'head-node' is not a resource name"], id="bad-resource-name"),
    # -- inconsistent values --------------------------------------------------------------------------------------
    pytest.param(sets("search.budget=macs", "learner.options.min_keep_ratio=0.9"),
                 ["search.target_macs_ratio: got 0.5; the smallest reachable with round_to=8 and min ratio 0.9"],
                 id="budget-impossible-with-min-keep-ratio"),
    pytest.param(sets("search.target_macs_ratio=0.001"),
                 ["search.target_macs_ratio: got 0.001; the smallest reachable"], id="budget-impossible-for-model"),
    pytest.param(sets("search.budget=macs", "search.target_speedup=[2, 3]"),
                 ["search.target_speedup: got [2.0, 3.0] with search.budget macs; several targets need search.budget "
                  "latency"], id="pareto-set-with-a-macs-budget"),
    pytest.param(sets("search.target_macs_ratio=0.4", "search.target_speedup=[2, 3]"),
                 ["search.target_speedup: got [2.0, 3.0]; several targets need a latency budget, and search.budget "
                  "auto resolves to macs here"], id="pareto-set-where-auto-resolves-to-macs"),
    pytest.param(sets("learner.options.depth=maybe"),
                 ["learner.options.depth: got 'maybe'; expected true, false or 'auto'"], id="depth-not-a-choice"),
    pytest.param(sets("search.budget=latency", "search.target_speedup=[2, 0.5]"),
                 ["search.target_speedup[1]: got 0.5; allowed range is (1, 1000]"], id="pareto-set-with-a-slowdown"),
    pytest.param(sets("search.budget=latency", "learner.options.mode=uniform"),
                 ["search.budget: got 'latency'; learner channel_pruning searches no per-layer values here"],
                 id="latency-budget-without-a-search"),
    pytest.param(sets("search.budget=latency", "learner.name=full_precision"),
                 ["search.budget: got 'latency'; learner full_precision searches no per-layer values"],
                 id="latency-budget-for-full-precision"),
    pytest.param(sets("search.budget=latency", "learner.name=weight_sparsification"),
                 ["search.budget: got 'latency'; weight_sparsification cannot be budgeted in latency"],
                 id="latency-budget-for-sparsity"),
    pytest.param(sets("search.budget=latency", "export.formats=[onnx]"),
                 ["export.formats: got ['onnx']; search.budget latency on onnxruntime int8, 1 thread, batch 1 "
                  "needs 'onnx_int8' among them"], id="latency-budget-without-the-target-artifact"),
    pytest.param(sets("resources.num_cpus=2", "resources.workers_per_trial=4"),
                 ["resources.workers_per_trial: one trial needs 4.25 CPUs", "the cluster has 2"],
                 id="more-workers-than-cpus"),
    pytest.param(sets("resources.num_cpus=1", "resources.cpus_per_trial=2"),
                 ["resources.cpus_per_trial: got 2", "the cluster has 1"], id="more-cpus-per-trial-than-cpus"),
    pytest.param(sets("resources.driver_resource=pf_ray_driver", "resources.use_gpu=true"),
                 ["resources.driver_resource: got 'pf_ray_driver' with use_gpu and workers_per_trial 1"],
                 id="driver-on-head-cannot-train-on-gpu"),
    pytest.param(sets("model.width_multiplier=1.5"),
                 ["model.width_multiplier: got 1.5; model 'resnet20' has no width multiplier"],
                 id="width-multiplier-on-resnet"),
    pytest.param(sets("learner.options.mode=uniform", "learner.options.layer_keep_ratios=[0.5, 0.5]"),
                 ["learner.options.layer_keep_ratios: got 2 values with mode 'uniform'"],
                 id="ratios-with-uniform-mode"),
    pytest.param(sets("learner.options.mode=list"), ["learner.options.mode: got 'list' without layer_keep_ratios"],
                 id="list-mode-without-ratios"),
    pytest.param(lambda inputs: compress(inputs, f"learner.options.ratios_file={inputs.file('r.txt', '0.5')}"),
                 ["learner.options.ratios_file: got", "with mode 'auto'"], id="ratios-file-with-auto-mode"),
    pytest.param(lambda inputs: compress(inputs, "learner.options.mode=list",
                                         f"learner.options.ratios_file={inputs.root / 'none.txt'}"),
                 ["learner.options.ratios_file: ", "none.txt' does not exist"], id="ratios-file-missing"),
    pytest.param(lambda inputs: compress(inputs, "learner.options.mode=list",
                                         f"learner.options.ratios_file={inputs.file('r.txt', '0.5, half')}"),
                 ["learner.options.ratios_file: ", "r.txt' is not a list of numbers"], id="ratios-file-not-numbers"),
    pytest.param(lambda inputs: compress(inputs, "learner.options.mode=list",
                                         f"learner.options.ratios_file={inputs.file('r.bin', bytes(range(256)))}"),
                 ["learner.options.ratios_file: ", "r.bin' is not"], id="ratios-file-binary"),
    pytest.param(sets("learner.options.mode=list", "learner.options.layer_keep_ratios=[0.5, 0.5]"),
                 ["learner.options.layer_keep_ratios: got 2 values; expected 12"], id="ratios-count-wrong-for-model"),
    pytest.param(sets("learner.name=discrimination_aware_pruning", "learner.options.num_stages=100"),
                 ["learner.options.num_stages: got 100; this model has 12 prunable channel groups"],
                 id="more-dcp-stages-than-groups"),
    pytest.param(user_model("linear_only", "learner.options.mode=uniform"),
                 ["channel_pruning: the model (Sequential) has no prunable channel group"],
                 id="nothing-prunable-uniform-mode"),
    pytest.param(yaml_file('dataset: {data_dir: "~nosuchuser_pf/data"}\n'),
                 ["dataset.data_dir: got '~nosuchuser_pf/data'; '~nosuchuser_pf' is no user's home folder"],
                 id="path-of-unknown-user"),
    pytest.param(yaml_file('baseline: {checkpoint: "model\\0.pt"}\n'),
                 ["baseline.checkpoint: got 'model\\x00.pt'; a path cannot hold a NUL byte"], id="path-with-nul-byte"),
    pytest.param(sets("storage.path=~nosuchuser_pf/runs"), ["storage.path: got '~nosuchuser_pf/runs'; "],
                 id="storage-path-of-unknown-user"),
    pytest.param(sets("storage.path=ftp://host/runs"),
                 ["storage.path: got 'ftp://host/runs'; pf-ray cannot write to ftp:// URIs; allowed: a local folder "
                  "or a URI starting s3://, gs://, gcs://, file://"], id="storage-path-unsupported-uri-scheme"),
    pytest.param(lambda inputs: compress(inputs, "dataset.name=fashion_mnist",
                                         f"dataset.data_dir={inputs.file('fmnist.gz', b'not a folder')}"),
                 ["dataset.data_dir: ", "fmnist.gz' is a file; expected a folder"], id="data-dir-is-a-file"),
    pytest.param(sets("model.name=~nosuchuser_pf/models.py:build"), ["model.name: got '~nosuchuser_pf/models.py"],
                 id="user-model-path-of-unknown-user"),
    pytest.param(_existing_run_folder, ["storage.name: run folder", "taken' already exists"],
                 id="run-folder-exists"),
    # -- config files and --set -----------------------------------------------------------------------------------
    pytest.param(lambda inputs: compress(inputs, config=inputs.root / "missing.yaml"),
                 ["config file ", "missing.yaml' does not exist"], id="config-file-missing"),
    pytest.param(lambda inputs: compress(inputs, config=inputs.root),
                 ["config file ", "cannot be read: Is a directory"], id="config-file-unreadable-directory"),
    pytest.param(yaml_file(b"search:\n  num_trials: \xff\xfe3\n"), ["experiment.yaml' is not UTF-8 text"],
                 id="config-file-not-utf8"),
    pytest.param(yaml_file(""), ["experiment.yaml' is empty"], id="config-file-empty"),
    pytest.param(yaml_file("# only a comment\n"), ["experiment.yaml' is empty"], id="config-file-only-comments"),
    pytest.param(yaml_file("search:\n\tnum_trials: 3\n"), ["experiment.yaml' is not valid YAML at line 2"],
                 id="yaml-tab-indent"),
    pytest.param(yaml_file("search:\n  num_trials: 3\n    algorithm: tpe\n"),
                 ["experiment.yaml' is not valid YAML at line 3"], id="yaml-bad-indent"),
    pytest.param(yaml_file("search: {num_trials: 3\n"), ["experiment.yaml' is not valid YAML at line"],
                 id="yaml-unclosed-brace"),
    pytest.param(yaml_file("- model\n- search\n"),
                 ["experiment.yaml': got ['model', 'search'] (list); expected a mapping of sections"],
                 id="yaml-top-level-list"),
    pytest.param(yaml_file("resnet20\n"), ["experiment.yaml': got 'resnet20' (str); expected a mapping"],
                 id="yaml-top-level-scalar"),
    pytest.param(_python_tag, ["experiment.yaml' is not valid YAML at line 1"], id="yaml-python-tag"),
    pytest.param(yaml_file("seed: 2026-13-45\n"), ["experiment.yaml' is not valid YAML", "month must be in 1..12"],
                 id="yaml-impossible-date"),
    pytest.param(yaml_file("seed: 1" + "0" * 5000 + "\n"), ["experiment.yaml' is not valid YAML"],
                 id="yaml-integer-too-long"),
    pytest.param(sets("search.num_trials"), ["--set 'search.num_trials': expected dotted.key=value"],
                 id="set-without-equals"),
    pytest.param(sets("=3"), ["--set '=3': expected dotted.key=value"], id="set-without-key"),
    pytest.param(sets("search..num_trials=3"), ["--set 'search..num_trials=3': empty key"], id="set-empty-key-part"),
    pytest.param(sets("model.name=resnet20", "model.name.depth=3"),
                 ["--set 'model.name.depth=3': model.name is not a section"], id="set-into-a-value"),
    pytest.param(sets("seed=" + "9" * 5000), ["seed: got '99999", "...9' (str); expected an integer"],
                 id="set-integer-too-long"),
    # -- checkpoints ----------------------------------------------------------------------------------------------
    pytest.param(checkpoint(lambda inputs: inputs.root / "missing.pt"), ["checkpoint ", "missing.pt' does not exist"],
                 id="checkpoint-missing"),
    pytest.param(checkpoint(lambda inputs: inputs.root), ["checkpoint ", "' does not exist"],
                 id="checkpoint-is-a-directory"),
    pytest.param(checkpoint(lambda inputs: inputs.file("random.pt", os.urandom(4096))),
                 ["random.pt' cannot be read (", "not a pf-ray checkpoint or corrupt"], id="checkpoint-random-bytes"),
    pytest.param(checkpoint(lambda inputs: inputs.file("empty.pt", b"")), ["empty.pt' cannot be read"],
                 id="checkpoint-empty-file"),
    pytest.param(checkpoint(lambda inputs: inputs.file("cut.pt", inputs.checkpoint("whole.pt").read_bytes()[:5000])),
                 ["cut.pt' cannot be read"], id="checkpoint-truncated"),
    pytest.param(checkpoint(lambda inputs: inputs.raw_checkpoint("weights.pt", nn.Linear(2, 2).state_dict())),
                 ["baseline.checkpoint: ", "weights.pt' is not a state dict of model 'resnet20': it has no tensor "
                  "'conv1.weight' (shape (16, 1, 3, 3)) nor "], id="state-dict-of-another-model"),
    pytest.param(checkpoint(lambda inputs: inputs.raw_checkpoint(
        "resnet32.pt", build_model(ModelConfig("mobilenet_v1"), in_channels=1, num_classes=10).state_dict())),
                 ["resnet32.pt' is not a state dict of model 'resnet20': it has no tensor "],
                 id="state-dict-of-another-architecture"),
    pytest.param(checkpoint(lambda inputs: inputs.raw_checkpoint(
        "wide.pt", {key: torch.cat([value, value]) if key == "conv1.weight" else value for key, value in
                    build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10).state_dict().items()})),
                 ["wide.pt' is not a state dict of model 'resnet20': tensor 'conv1.weight' has shape (32, 1, 3, 3) "
                  "in the file and (16, 1, 3, 3) in the model"], id="state-dict-shape-mismatch"),
    pytest.param(checkpoint(lambda inputs: inputs.raw_checkpoint(
        "whole.pt", build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10))),
                 ["baseline.checkpoint: ", "whole.pt' is a whole pickled model (a pf_ray.models.resnet_cifar.",
                  "save them with torch.save(model.state_dict(), path)"], id="checkpoint-whole-pickled-model"),
    pytest.param(checkpoint(lambda inputs: inputs.raw_checkpoint("list.pt", [torch.zeros(2)])),
                 ["list.pt' holds a list; expected a pf-ray checkpoint or a state dict"],
                 id="checkpoint-neither-checkpoint-nor-state-dict"),
    pytest.param(checkpoint(lambda inputs: inputs.checkpoint(model="resnet32")),
                 ["baseline.checkpoint: ", "holds model 'resnet32'; model.name is 'resnet20'"],
                 id="checkpoint-other-architecture"),
    pytest.param(checkpoint(lambda inputs: inputs.checkpoint(model="mobilenet_v1", header="resnet20")),
                 ["baseline.pt' does not match model 'resnet20'"], id="checkpoint-weights-of-other-architecture"),
    pytest.param(checkpoint(lambda inputs: inputs.checkpoint(input_shape=(3, 32, 32))),
                 ["was trained on inputs (3, 32, 32); the dataset gives (1, 8, 8)"], id="checkpoint-wrong-input-shape"),
    pytest.param(checkpoint(lambda inputs: inputs.checkpoint(num_classes=100)),
                 ["baseline.pt' has 100 classes; the dataset has 10"], id="checkpoint-wrong-class-count"),
    pytest.param(checkpoint(lambda inputs: inputs.raw_checkpoint("header.pt", inputs.header(input_shape="abc"))),
                 ["header.pt' has a malformed header"], id="checkpoint-malformed-header"),
    pytest.param(checkpoint(lambda inputs: inputs.raw_checkpoint(
        "unknown.pt", inputs.header(model={"name": "resnet21"}))),
                 ["unknown.pt': cannot rebuild its model", "unknown model 'resnet21'"],
                 id="checkpoint-unknown-model"),
    # -- datasets -------------------------------------------------------------------------------------------------
    pytest.param(lambda inputs: compress(inputs, "dataset.name=fashion_mnist",
                                         f"dataset.data_dir={inputs.root / 'nowhere'}"),
                 ["dataset.data_dir: ", "nowhere' does not exist"], id="data-dir-missing"),
    pytest.param(lambda inputs: compress(inputs, "dataset.name=fashion_mnist", f"dataset.data_dir={inputs.root}"),
                 ["dataset 'fashion_mnist' not found; searched: ", "hint: "], id="data-dir-without-dataset"),
    pytest.param(_corrupt_idx_files, ["train-images-idx3-ubyte: not an IDX file of this kind: magic number"],
                 id="idx-files-corrupt"),
    pytest.param(lambda inputs: compress(inputs, "dataset.name=cifar10",
                                         f"dataset.data_dir={inputs.file('cifar/test_batch', b'x').parent}"),
                 ["data_batch_1: missing (a CIFAR-10 folder holds data_batch_1"], id="cifar10-folder-incomplete"),
    pytest.param(sets("dataset.name=imagefolder"), ["dataset.data_dir: got None; the imagefolder dataset needs"],
                 id="imagefolder-without-data-dir"),
    pytest.param(lambda inputs: compress(inputs, "dataset.name=imagefolder", f"dataset.data_dir={inputs.root}"),
                 ["needs subfolders train/ and val/ (or test/); found: none"], id="imagefolder-without-splits"),
    pytest.param(lambda inputs: compress(inputs, "dataset.name=imagefolder",
                                         f"dataset.data_dir={inputs.image_folder(classes_val=('a', 'c'))}"),
                 ["has classes ['a', 'b'] but", "['a', 'c']; they must match"], id="imagefolder-classes-differ"),
    pytest.param(lambda inputs: compress(inputs, "dataset.name=imagefolder",
                                         f"dataset.data_dir={inputs.image_folder(corrupt=True)}"),
                 ["broken.png: not a readable image"], id="imagefolder-corrupt-image"),
    # -- user models ----------------------------------------------------------------------------------------------
    pytest.param(lambda inputs: compress(inputs, f"model.name={inputs.root / 'nope.py'}:build"),
                 ["model.name: file ", "nope.py' does not exist"], id="user-model-file-missing"),
    pytest.param(user_model("build"),
                 ["model.name: ", "models.py' has no function 'build'; its callables: KthValueNet, TupleNet, broken"],
                 id="user-model-no-such-function"),
    pytest.param(user_model("NOT_CALLABLE"), ["model.name: ", "models.py:NOT_CALLABLE is a int, not a function"],
                 id="user-model-not-callable"),
    pytest.param(user_model("not_a_module"), ["models.py:not_a_module' returned a str; expected a torch.nn.Module"],
                 id="user-model-returns-non-module"),
    pytest.param(user_model("broken"), ["models.py:broken' raised RuntimeError: out of memory on purpose"],
                 id="user-model-raises"),
    pytest.param(user_model("linear_only"), ["channel_pruning: the model (Sequential) has no prunable channel group"],
                 id="user-model-nothing-prunable"),
    pytest.param(user_model("needs_rgb"), ["model.name: ", "models.py:needs_rgb' does not accept inputs of shape "
                                           "(1, 8, 8) (the dataset's channels, height, width): RuntimeError: "],
                 id="user-model-rejects-the-input-shape"),
    pytest.param(user_model("returns_a_tuple"), ["models.py:returns_a_tuple' returned a tuple for a batch of inputs "
                                                 "(1, 8, 8); expected a tensor of logits (batch, 10)"],
                 id="user-model-returns-a-tuple"),
    pytest.param(user_model("seven_classes"), ["models.py:seven_classes' returned logits of shape (2, 7) for a batch "
                                               "of 2 inputs (1, 8, 8); expected (2, 10) for 10 classes"],
                 id="user-model-wrong-class-count"),
    pytest.param(user_model("flatten_only"), ["the model has no parameters; there are no channels to prune"],
                 id="user-model-no-parameters"),
    pytest.param(user_model("unexportable", "model.width_multiplier=0.5"),
                 ["model.width_multiplier: got 0.5; ", "takes no width_multiplier argument"],
                 id="user-model-without-width-multiplier"),
    pytest.param(lambda inputs: compress(inputs, f"model.name={inputs.file('bad.py', 'def build(:')}:build"),
                 ["model.name: importing ", "bad.py' failed: SyntaxError"], id="user-model-syntax-error"),
    pytest.param(sets("model.name=no_such_package_xyz.models:build"),
                 ["model.name: importing module 'no_such_package_xyz.models' failed: ModuleNotFoundError"],
                 id="user-model-module-missing"),
    # -- export, verify, report -----------------------------------------------------------------------------------
    pytest.param(lambda inputs: ["export", str(inputs.root / "missing.pt")], ["checkpoint ", "missing.pt' does not"],
                 id="export-missing-checkpoint"),
    pytest.param(lambda inputs: ["export", str(inputs.file("random.pt", os.urandom(2048))), "--dataset", "digits"],
                 ["random.pt' cannot be read ("], id="export-corrupt-checkpoint"),
    pytest.param(lambda inputs: ["export", str(_unexportable_checkpoint(inputs)), "--formats", "onnx",
                                 "--model", f"{inputs.models()}:unexportable"],
                 ["cannot export KthValueNet to ONNX (opset 17, input shape (1, 8, 8))", "aten::kthvalue"],
                 id="export-model-the-exporter-cannot-handle"),
    pytest.param(lambda inputs: ["export", str(_unexportable_checkpoint(inputs)), "--formats", "onnx", "onnx_int8",
                                 "--model", f"{inputs.models()}:unexportable",
                                 "--out", str(inputs.root / "new" / "folders")],
                 ["cannot export KthValueNet to ONNX"], id="export-unexportable-into-new-folders"),
    pytest.param(lambda inputs: ["export", str(_unexportable_checkpoint(inputs)), "--formats", "onnx"],
                 ["odd.pt' names the user model ", "which pf-ray imports only when you name it yourself"],
                 id="export-checkpoint-naming-a-user-model-not-named"),
    pytest.param(lambda inputs: ["export", str(inputs.checkpoint()), "--formats", "tflite"],
                 ["export.formats: got 'tflite'; allowed: onnx"], id="export-unknown-format"),
    pytest.param(lambda inputs: ["export", str(inputs.checkpoint()), "--threads", "0"],
                 ["export.latency_threads: got 0; allowed range is [1, inf]"], id="export-zero-threads"),
    pytest.param(lambda inputs: ["export", str(inputs.checkpoint())],
                 ["--dataset: nothing records which dataset this model was trained on"], id="export-dataset-unknown"),
    pytest.param(lambda inputs: ["export", str(inputs.checkpoint(input_shape=(3, 32, 32))), "--dataset", "digits"],
                 ["was trained on inputs (3, 32, 32); the dataset gives (1, 8, 8)"], id="export-dataset-wrong-shape"),
    pytest.param(lambda inputs: ["verify", str(inputs.root / "missing.onnx"), "--dataset", "digits"],
                 ["artifact: ", "missing.onnx' does not exist"], id="verify-missing-file"),
    pytest.param(lambda inputs: _verify_args(inputs, "model.tflite", b"TFL3", "--dataset", "digits"),
                 ["cannot tell the format of 'model.tflite'; known endings: .int8.onnx"], id="verify-unknown-suffix"),
    pytest.param(lambda inputs: _verify_args(inputs, "model.onnx", b"PK\x03\x04 a zip, not ONNX", "--dataset",
                                             "digits"),
                 ["ONNX Runtime cannot load ", "model.onnx'"], id="verify-non-onnx-named-onnx"),
    pytest.param(lambda inputs: _verify_args(inputs, "model.pte", b"not a program", "--dataset", "digits"),
                 ["model.pte"], id="verify-non-pte-named-pte"),
    pytest.param(lambda inputs: _verify_args(inputs, "model.onnx", b"x", "--dataset", "digits", "--repeats", "0"),
                 ["--repeats: got 0; allowed range is [1, inf]"], id="verify-zero-repeats"),
    pytest.param(lambda inputs: _verify_args(inputs, "model.onnx", b"x"),
                 ["--dataset: nothing records which dataset"], id="verify-dataset-unknown"),
    pytest.param(lambda inputs: _verify_args(inputs, "model.onnx", b"x", "--dataset", "mnist"),
                 ["dataset.name: unknown dataset 'mnist'"], id="verify-unknown-dataset"),
    pytest.param(lambda inputs: _verify_args(inputs, "model.onnx", b"x", "--dataset", "digits", "--checkpoint",
                                             str(inputs.checkpoint(input_shape=(3, 32, 32)))),
                 ["was trained on inputs (3, 32, 32); the dataset gives (1, 8, 8)"],
                 id="verify-checkpoint-wrong-shape"),
    pytest.param(_broken_manifest_verify, ["manifest.json: cannot be read as JSON"], id="verify-broken-manifest"),
    pytest.param(lambda inputs: ["report", str(inputs.root)],
                 ["run_dir: ", "is not a pf-ray run folder (it has no config.yaml)"],
                 id="report-not-a-run-folder"),
    pytest.param(lambda inputs: ["report", str(inputs.root / "gone")],
                 ["run_dir: ", "gone' is not a pf-ray run folder (it does not exist)"],
                 id="report-missing-folder"),
    pytest.param(_malformed_run_config, ["config.yaml is not valid YAML at line 2, column 1: expected"],
                 id="report-malformed-config"),
    pytest.param(lambda inputs: ["resume", str(inputs.root)], ["is not a pf-ray run folder (it has no config.yaml)"],
                 id="resume-not-a-run-folder"),
    pytest.param(lambda inputs: ["resume", f"file://{inputs.root}/gone", "--staging", str(inputs.root / "new")],
                 ["gone' is not a pf-ray run folder (it has no config.yaml)"], id="resume-uri-not-a-run-folder"),
    pytest.param(_remote_run_with_a_local_storage_path,
                 ["storage.path is ", "not a URI; resume it from its local folder"], id="resume-uri-of-a-local-run"),
    pytest.param(lambda inputs: ["resume", str(inputs.root), "--staging", str(inputs.root / "new")],
                 ["--staging: got ", "with the local run folder"], id="resume-staging-without-a-uri"),
    pytest.param(lambda inputs: ["resume", "ftp://host/runs/tiny"],
                 ["run_dir: got 'ftp://host/runs/tiny'; pf-ray cannot read ftp:// URIs; allowed: a local run folder "
                  "or a URI starting s3://, gs://, gcs://, file://"], id="resume-unsupported-uri-scheme"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root``: (size, modification time in ns)."""
    entries = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder) / name
            stat = path.lstat()
            entries[str(path.relative_to(root))] = (stat.st_size if name in files else 0, stat.st_mtime_ns)
    return entries


@pytest.fixture(autouse=True)
def _preflight_must_refuse(monkeypatch):
    """Fail at once (instead of starting Ray and training) if ``preflight`` accepts a case."""
    real_preflight = pipeline.preflight

    def preflight(*args, **kwargs):
        real_preflight(*args, **kwargs)
        raise AssertionError("preflight accepted this input")

    monkeypatch.setattr(pipeline, "preflight", preflight)


def test_the_bad_inputs_reach_every_section_of_the_experiment():
    """At least forty distinct cases, and every section of the experiment has one: a section without a bad-input
    case is a section whose errors nobody checks (retrain had none, and retrain.num_workers=0 failed only after
    the search)."""
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids) >= 40
    sections = {field.name for field in dataclasses.fields(ExperimentConfig)}
    reached = {section for section in sections for case in CASES for part in case.values[1]
               if f"{section}." in part or part.startswith(f"{section}:")}
    assert sorted(sections - reached) == []


@pytest.mark.parametrize(("build", "expected"), CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capfd, build, expected):
    inputs = Inputs(tmp_path)
    argv = build(inputs)
    before = _snapshot(tmp_path)
    code = main(argv)
    _, err = capfd.readouterr()
    assert code == EXIT_BAD_INPUT, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pf-ray: error: "), err
    for part in expected:
        assert part in lines[0]
    assert _snapshot(tmp_path) == before


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused_unexecuted(tmp_path, capfd):
    marker = tmp_path / "executed"
    payload = Inputs(tmp_path).header(extra={"note": _RunsCodeWhenUnpickled(marker)})
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    before = _snapshot(tmp_path)
    code = main(compress(Inputs(tmp_path), f"baseline.checkpoint={path}"))
    _, err = capfd.readouterr()
    assert code == EXIT_BAD_INPUT
    assert err.splitlines() == [err.strip()] and "evil.pt' cannot be read (UnpicklingError)" in err
    assert not marker.exists()
    assert _snapshot(tmp_path) == before


def test_the_learners_check_refuses_what_prepare_would():
    """What ``preflight`` calls: each learner's ``check`` raises, before any data is read, what its
    ``prepare`` would raise later on this model."""
    from pf_ray.errors import ConfigError, ModelError
    from pf_ray.spec import load_spec

    resnet = build_model(ModelConfig("resnet20"), in_channels=1, num_classes=10)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cases = [
        (["learner.options.mode=list", "learner.options.layer_keep_ratios=[0.5, 0.5]"], resnet, ConfigError,
         "learner.options.layer_keep_ratios: got 2 values; expected 12"),
        (["learner.options.mode=uniform"], linear, ModelError, "(Sequential) has no prunable channel group"),
        (["learner.name=discrimination_aware_pruning", "learner.options.num_stages=13"], resnet, ConfigError,
         "learner.options.num_stages: got 13; this model has 12 prunable channel groups"),
        (["learner.name=discrimination_aware_pruning"], linear, ModelError, "has no prunable channel group"),
    ]
    for overrides, model, error, message in cases:
        learner = load_spec(None, overrides).build_learner()
        with pytest.raises(error) as raised:
            learner.check(model, DIGITS)
        assert message in str(raised.value)
    fine = load_spec(None, ["learner.options.mode=list", f"learner.options.layer_keep_ratios={[0.5] * 12}"])
    fine.build_learner().check(resnet, DIGITS)
    load_spec(None, ["learner.name=full_precision"]).build_learner().check(linear, DIGITS)
