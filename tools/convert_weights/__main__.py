"""python -m tools.convert_weights SUBCOMMAND ...: PyTorch checkpoint layouts <-> ours.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the parser's ``func`` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

MODULES = ("flux", "vae", "text", "kontext", "qwen", "qwen_image")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in MODULES:
        importlib.import_module(f"tools.convert_weights.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
