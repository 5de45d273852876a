"""``python -m pf_ray.aarch64``: build (or check) the emulated aarch64 environment; ``make aarch64`` runs it.

Exit codes: 0 ready; 2 it cannot be built (one line on stderr naming the failed step).
"""

from __future__ import annotations

import argparse
import sys

from pf_ray.aarch64.environment import cache_dir, describe, ensure_environment, find_environment
from pf_ray.errors import PfRayError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pf_ray.aarch64",
                                     description="Build (or check) the emulated aarch64 environment.")
    parser.add_argument("--dir", help="where to build it (default: $PF_RAY_AARCH64_DIR, else "
                                      "~/.cache/pf_ray/aarch64)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    parser.add_argument("--check", action="store_true", help="only say whether it is built (exit 1 if not)")
    args = parser.parse_args(argv)
    folder = args.dir or cache_dir()
    if args.check:
        environment = find_environment(folder)
        print(describe(environment) if environment else f"no complete aarch64 environment in {folder}")
        return 0 if environment else 1
    try:
        environment = ensure_environment(folder, force=args.force)
    except PfRayError as error:
        print(f"pf-ray: error: {error}", file=sys.stderr)
        return 2
    print(describe(environment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
