"""``clip-text`` and ``t5-encoder``: transformers text encoders (+ their tokenizer files) -> our layout.

    python -m tools.convert_weights clip-text  --src PIPELINE/text_encoder   --tokenizer PIPELINE/tokenizer   --dst OUT/text_encoder
    python -m tools.convert_weights t5-encoder --src PIPELINE/text_encoder_2 --tokenizer PIPELINE/tokenizer_2 --dst OUT/text_encoder_2

The tokenizer files are copied into ``DST/tokenizer/`` so that a converted directory is self-contained
(``edit_r1_jax.models.text.encoders`` loads them from there with transformers' AutoTokenizer).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from edit_r1_jax.models.text import params as P
from edit_r1_jax.weights import SafetensorsSource, convert, read_json

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"


def _config(src: Path) -> dict:
    f = (src if src.is_dir() else src.parent) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: the text encoder's transformers config.json is needed")
    return read_json(f)


def copy_tokenizer(tokenizer_dir: str | Path | None, dst: str | Path) -> Path | None:
    """Copy a tokenizer folder's files (not subfolders) into ``dst/tokenizer``."""
    if tokenizer_dir is None:
        return None
    src = Path(tokenizer_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {src}")
    out = Path(dst) / TOKENIZER_DIR
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
            n += 1
    if n == 0:
        raise FileNotFoundError(f"tokenizer folder {src} is empty")
    return out


def convert_clip(src, dst, tokenizer=None, dtype=None) -> Path:
    src = Path(src)
    cfg = P.clip_config_from_hf(_config(src))
    out = convert(SafetensorsSource(src), P.clip_rules(), P.clip_abstract_state(cfg), dst, P.config_to_dict(cfg),
                  dtype=dtype, ignore=P.CLIP_IGNORE)
    copy_tokenizer(tokenizer, dst)
    return out


def convert_t5(src, dst, tokenizer=None, dtype=None) -> Path:
    src = Path(src)
    cfg = P.t5_config_from_hf(_config(src))
    source = SafetensorsSource(src)
    rules, ignore = P.t5_rules(source.keys())
    out = convert(source, rules, P.t5_abstract_state(cfg), dst, P.config_to_dict(cfg), dtype=dtype, ignore=ignore)
    copy_tokenizer(tokenizer, dst)
    return out


def add_parser(subparsers) -> None:
    for name, fn, what in (("clip-text", convert_clip, "CLIP text encoder (CLIPTextModel / CLIPModel files)"),
                           ("t5-encoder", convert_t5, "T5 encoder (T5EncoderModel / T5 files)")):
        p = subparsers.add_parser(name, help=what)
        p.add_argument("--src", required=True, help="transformers model folder (config.json + safetensors)")
        p.add_argument("--dst", required=True, help="output directory")
        p.add_argument("--tokenizer", default=None, help="tokenizer folder to copy into DST/tokenizer")
        p.add_argument("--dtype", default=None, help="storage dtype (default float32)")
        p.set_defaults(func=lambda a, fn=fn: fn(a.src, a.dst, a.tokenizer, a.dtype))
