"""Score edits with the MLLM reward.

    python -m edit_r1_jax.score --model DIR --source a.png --edited b.png --instruction "..." [--requirement ...]
    python -m edit_r1_jax.score --model DIR --jsonl pairs.jsonl

Each jsonl line: {"source": PATH, "edited": PATH, "instruction": STR, "requirement": STR (optional)}; relative
paths are resolved against the jsonl's folder. Prints one JSON line per pair: score and the 0..5 distribution.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _load_image(path: Path, where: str) -> np.ndarray:
    """The image as uint8 RGB; a missing, unreadable or smaller-than-16x16 file stops naming ``where``.
    The same check serves the command line and the jsonl."""
    from edit_r1_jax.data.images import MIN_SIDE, ImageLoadError, open_image, to_rgb

    try:
        im = open_image(path)
    except (FileNotFoundError, ImageLoadError) as e:
        raise SystemExit(f"{where}: {e}") from e
    if min(im.size) < MIN_SIDE:
        raise SystemExit(f"{where}: image {path} is {im.size[0]}x{im.size[1]}; it must be at least "
                         f"{MIN_SIDE}x{MIN_SIDE} pixels")
    return np.asarray(to_rgb(im))


def read_jsonl(path: Path) -> list[dict]:
    from edit_r1_jax.data.source import jsonl_objects

    rows = []
    for n, row in jsonl_objects(path, ("source", "edited", "instruction"), SystemExit):
        where = f"{path}:{n}"
        rows.append({"where": where, "source": _load_image(path.parent / row["source"], where),
                     "edited": _load_image(path.parent / row["edited"], where),
                     "instruction": str(row["instruction"]), "requirement": str(row.get("requirement", "") or ""),
                     "source_path": row["source"], "edited_path": row["edited"]})
    if not rows:
        raise SystemExit(f"{path}: no pairs")
    return rows


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edit_r1_jax.score", description=__doc__,
                                formatter_class=_HelpFormatter)
    p.add_argument("--model", required=True,
                   help="converted Qwen2.5-VL folder (python -m tools.convert_weights qwen2.5-vl); checked for "
                        "config.json, params.safetensors and tokenizer files before loading")
    p.add_argument("--source", help="the source image (one pair on the command line)")
    p.add_argument("--edited", help="the edited image to score against --source")
    p.add_argument("--instruction", help="the editing instruction (non-empty)")
    p.add_argument("--requirement", default="", help="optional extra requirement shown to the judge")
    p.add_argument("--jsonl", help="score many pairs: one JSON object per line (see above); excludes "
                                   "--source/--edited/--instruction")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per reward call")
    p.add_argument("--jpeg", action="store_true", help="JPEG q75 round trip of both images (reference client)")
    p.add_argument("--prompt-template", default=None,
                   help="the reward prompt: a file or the text ({prompt}, optional {requirement}); default: the "
                        "built-in text, the reference's paraphrase, not the paper's official wording")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.jsonl:
        if args.source or args.edited or args.instruction:
            raise SystemExit("--jsonl excludes --source/--edited/--instruction")
        rows = read_jsonl(Path(args.jsonl))
    else:
        if not (args.source and args.edited and args.instruction is not None):
            raise SystemExit("need --source, --edited and --instruction (or --jsonl)")
        if not args.instruction.strip():  # as the jsonl path's required non-empty field
            raise SystemExit("command line: --instruction is empty")
        rows = [{"where": "command line", "source": _load_image(Path(args.source), "--source"),
                 "edited": _load_image(Path(args.edited), "--edited"), "instruction": args.instruction,
                 "requirement": args.requirement, "source_path": args.source, "edited_path": args.edited}]

    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    from edit_r1_jax.folders import FolderError, check_qwen_dir

    try:
        check_qwen_dir(args.model, "--model")
    except FolderError as e:
        raise SystemExit(str(e)) from None

    import jax.numpy as jnp

    from edit_r1_jax.rewards.mllm import MLLMReward, RewardError

    from edit_r1_jax.models.qwen2_5_vl.processor import resolve_template

    try:  # before loading the model: a missing template file is a usage error
        resolve_template(args.prompt_template)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--prompt-template: {e}") from None
    reward = MLLMReward(args.model, dtype=getattr(jnp, args.dtype), jpeg=args.jpeg,
                        prompt_template=args.prompt_template)
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start:start + args.batch_size]
        try:
            scores, dist = reward.score([r["source"] for r in chunk], [r["edited"] for r in chunk],
                                        [r["instruction"] for r in chunk], [r["requirement"] for r in chunk])
        except RewardError as e:
            raise SystemExit(f"pairs {chunk[0]['where']} .. {chunk[-1]['where']} (sample index within the "
                             f"chunk): {e}") from e
        for r, s, d in zip(chunk, scores, dist):
            print(json.dumps({"source": r["source_path"], "edited": r["edited_path"], "score": round(float(s), 6),
                              "distribution": {str(k): round(float(v), 6) for k, v in enumerate(d)}}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
