"""Text-embedding cache: T5 + CLIP embeddings of every instruction of a dataset, computed once.

    python -m edit_r1_jax.embed_text --model CONVERTED_KONTEXT_DIR --data DATA_DIR [--split train|test|all]

Reads ``DATA_DIR/<split>_metadata.jsonl`` (one JSON object per line with at least ``prompt`` and ``image``
strings; a malformed line raises :class:`MetadataError` naming file and line) and writes

    DATA_DIR/text_cache/<split>.safetensors   per instruction: "<key>.prompt_embeds" [T, D_t5], "<key>.pooled" [D_clip]
    DATA_DIR/text_cache/<split>.json          {"fingerprint", "t5_length", "clip_length", "dtype", "entries": {key: prompt}}

``key`` = sha256 of the instruction text (UTF-8). The ``fingerprint`` hashes the two converted encoders'
``config.json``, a content digest of their ``params.safetensors`` (see :func:`weights_digest`), their tokenizer
files' contents, the token lengths and the compute dtype: content only, never file times, so a copy of the
dataset and model to each worker (a bucket sync sets new mtimes) keeps the cache valid, while a changed encoder
invalidates it; a changed or new instruction is simply a missing key.
Re-running reuses the rows whose key and fingerprint match and encodes only the rest. Tensors are written one
at a time (host memory ~ one batch). ``TextCache.lookup(prompts)`` reads the rows back (lazily, per key).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["MetadataError", "StaleCacheError", "read_metadata", "prompt_key", "encoder_fingerprint", "build_cache",
           "TextCache", "weights_digest", "main"]

CACHE_DIR = "text_cache"


class MetadataError(ValueError):
    """A malformed ``*_metadata.jsonl`` line (the message names file and line number)."""


class StaleCacheError(RuntimeError):
    """The cache was built with different text encoders (fingerprint mismatch)."""


def read_metadata(path: str | Path) -> list[dict]:
    from edit_r1_jax.data.source import jsonl_objects

    if not Path(path).exists():
        raise FileNotFoundError(f"metadata file not found: {path}")
    return [obj for _, obj in jsonl_objects(path, ("prompt", "image"), MetadataError)]


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


DIGEST_BLOCKS, DIGEST_BLOCK_BYTES = 64, 1 << 16


def weights_digest(path: str | Path) -> bytes:
    """Content digest of a safetensors file without reading all of it (T5-XXL is ~9 GB, read on every host at
    every start): the file size, the whole JSON header (every tensor's name, dtype, shape and offsets) and
    ``DIGEST_BLOCKS`` blocks of ``DIGEST_BLOCK_BYTES`` evenly spaced over the data. Another checkpoint (retrained,
    fine-tuned or converted in another dtype) differs in the header or in essentially every block; a change
    confined to bytes between the sampled blocks would go unnoticed (a hand-edited file, not a real encoder)."""
    import struct

    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise ValueError(f"{path}: safetensors header length {n} exceeds the file size {size}")
        h.update(f"{size}".encode())
        h.update(f.read(n))
        start, length = 8 + n, size - 8 - n
        for i in range(DIGEST_BLOCKS):
            f.seek(start + (length * i) // DIGEST_BLOCKS)
            h.update(f.read(DIGEST_BLOCK_BYTES))
    return h.digest()


def encoder_fingerprint(model_dir: str | Path, t5_length: int = 128, clip_length: int = 77,
                        compute_dtype: str = "float32") -> str:
    h = hashlib.sha256()
    h.update(f"t5_length={t5_length};clip_length={clip_length};compute={compute_dtype}".encode())
    for comp in ("text_encoder", "text_encoder_2"):
        d = Path(model_dir) / comp
        cfg = d / "config.json"
        params = d / "params.safetensors"
        if not cfg.exists() or not params.exists():
            raise FileNotFoundError(f"{d} is not a converted text encoder (config.json + params.safetensors)")
        h.update(comp.encode())
        h.update(cfg.read_bytes())
        h.update(weights_digest(params))
        tok = d / "tokenizer"
        if tok.is_dir():
            for f in sorted(tok.iterdir()):
                if f.is_file():
                    h.update(f.name.encode())
                    h.update(f.read_bytes())
    return h.hexdigest()


def _jnp_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _paths(data_dir: Path, split: str) -> tuple[Path, Path]:
    d = Path(data_dir) / CACHE_DIR
    return d / f"{split}.safetensors", d / f"{split}.json"


def build_cache(model_dir, data_dir, split: str = "train", *, text_encoders=None, batch_size: int = 8,
                t5_length: int = 128, clip_length: int = 77, dtype: str = "float32",
                compute_dtype: str = "float32") -> Path:
    """Encode every distinct instruction of ``DATA_DIR/<split>_metadata.jsonl`` into the cache (incremental)."""
    from safetensors import safe_open

    from edit_r1_jax.weights import write_streaming

    data_dir = Path(data_dir)
    items = read_metadata(data_dir / f"{split}_metadata.jsonl")
    prompts = list(dict.fromkeys(it["prompt"] for it in items))  # distinct, in order
    fp = encoder_fingerprint(model_dir, t5_length, clip_length, compute_dtype)
    st_path, idx_path = _paths(data_dir, split)
    st_path.parent.mkdir(parents=True, exist_ok=True)

    old_entries: dict[str, str] = {}
    if idx_path.exists() and st_path.exists():
        old = json.loads(idx_path.read_text())
        if old.get("fingerprint") == fp and old.get("dtype") == dtype:
            old_entries = old.get("entries", {})
        else:
            log.info("text cache %s was built with other encoders/settings: rebuilding", idx_path)
    keys = [prompt_key(p) for p in prompts]
    reuse = [k for k in keys if k in old_entries]
    todo = [(k, p) for k, p in zip(keys, prompts) if k not in old_entries]
    log.info("%s: %d instructions, %d cached, %d to encode", split, len(prompts), len(reuse), len(todo))
    if not todo and len(reuse) == len(old_entries):
        return st_path

    if text_encoders is None:
        from edit_r1_jax.models.text.encoders import TextEncoders

        text_encoders = TextEncoders.from_pretrained(model_dir, t5_length=t5_length, clip_length=clip_length,
                                                     dtype=_jnp_dtype(compute_dtype))
    store = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)

    # shapes: from an existing row or from one encoded probe
    if reuse:
        with safe_open(str(st_path), framework="numpy") as f:
            e_shape = tuple(f.get_slice(f"{reuse[0]}.prompt_embeds").get_shape())
            p_shape = tuple(f.get_slice(f"{reuse[0]}.pooled").get_shape())
    else:
        e, p = text_encoders.encode([todo[0][1]])
        e_shape, p_shape = e.shape[1:], p.shape[1:]

    order = reuse + [k for k, _ in todo]
    specs = []
    for k in order:
        specs += [(f"{k}.prompt_embeds", e_shape, store), (f"{k}.pooled", p_shape, store)]

    tmp_st = st_path.with_suffix(".new.safetensors")

    def produce() -> Iterable[tuple[str, np.ndarray]]:
        if reuse:
            with safe_open(str(st_path), framework="numpy") as f:
                for k in reuse:
                    yield f"{k}.prompt_embeds", f.get_tensor(f"{k}.prompt_embeds").astype(store)
                    yield f"{k}.pooled", f.get_tensor(f"{k}.pooled").astype(store)
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        batches = range(0, len(todo), batch_size)
        if tqdm is not None and todo:
            batches = tqdm(batches, desc=f"encoding {split} instructions", unit="batch")
        for i in batches:
            chunk = todo[i:i + batch_size]
            e, p = text_encoders.encode([pr for _, pr in chunk], batch_size=batch_size)
            for (k, _), ei, pi in zip(chunk, e, p):
                yield f"{k}.prompt_embeds", ei.astype(store)
                yield f"{k}.pooled", pi.astype(store)

    write_streaming(tmp_st, specs, produce(), metadata={"fingerprint": fp})
    entries = {k: old_entries[k] for k in reuse}
    entries.update({k: p for k, p in todo})
    os.replace(tmp_st, st_path)
    tmp_idx = idx_path.with_suffix(".json.partial")
    tmp_idx.write_text(json.dumps({"fingerprint": fp, "t5_length": t5_length, "clip_length": clip_length,
                                   "dtype": dtype, "compute_dtype": compute_dtype, "split": split,
                                   "entries": entries}, indent=1))
    os.replace(tmp_idx, idx_path)
    log.info("wrote %s (%d instructions)", st_path, len(entries))
    return st_path


class TextCache:
    """Read side of the cache. ``lookup(prompts) -> (prompt_embeds [B,T,D] float32, pooled [B,P] float32)``."""

    def __init__(self, data_dir: str | Path, split: str = "train", model_dir: str | Path | None = None):
        self.st_path, self.idx_path = _paths(Path(data_dir), split)
        if not self.idx_path.exists() or not self.st_path.exists():
            raise FileNotFoundError(f"no text cache for split {split!r} in {Path(data_dir) / CACHE_DIR}: run "
                                    f"python -m edit_r1_jax.embed_text --model MODEL --data {data_dir} --split {split}")
        self.index = json.loads(self.idx_path.read_text())
        if model_dir is not None:
            fp = encoder_fingerprint(model_dir, self.index["t5_length"], self.index["clip_length"],
                                     self.index.get("compute_dtype", "float32"))
            if fp != self.index["fingerprint"]:
                raise StaleCacheError(f"{self.idx_path} was built with different text encoders than {model_dir}; "
                                      "re-run python -m edit_r1_jax.embed_text")
        from safetensors import safe_open

        self._f = safe_open(str(self.st_path), framework="numpy")

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    def __contains__(self, prompt: str) -> bool:
        return prompt_key(prompt) in self.index["entries"]

    def __len__(self) -> int:
        return len(self.index["entries"])

    def lookup(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        keys = [prompt_key(p) for p in prompts]
        missing = [p for p, k in zip(prompts, keys) if k not in self.index["entries"]]
        if missing:
            shown = ", ".join(repr(m[:60]) for m in missing[:3])
            raise KeyError(f"{len(missing)} instruction(s) not in text cache {self.st_path}: {shown}"
                           f"{' ...' if len(missing) > 3 else ''} (re-run python -m edit_r1_jax.embed_text)")
        e = np.stack([self._f.get_tensor(f"{k}.prompt_embeds") for k in keys]).astype(np.float32)
        p = np.stack([self._f.get_tensor(f"{k}.pooled") for k in keys]).astype(np.float32)
        return e, p


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edit_r1_jax.embed_text", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="converted Kontext directory (text_encoder/, text_encoder_2/)")
    ap.add_argument("--data", required=True, help="dataset directory with <split>_metadata.jsonl")
    ap.add_argument("--split", default="train", choices=["train", "test", "all"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--t5-length", type=int, default=128)
    ap.add_argument("--clip-length", type=int, default=77)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="encoder compute dtype (the reference ran the text encoders in bf16)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    splits = ["train", "test"] if args.split == "all" else [args.split]
    enc = None
    for split in splits:
        if args.split == "all" and not (Path(args.data) / f"{split}_metadata.jsonl").exists():
            log.warning("no %s_metadata.jsonl in %s; skipped", split, args.data)
            continue
        if enc is None:
            from edit_r1_jax.models.text.encoders import TextEncoders

            enc = TextEncoders.from_pretrained(args.model, t5_length=args.t5_length, clip_length=args.clip_length,
                                               dtype=_jnp_dtype(args.compute_dtype))
        build_cache(args.model, args.data, split, text_encoders=enc, batch_size=args.batch_size,
                    t5_length=args.t5_length, clip_length=args.clip_length, dtype=args.dtype,
                    compute_dtype=args.compute_dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
