"""The ``pf-ray`` command: ``compress`` (the whole pipeline), ``resume`` (continue an interrupted run), ``train``
(cache a baseline), ``export`` (a checkpoint to verified artifacts), ``verify`` (one artifact on its runtime) and
``report`` (rebuild a run's report).

Exit codes: 0 done; 2 bad input (a ``PfRayError``: one line on stderr, nothing half-written); 3 an artifact failed
the accuracy guard (``AccuracyGuardError``: the files and results are kept for inspection). Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from pf_ray.errors import AccuracyGuardError, PfRayError

EXIT_BAD_INPUT = 2
EXIT_GUARD = 3


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="experiment YAML (omit for the embedded default: "
                                                  "ResNet-20 on Fashion-MNIST, channel pruning to 3x faster on "
                                                  "this CPU in ONNX Runtime INT8)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set search.num_trials=16 (repeatable)")


def _add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="dataset to verify on (default: the one recorded with the checkpoint "
                                          "or in the artifact folder's manifest.json)")
    parser.add_argument("--data-dir", help="where the dataset's files are (default: the usual places)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads for timing (ONNX Runtime intra-op; "
                                                                   "ExecuTorch's XNNPACK pool)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="latency batch sizes")
    parser.add_argument("--repeats", type=int, default=200, help="timed runs per batch size")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.02,
                        help="fail (exit 3) if an artifact is this much less accurate than its PyTorch model "
                             "(a fraction; default 0.02 = 2 points)")
    parser.add_argument("--json", action="store_true", help="print the verification as JSON")
    parser.add_argument("--model", metavar="FILE.py:FUNCTION", help="the user model the checkpoint names, if any: "
                                                                    "pf-ray imports a model file only when you "
                                                                    "name it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pf-ray", description="Automated model compression on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    compress = commands.add_parser("compress", help="baseline -> search -> retrain -> export -> verify")
    _add_config_arguments(compress)
    train = commands.add_parser("train", help="train the full-precision baseline and cache it as a checkpoint")
    _add_config_arguments(train)
    train.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")

    export = commands.add_parser("export", help="export a pf-ray checkpoint to verified deployable artifacts")
    export.add_argument("checkpoint", help="a .pt written by pf-ray (e.g. RUN/artifacts/compressed.pt)")
    export.add_argument("--out", help="output folder (default: <checkpoint folder>/<checkpoint name>-export)")
    export.add_argument("--formats", nargs="+", help="formats to write (default: all this installation can: "
                                                     "onnx onnx_int8 ort ort_int8, and pte pte_int8 with ExecuTorch)")
    export.add_argument("--calibration-samples", type=int, default=256, help="training images for INT8")
    _add_verify_arguments(export)

    verify = commands.add_parser("verify", help="run one artifact on its runtime: accuracy, parity, latency")
    verify.add_argument("artifact", help="a .onnx, .ort or .pte file (.int8.onnx etc. for INT8)")
    verify.add_argument("--checkpoint", help="the PyTorch checkpoint it came from: adds parity and the guard")
    verify.add_argument("--arch", choices=["aarch64"], help="run it on emulated aarch64 kernels (qemu-aarch64 and "
                                                            "the runtime's ARM build; set up on first use, see "
                                                            "`make aarch64`) instead of this machine's: accuracy "
                                                            "and top-1 agreement with this machine's runtime, "
                                                            "no latency; the accuracy guard compares it with "
                                                            "both PyTorch and this machine's runtime")
    verify.add_argument("--cpu", help="with --arch aarch64: the emulated CPU: cortex-a53 (default; no dot product), "
                                      "cortex-a72, cortex-a76, neoverse-n1 (dot product), cortex-a710 (I8MM)")
    verify.add_argument("--subset", type=int, help="with --arch aarch64: verify on the first N test images "
                                                   "(default 256: emulation runs 80-400x slower than native)")
    _add_verify_arguments(verify)

    resume = commands.add_parser("resume", help="continue an interrupted run (a killed driver, a lost head "
                                                "node) from its run folder")
    resume.add_argument("run_dir", help="the run folder (holds config.yaml), or with remote storage its URI "
                                        "(s3://bucket/runs/NAME): trusted input, Tune unpickles its saved "
                                        "search state")
    resume.add_argument("--staging", help="with a URI: the local folder to fetch the run folder into (default: "
                                          "the run's storage.staging_path)")

    report = commands.add_parser("report", help="rebuild report.md and report.html of a finished or "
                                                "interrupted run")
    report.add_argument("run_dir", help="the run folder (holds config.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except AccuracyGuardError as error:
        print(f"pf-ray: accuracy guard: {error}", file=sys.stderr)
        return EXIT_GUARD
    except PfRayError as error:
        print(f"pf-ray: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "export":
        return _export(args)
    if args.command == "verify":
        return _verify(args)
    if args.command == "resume":
        from pf_ray.launch import resume

        resume(args.run_dir, staging_path=args.staging)
        return 0
    if args.command == "report":
        from pf_ray.report import write_report

        for path in write_report(args.run_dir):
            print(path)
        return 0

    from pf_ray.config import load_experiment

    config = load_experiment(args.config, args.overrides)
    if args.command == "train":
        from pf_ray.data import load_data
        from pf_ray.launch.baseline import train_baseline
        from pf_ray.launch.preflight import with_absolute_paths

        config = with_absolute_paths(config)
        train_baseline(config, load_data(config.dataset, seed=config.seed), force=args.force)
        return 0
    from pf_ray.launch import compress

    compress(config, command=shlex.join(["pf-ray", *argv]))
    return 0


# --------------------------------------------------------------------------------------------------------------
# export and verify


def _export(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pf_ray.checkpoint import checkpoint_learner, load_checkpoint, read_checkpoint
    from pf_ray.config import ExperimentConfig, ExportConfig, LearnerConfig, default_export_formats
    from pf_ray.data import load_data
    from pf_ray.export.pipeline import LearnerModel, export_and_verify, guard_rows
    from pf_ray.export.verify import accuracy_guard

    export = ExportConfig(formats=tuple(args.formats or default_export_formats()),
                          calibration_samples=args.calibration_samples, latency_threads=args.threads,
                          latency_batch_sizes=tuple(args.batch_sizes), latency_repeats=args.repeats,
                          max_accuracy_drop=args.max_accuracy_drop)
    info, _ = read_checkpoint(args.checkpoint)
    dataset = _dataset_config(args, info.extra, manifest=None)
    data = load_data(dataset)
    model, _ = load_checkpoint(args.checkpoint, expect_input_shape=data.input_shape,
                               expect_num_classes=data.num_classes, user_model=_user_model(args))
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.parent / f"{checkpoint.stem}-export"
    config = replace(ExperimentConfig(), dataset=dataset, export=export)
    learner = checkpoint_learner(info)  # compressed.pt names its learner: its .pfpack and own INT8 files too
    if learner is not None:
        config = replace(config, learner=LearnerConfig(name=info.extra["learner"]))
    rows = export_and_verify({checkpoint.stem: model}, data, config, out, log=_stderr,
                             learner_model=None if learner is None else LearnerModel(checkpoint.stem, learner))
    _print_rows(rows, args.json)
    failures = accuracy_guard(guard_rows(rows), export.max_accuracy_drop)
    if failures:
        raise AccuracyGuardError("; ".join(failures))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pf_ray.checkpoint import load_checkpoint, read_checkpoint
    from pf_ray.data import load_data
    from pf_ray.errors import ConfigError
    from pf_ray.export.manifest import MANIFEST_FILE, check_manifest
    from pf_ray.export.verify import accuracy_guard, artifact_format, verify_artifact
    from pf_ray.metrics import ACCURACY
    from pf_ray.progress import progress_to
    from pf_ray.strict import check_range
    from pf_ray.train import evaluate

    artifact = Path(args.artifact)
    if not artifact.is_file():
        raise ConfigError(f"artifact: {args.artifact!r} does not exist (or is not a file)")
    format_name = artifact_format(artifact)
    for name in ("threads", "repeats"):
        check_range(f"--{name}", getattr(args, name), low=1)
    for name in ("cpu", "subset"):
        if getattr(args, name) is not None and args.arch is None:
            raise ConfigError(f"--{name}: only with --arch aarch64 (this machine's runtime verifies on the whole "
                              f"test set)")
    if args.subset is not None:
        check_range("--subset", args.subset, low=1)
    if args.arch is not None:
        from pf_ray.aarch64 import DEFAULT_CPU, cpu_model

        cpu = cpu_model(args.cpu or DEFAULT_CPU)  # an unknown CPU fails before any data is loaded
    manifest_path = artifact.parent / MANIFEST_FILE
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"{manifest_path}: cannot be read as JSON ({error}); move it away or fix it") \
                from None
    extra: dict[str, Any] = {}
    if args.checkpoint:
        info, _ = read_checkpoint(args.checkpoint)
        extra = info.extra
    data = load_data(_dataset_config(args, extra, manifest=manifest))
    model = None
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint, expect_input_shape=data.input_shape,
                                   expect_num_classes=data.num_classes, user_model=_user_model(args))
    if manifest is not None:
        changed = [p for p in check_manifest(manifest_path) if p.startswith(artifact.name + ":")]
        if changed:
            _stderr(f"warning: {changed[0]} ({manifest_path})")
    if args.arch is not None:
        return _verify_aarch64(args, artifact, data, model, cpu)
    with progress_to(_stderr):  # progress bars on stderr: stdout carries the table (or the JSON)
        report = verify_artifact(artifact, model=model, data=data, threads=args.threads,
                                 batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
                                 format_name=format_name)
    row = {"model": artifact.name, **report.to_dict()}
    if model is not None:
        row["torch_test_accuracy"] = evaluate(model, data.test)[ACCURACY]
    _print_rows([row], args.json)
    failures = accuracy_guard([row], args.max_accuracy_drop) if model is not None else []
    if failures:
        raise AccuracyGuardError("; ".join(failures))
    return 0


def _verify_aarch64(args: argparse.Namespace, artifact: Path, data: Any, model: Any, cpu: str) -> int:
    """``verify --arch aarch64``: the artifact on emulated ARM kernels, against this machine's runtime and PyTorch,
    on the first ``--subset`` test images; the accuracy guard compares it with both."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from pf_ray.aarch64 import ensure_environment, verify_on_aarch64
    from pf_ray.export.onnx import eval_on_cpu
    from pf_ray.export.verify import accuracy_guard

    environment = ensure_environment(log=_stderr)  # built on first use (about 15 s), then a stamp check
    count = min(args.subset or 256, len(data.test))
    batches = list(DataLoader(Subset(data.test, range(count)), batch_size=256, shuffle=False))
    images, labels = torch.cat([batch[0] for batch in batches]), torch.cat([batch[1] for batch in batches])
    torch_logits = None
    if model is not None:
        with eval_on_cpu(model) as cpu_model, torch.inference_mode():
            torch_logits = torch.cat([cpu_model(chunk) for chunk in images.split(256)]).numpy()
    _stderr(f"  {artifact.name}: {count} test images on aarch64 ({cpu}, emulated) ...")
    report = verify_on_aarch64(artifact, images.numpy(), labels.numpy(), cpu=cpu, torch_logits=torch_logits,
                               environment=environment)
    row = {"model": artifact.name, **report.to_dict()}
    if args.json:
        print(json.dumps([row], indent=2))
    else:
        torch_accuracy = ("" if report.torch_test_accuracy is None else
                          f", PyTorch {100 * report.torch_test_accuracy:.2f}%")
        torch_agreement = ("" if report.top1_agreement_torch is None else
                           f", {100 * report.top1_agreement_torch:.1f}% with PyTorch")
        print(f"{artifact.name} [{report.format}] on {report.arch} ({report.cpu}, emulated), {report.num_images} "
              f"test images: accuracy {100 * report.test_accuracy:.2f}% (x86 {100 * report.x86_test_accuracy:.2f}%"
              f"{torch_accuracy}); top-1 agreement {100 * report.top1_agreement_x86:.1f}% with x86"
              f"{torch_agreement}; max |logit diff| with x86 {report.max_abs_diff_x86:.3g}")
    failures = accuracy_guard(report.guard_rows(), args.max_accuracy_drop)
    if failures:
        raise AccuracyGuardError("; ".join(failures))
    return 0


def _dataset_config(args: argparse.Namespace, extra: dict[str, Any], manifest: dict[str, Any] | None):
    """The dataset to verify on: --dataset, else the checkpoint's record, else the artifact folder's manifest."""
    from pf_ray.config import DatasetConfig
    from pf_ray.errors import ConfigError
    from pf_ray.strict import from_dict

    recorded = extra.get("dataset") or (extra.get("config") or {}).get("dataset")
    if args.dataset:
        dataset = DatasetConfig(name=args.dataset)
    elif recorded:
        dataset = from_dict(DatasetConfig, recorded, path="checkpoint dataset")
    elif manifest and manifest.get("preprocessing", {}).get("dataset"):
        dataset = DatasetConfig(name=manifest["preprocessing"]["dataset"])
    else:
        raise ConfigError("--dataset: nothing records which dataset this model was trained on; name it, "
                          "e.g. --dataset fashion_mnist")
    if args.data_dir:
        from dataclasses import replace

        dataset = replace(dataset, data_dir=args.data_dir)
    return dataset


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        latency = ", ".join(f"b{batch} {stats['median_ms']:.3f} ms (p95 {stats['p95_ms']:.3f})"
                            for batch, stats in row["latency"].items())
        parity = ("" if row.get("top1_agreement") is None else
                  f", top-1 agreement {100 * row['top1_agreement']:.1f}%, max |diff| {row['max_abs_diff']:.4f}")
        reference = ("" if "torch_test_accuracy" not in row else
                     f" (PyTorch {100 * row['torch_test_accuracy']:.2f}%)")
        print(f"{Path(row['path']).name} [{row['format']}]: test accuracy {100 * row['test_accuracy']:.2f}%"
              f"{reference}{parity}; {row['size_bytes'] / 1024:.0f} KiB; {latency}")


def _user_model(args: argparse.Namespace) -> str | None:
    """--model, as the checkpoint records it (absolute path), or None."""
    from pf_ray.models import absolute_model_name

    return absolute_model_name(args.model) if args.model else None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
