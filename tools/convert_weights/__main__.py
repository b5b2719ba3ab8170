"""python -m tools.convert_weights SUBCOMMAND ...: PyTorch checkpoint layouts <-> ours.

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; the parser's ``func`` runs it.

Every subcommand is atomic: it writes into a temporary sibling of ``--dst`` (``.NAME.partial-PID``) and renames
it onto ``--dst`` only when everything succeeded, so a failure leaves ``--dst`` as it was. An existing non-empty
``--dst`` is refused unless ``--overwrite``; a ``--dst`` equal to or inside ``--src`` is refused. Non-finite
weights (NaN/inf) in the source are an error naming the source key and file, or a warning with
``--allow-nonfinite``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path

MODULES = ("flux", "vae", "text", "kontext", "qwen", "qwen_image")
FILE_DESTINATIONS = ("export-lora",)  # subcommands whose --dst is one file (written atomically by itself)

log = logging.getLogger("tools.convert_weights")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.convert_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in MODULES:
        importlib.import_module(f"tools.convert_weights.{name}").add_parser(sub)
    for p in sub.choices.values():
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing non-empty --dst (the old one is removed only after success)")
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="warn about NaN/inf source weights instead of stopping")
    return parser


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    """Refuse a --dst inside --src, and an existing non-empty --dst without --overwrite."""
    from edit_r1_jax.weights import ConversionError

    s, d = Path(src), Path(dst)
    src_dir = s if s.is_dir() else s.parent
    if _inside(d, src_dir) if s.is_dir() else d.resolve() == s.resolve():
        raise ConversionError(f"--dst {dst} is inside --src {src}: it would overwrite the source's files "
                              f"(e.g. config.json); choose a folder outside it")
    if d.exists() and not overwrite and (d.is_file() or any(d.iterdir())):
        raise ConversionError(f"--dst {dst} exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def staged(dst: str | Path):
    """Yield a temporary sibling of ``dst``; on success it replaces ``dst``, on failure it is removed."""
    dst = Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        log.error("conversion failed: %s left as it was (partial output removed)", dst)
        raise
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def main(argv: list[str] | None = None) -> int:
    from edit_r1_jax import weights

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    check_destination(args.src, args.dst, args.overwrite)
    with weights.nonfinite_policy("warn" if args.allow_nonfinite else "error"):
        if args.command in FILE_DESTINATIONS:
            args.func(args)
        else:
            final = args.dst
            with staged(final) as tmp:
                args.dst = str(tmp)
                args.func(args)
            log.info("wrote %s", final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
