"""``kontext``: a whole diffusers ``FluxKontextPipeline`` folder -> a converted Kontext directory, in one call.

    python -m tools.convert_weights kontext --src PIPELINE_DIR --dst OUT [--dtype float32] [--skip-text]

Writes ``OUT/transformer`` (DiT converter ``tools.convert_weights.flux``), ``OUT/vae``, ``OUT/text_encoder`` (+ the
CLIP ``tokenizer/``), ``OUT/text_encoder_2`` (+ the T5 ``tokenizer/``), ``OUT/scheduler/scheduler_config.json``
and ``OUT/kontext.json`` (what was converted from where). Text encoders that are absent from the pipeline
(``null`` in ``model_index.json``) are skipped with a warning; ``--skip-text`` skips them on purpose.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from pathlib import Path

from edit_r1_jax.weights import read_json
from tools.convert_weights.text import convert_clip, convert_t5
from tools.convert_weights.vae import convert_vae

log = logging.getLogger(__name__)


def _flux_converter():
    mod = importlib.import_module("tools.convert_weights.flux")
    for name in ("convert_transformer", "convert_flux", "convert"):
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    raise ImportError("tools.convert_weights.flux exposes no convert_transformer(src, dst, dtype=None) function")


def _present(src: Path, name: str, index: dict) -> bool:
    entry = index.get(name)
    if index and (entry is None or entry == [None, None]):
        return False
    return (src / name).is_dir()


def convert_kontext(src: str | Path, dst: str | Path, dtype=None, skip_text: bool = False) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {src}")
    index_file = src / "model_index.json"
    index = read_json(index_file) if index_file.exists() else {}
    for required in ("transformer", "vae"):
        if not (src / required).is_dir():
            raise FileNotFoundError(f"{src / required} not found: is {src} a diffusers FluxKontextPipeline folder?")
    dst.mkdir(parents=True, exist_ok=True)
    done = {}
    _flux_converter()(str(src / "transformer"), str(dst / "transformer"), dtype=str(dtype or "float32"))
    done["transformer"] = str(src / "transformer")
    convert_vae(src / "vae", dst / "vae", dtype=dtype)
    done["vae"] = str(src / "vae")
    if skip_text:
        log.info("--skip-text: text encoders not converted")
    else:
        for comp, tok, fn in (("text_encoder", "tokenizer", convert_clip), ("text_encoder_2", "tokenizer_2", convert_t5)):
            if not _present(src, comp, index):
                log.warning("%s has no %s: skipped (pass prompt embeddings when editing)", src, comp)
                continue
            tok_dir = src / tok if _present(src, tok, index) else None
            if tok_dir is None:
                log.warning("%s has no %s folder: %s converted without a tokenizer", src, tok, comp)
            fn(src / comp, dst / comp, tokenizer=tok_dir, dtype=dtype)
            done[comp] = str(src / comp)
    sched = src / "scheduler" / "scheduler_config.json"
    if sched.exists():
        (dst / "scheduler").mkdir(exist_ok=True)
        shutil.copy2(sched, dst / "scheduler" / "scheduler_config.json")
        done["scheduler"] = str(sched)
    else:
        log.warning("%s not found: the FLUX schedule defaults will be used", sched)
    (dst / "kontext.json").write_text(json.dumps({"source": str(src), "components": done,
                                                  "pipeline_class": index.get("_class_name")}, indent=2))
    log.info("converted %s into %s: %s", src, dst, sorted(done))
    return dst


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("kontext", help="a whole diffusers FluxKontextPipeline folder")
    p.add_argument("--src", required=True, help="diffusers FluxKontextPipeline folder (save_pretrained layout)")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--dtype", default=None, help="storage dtype (default float32)")
    p.add_argument("--skip-text", action="store_true", help="do not convert the text encoders")
    p.set_defaults(func=lambda a: convert_kontext(a.src, a.dst, a.dtype, a.skip_text))
