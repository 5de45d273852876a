"""The ``pf-ray`` command: ``compress`` (the whole pipeline) and ``train`` (cache a baseline).

A ``PfRayError`` (bad input) ends as one line on stderr and exit code 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from pf_ray.errors import PfRayError

EXIT_BAD_INPUT = 2


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="experiment YAML (omit for the embedded default: "
                                                  "ResNet-20 on Fashion-MNIST, channel pruning to 50%% MACs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set search.num_trials=16 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pf-ray", description="Automated model compression on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    compress = commands.add_parser("compress", help="baseline -> search -> retrain -> export -> verify")
    _add_config_arguments(compress)
    train = commands.add_parser("train", help="train the full-precision baseline and cache it as a checkpoint")
    _add_config_arguments(train)
    train.add_argument("--force", action="store_true", help="retrain even if a cached checkpoint exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except PfRayError as error:
        print(f"pf-ray: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from pf_ray.config import load_experiment

    config = load_experiment(args.config, args.overrides)
    if args.command == "train":
        from pf_ray.data import load_data
        from pf_ray.launch import train_baseline, with_absolute_paths

        config = with_absolute_paths(config)
        train_baseline(config, load_data(config.dataset, seed=config.seed), force=args.force)
        return 0
    from pf_ray.launch import compress

    compress(config, command=shlex.join(["pf-ray", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
