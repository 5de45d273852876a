"""ARM artifacts on aarch64 kernels (issue 16): every artifact of a finished run, on ONNX Runtime's and ExecuTorch's
aarch64 builds under qemu-aarch64 (``pf_ray.aarch64``), on several emulated CPUs, against this machine's x86 runtime
and PyTorch, on the first ``--images`` test images.

Per artifact and CPU: accuracy on aarch64, on x86 and in PyTorch (the model it was exported from: the run's baseline
or compressed checkpoint), top-1 agreement of aarch64 with x86 and with PyTorch, and the largest logit difference
between the architectures. Emulation runs INT8 about 80x and FP32 300-400x slower than native: no latency here.

    python bench/aarch64.py --run runs/NAME --cpus cortex-a53 neoverse-n1 --images 256 --out bench/results/aarch64.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common  # noqa: F401  (first: puts the repository root on sys.path)
import numpy as np
import torch

from pf_ray.aarch64 import ensure_environment, verify_on_aarch64
from pf_ray.checkpoint import load_checkpoint
from pf_ray.config import DatasetConfig
from pf_ray.data import load_data
from pf_ray.latency.cache import cpu_summary
from pf_ray.strict import from_dict

SUFFIXES = (".onnx", ".ort", ".pte")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run folder (results.json, artifacts/)")
    parser.add_argument("--cpus", nargs="+", default=["cortex-a53", "neoverse-n1"])
    parser.add_argument("--images", type=int, default=256, help="the first N test images")
    parser.add_argument("--out", default="bench/results/aarch64.json")
    args = parser.parse_args()
    started = time.perf_counter()
    run = Path(args.run)
    results = json.loads((run / "results.json").read_text())
    data = load_data(from_dict(DatasetConfig, results["config"]["dataset"], path="dataset"))
    count = min(args.images, len(data.test))
    images = torch.stack([data.test[i][0] for i in range(count)])
    labels = np.array([int(data.test[i][1]) for i in range(count)])
    environment = ensure_environment(log=print)
    checkpoints = {"baseline": results["baseline"]["checkpoint"], "compressed": results["compressed"]["checkpoint"]}
    torch_logits = {}
    for stem, path in checkpoints.items():
        model = load_checkpoint(path)[0].eval()
        with torch.no_grad():
            torch_logits[stem] = model(images).numpy()
    rows = []
    for artifact in sorted((run / "artifacts").iterdir()):
        if artifact.suffix not in SUFFIXES:
            continue
        stem = artifact.name.split(".")[0]
        for cpu in args.cpus:
            report = verify_on_aarch64(artifact, images.numpy(), labels, cpu=cpu, torch_logits=torch_logits[stem],
                                       environment=environment)
            row = {key: value for key, value in report.to_dict().items() if key != "runtime"}
            row["path"] = artifact.name
            rows.append(row)
            print(f"{artifact.name:24s} {cpu:12s} aarch64 {100 * report.test_accuracy:6.2f}%  x86 "
                  f"{100 * report.x86_test_accuracy:6.2f}%  PyTorch {100 * report.torch_test_accuracy:6.2f}%  "
                  f"agreement x86 {100 * report.top1_agreement_x86:6.2f}%  PyTorch "
                  f"{100 * report.top1_agreement_torch:6.2f}%  max |logit diff| {report.max_abs_diff_x86:.3g}",
                  flush=True)
    out = {"command": f"python bench/aarch64.py --run RUN --cpus {' '.join(args.cpus)} --images {args.images}",
           "run_command": (run / "command.txt").read_text().strip() if (run / "command.txt").is_file() else None,
           "host_cpu": cpu_summary(), "images": count, "rows": rows, "seconds": round(time.perf_counter() - started)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(rows)} verifications in {out['seconds']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
