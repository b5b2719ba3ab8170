"""The README's before/after picture: a run's first and last held-out grids side by side, labelled.

    python -m tools.toy_picture --run runs/toy_long --out docs/toy_eval_before_after.png [--after 120]

Each grid is what the trainer wrote to RUN/samples/eval_NNNNNN.png (NNNNNN = epochs done; rows of source |
edit | verifier score and instruction, the same held-out rows and noise at every evaluation).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.toy_picture", description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/toy", help="run directory (default runs/toy)")
    p.add_argument("--out", default="docs/toy_eval_before_after.png")
    p.add_argument("--after", type=int, help="epochs done of the 'after' grid (default: the last one written)")
    args = p.parse_args(argv)
    samples = Path(args.run) / "samples"
    grids = {int(m.group(1)): f for f in samples.glob("eval_*.png") if (m := re.fullmatch(r"eval_(\d+)\.png", f.name))}
    if 0 not in grids:
        raise SystemExit(f"{samples}: no eval_000000.png (the evaluation before training); has the run started?")
    after = max(grids) if args.after is None else args.after
    if after not in grids or after == 0:
        raise SystemExit(f"{samples}: no evaluation grid after training for --after {after}; have {sorted(grids)}")
    left, right = Image.open(grids[0]).convert("RGB"), Image.open(grids[after]).convert("RGB")
    header, gap = 18, 12
    canvas = Image.new("RGB", (left.width + gap + right.width, header + max(left.height, right.height)), "white")
    canvas.paste(left, (0, header))
    canvas.paste(right, (left.width + gap, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), "before NFT: epoch 0 (warm start)   source | edit | score", fill="black")
    draw.text((left.width + gap + 4, 3), f"after NFT: epoch {after}   source | edit | score", fill="black")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB) from {grids[0]} and {grids[after]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
