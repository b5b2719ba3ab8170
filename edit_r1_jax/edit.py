"""Edit one image with a converted FLUX.1-Kontext or Qwen-Image-Edit folder (the family is read from the folder).

    python -m edit_r1_jax.edit --model CONVERTED_DIR --image in.png --instruction "make the sky red" --out out.png \
        [--steps 28] [--guidance 2.5] [--seed 0] [--lora FILE_OR_DIR] [--resolution 512]

Input handling (see ``edit_r1_jax.data.images``): a missing or unreadable file, an image smaller than one
latent patch (16x16) and an empty instruction are refused with a one-line ``error:`` message and exit code 2,
before any model is loaded. RGBA / LA / transparent-palette images are composited onto white; grayscale and
palette images are converted to RGB; 16-bit PNGs are scaled to 8 bits. The image is center-cropped to a square
and LANCZOS-resized to ``--resolution``; the output is ``resolution x resolution`` RGB.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from edit_r1_jax import host_memory

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m edit_r1_jax.edit", description=__doc__,
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--model", required=True,
                    help="converted editor folder (python -m tools.convert_weights kontext | qwen-image-edit); "
                         "its family is detected and its components checked before loading")
    ap.add_argument("--image", required=True, help="source image (at least 16x16; cropped to a square)")
    ap.add_argument("--instruction", required=True, help="editing instruction (non-empty)")
    ap.add_argument("--out", required=True, help="output image path (format from the extension, e.g. .png)")
    ap.add_argument("--steps", type=int, default=28, help="Euler denoising steps")
    ap.add_argument("--guidance", type=float, default=2.5,
                    help="FLUX guidance embedding value (Qwen-Image-Edit has none: ignored)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    ap.add_argument("--lora", default=None, help="LoRA .safetensors (ours or PEFT/diffusers) or a folder with one")
    ap.add_argument("--resolution", type=int, default=512, help="output side in pixels (a multiple of 16)")
    ap.add_argument("--t5-length", type=int, default=128,
                    help="Kontext: T5 tokens per instruction (longer is truncated)")
    ap.add_argument("--max-length", type=int, default=256,
                    help="Qwen-Image-Edit: prompt-embedding tokens after the template (longer is truncated)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--compile-cache-dir", default="",
                    help="compiled programs kept for the next start: a folder or bucket URL, 'none' = off; empty: "
                         "JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/edit_r1_jax/xla")
    ap.add_argument("--host-malloc", default="auto", choices=host_memory.SETTINGS,
                    help="XLA:CPU's per-call buffers: keep = reused (glibc keeps freed memory, calls run on the "
                         "calling thread), system = glibc and jax as they are, auto = keep where jax runs on the CPU "
                         "only")
    return ap


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from PIL import Image

    from edit_r1_jax.data.images import ImageLoadError, load_image

    # cheap checks first: no model is loaded for bad inputs
    if not args.instruction.strip():
        return _fail("the instruction is empty")
    if args.steps < 1:
        return _fail(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        return _fail(f"cannot tell the output format from {out.name!r}; use e.g. .png or .jpg")
    try:
        pixels = load_image(args.image, args.resolution)
    except FileNotFoundError as e:
        return _fail(str(e))
    except (ImageLoadError, ValueError) as e:
        return _fail(str(e))
    from edit_r1_jax import editors
    from edit_r1_jax.folders import FolderError

    try:
        family = editors.detect(args.model, "--model")
        family.check_dir(args.model, "--model")
    except FolderError as e:
        return _fail(str(e))
    if args.lora is not None and not Path(args.lora).exists():
        return _fail(f"--lora {args.lora}: file or folder not found")

    from edit_r1_jax import compile_cache
    from edit_r1_jax.pipeline import Editor

    host_memory.configure(args.host_malloc, "--host-malloc")
    compile_cache.use(args.compile_cache_dir, "--compile-cache-dir")
    log.info("model %s: %s", args.model, family.name)
    try:
        editor = Editor.from_pretrained(args.model, lora=args.lora, t5_length=args.t5_length,
                                        max_length=args.max_length, family=family)
        editor.token_grid(args.resolution)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc="denoising", unit="step")
    try:
        images = editor.edit(pixels[None], [args.instruction], num_steps=args.steps, guidance=args.guidance,
                             seed=args.seed, scan=False, callback=(lambda i: bar.update(1)) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    img = np.rint(np.clip(images[0], 0.0, 1.0) * 255.0).astype(np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img, mode="RGB").save(out, format=fmt)
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
