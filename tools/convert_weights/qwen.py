"""``qwen2.5-vl``: a transformers Qwen2.5-VL checkpoint folder (hub layout) -> our converted directory.

Copies the tokenizer files, chat template and preprocessor config next to the parameters so that the
converted directory is everything the reward needs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# Files the reward reads besides the weights (whichever exist).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "generation_config.json")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("qwen2.5-vl", help="Qwen2.5-VL (transformers, hub layout) -> edit_r1_jax")
    p.add_argument("--src", required=True, help="folder with config.json and *.safetensors")
    p.add_argument("--dst", required=True, help="output folder")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="storage dtype (default: float32)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    convert(args.src, args.dst, args.dtype)


def convert(src: str | Path, dst: str | Path, dtype: str | None = None) -> Path:
    import jax.numpy as jnp

    from edit_r1_jax import weights
    from edit_r1_jax.models.qwen2_5_vl import params
    from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VLConfig

    src, dst = Path(src), Path(dst)
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found")
    cfg = Qwen2_5_VLConfig.from_hf(weights.read_json(cfg_file))
    store = None if dtype is None else jnp.dtype(dtype)
    weights.convert(weights.SafetensorsSource(src), params.RULES, params.abstract_state(cfg), dst,
                    cfg.to_dict(), dtype=store, ignore=params.ignore_keys(cfg))
    copied = []
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "vocab.json" not in copied:
        raise FileNotFoundError(f"{src} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    log.info("qwen2.5-vl: copied %s", copied)
    return dst
