"""Run inside the emulator by the arm64 Python: one ``.onnx`` / ``.ort`` file on ONNX Runtime's ARM kernels, images
in (``.npy``, float32, N x C x H x W), logits out (``.npy``).

It runs in isolated mode (``python3.11 -I -S``) with only the standard library, numpy and onnxruntime, which are
imported from ``--site`` once the arguments are read: nothing of pf_ray, and nothing of the host's Python. The
session is set up as ``pf_ray.export.verify.onnx_session`` sets up the host's, so both runtimes run the same graph
optimisations. Prints one JSON line describing the run (machine, runtime versions, the CPU as the guest sees it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one artifact on aarch64 ONNX Runtime: images .npy -> logits .npy")
    parser.add_argument("artifact")
    parser.add_argument("images")
    parser.add_argument("logits")
    parser.add_argument("--site", required=True, help="the folder holding the aarch64 numpy and onnxruntime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    sys.path.insert(0, args.site)
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(args.artifact, options, providers=["CPUExecutionProvider"])
    images = np.load(args.images).astype(np.float32, copy=False)
    name = session.get_inputs()[0].name
    logits = [session.run(None, {name: images[start:start + args.batch_size]})[0]
              for start in range(0, len(images), args.batch_size)]
    np.save(args.logits, np.concatenate(logits) if logits else np.empty((0, 0), np.float32))
    print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                      "onnxruntime": ort.__version__, "numpy": np.__version__, "cpu_features": _cpu_features()}))
    return 0


def _cpu_features() -> list[str]:
    """The ``Features`` line of ``/proc/cpuinfo`` as the emulator presents it (``asimddp`` = dot product)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("Features"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:  # one line for the host's message (onnxruntime's own exception types among them)
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
