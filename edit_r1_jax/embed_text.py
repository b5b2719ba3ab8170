"""Text-conditioning cache: the model family's text embeddings of every row of a dataset, computed once.

    python -m edit_r1_jax.embed_text --model CONVERTED_DIR --data DATA_DIR [--split train|test|all] [--resolution R]

Reads ``DATA_DIR/<split>_metadata.jsonl`` (one JSON object per line with at least ``prompt`` and ``image``
strings; a malformed line raises :class:`MetadataError` naming file and line) and writes

    DATA_DIR/text_cache/<split>.safetensors   per row key: "<key>.<name>" for each of the family's names
                                             (Kontext: text [T, 4096] + pooled [768]; Qwen-Image-Edit: text
                                             [T, 3584] + mask [T])
    DATA_DIR/text_cache/<split>.json          {"format", "family", "fingerprint", settings, "dtype", "entries"}

The family comes from the converted folder (``editors.detect``). ``key``: sha256 of the instruction (UTF-8) for
an encoder that reads only text (Kontext); for one that sees the source image (Qwen-Image-Edit's Qwen2.5-VL), of
the instruction and the image's pixels as the trainer decodes them (cropped and resized to ``--resolution``, which
must equal ``data.resolution``). The ``fingerprint`` hashes the converted encoders' ``config.json``, a content
digest of their weights (see :func:`weights_digest`), their tokenizer files' contents, the token lengths and the
compute dtype: content only, never file times, so a copy of the dataset and model to each worker (a bucket sync
sets new mtimes) keeps the cache valid, while a changed encoder invalidates it; a changed or new row is simply a
missing key. Re-running reuses the rows whose key and fingerprint match and encodes only the rest. Tensors are
written one at a time (host memory ~ one batch). ``TextCache.lookup(prompts, images)`` reads rows back lazily.
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

__all__ = ["MetadataError", "StaleCacheError", "read_metadata", "prompt_key", "row_key", "encoder_fingerprint",
           "build_cache", "TextCache", "weights_digest", "main"]

CACHE_DIR = "text_cache"
FORMAT = 2  # 1: Kontext only, "<key>.prompt_embeds"; 2: the family's names


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


def row_key(prompt: str, image: np.ndarray | None = None) -> str:
    """The cache key of one row: the instruction, and the image's pixels when the encoder sees them."""
    if image is None:
        return prompt_key(prompt)
    image = np.ascontiguousarray(image)
    h = hashlib.sha256(prompt.encode("utf-8"))
    h.update(f"\0{image.dtype}{image.shape}\0".encode())
    h.update(image.tobytes())
    return h.hexdigest()


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


def _rows(data_dir: Path, split: str, uses_image: bool, resolution: int):
    """``(rows, image_of)``: the distinct ``(key, prompt, dataset index or None)`` of a split, in order, and a
    function giving the uint8 image of a dataset index as the trainer decodes it. Images are decoded once here for
    the keys and again, a batch at a time, for the rows to encode: host memory stays ~ one batch of images."""
    items = read_metadata(data_dir / f"{split}_metadata.jsonl")
    if not uses_image:
        prompts = list(dict.fromkeys(it["prompt"] for it in items))
        return [(prompt_key(p), p, None) for p in prompts], None
    from tqdm import tqdm

    from edit_r1_jax.data import source as data_source

    ds, _ = data_source.make_dataset(data_dir, split, int(resolution))
    out, seen = [], set()
    for i in tqdm(range(len(ds)), desc=f"keying {split} rows", unit="row", disable=len(ds) < 64):
        it = ds[i]
        k = row_key(it["prompt"], it["image"])
        if k not in seen:
            seen.add(k)
            out.append((k, it["prompt"], i))
    return out, lambda i: ds[i]["image"]


def build_cache(model_dir, data_dir, split: str = "train", *, conditioner=None, family=None, text_cfg=None,
                resolution: int = 512, batch_size: int = 8, dtype: str = "float32", compute_dtype: str = "float32",
                **text_settings) -> Path:
    """Encode every distinct row of ``DATA_DIR/<split>_metadata.jsonl`` into the cache (incremental).

    ``text_cfg`` (or keyword settings such as ``t5_length=``, ``clip_length=``, ``max_length=``): the ``text``
    config section the conditioner is built from; ``conditioner``: an already loaded one (else loaded here)."""
    from safetensors import safe_open

    from edit_r1_jax import editors
    from edit_r1_jax.weights import write_streaming

    data_dir = Path(data_dir)
    family = family or editors.detect(model_dir)
    text_cfg = {**dict(text_cfg or {}), **text_settings}
    fp = family.conditioner_fingerprint(model_dir, text_cfg, compute_dtype)
    names = family.cond_names
    uses_image = family.conditioner_uses_image
    rows, image_of = _rows(data_dir, split, uses_image, resolution)
    st_path, idx_path = _paths(data_dir, split)
    st_path.parent.mkdir(parents=True, exist_ok=True)

    old_entries: dict[str, str] = {}
    if idx_path.exists() and st_path.exists():
        old = json.loads(idx_path.read_text())
        if old.get("fingerprint") == fp and old.get("dtype") == dtype and old.get("format") == FORMAT:
            old_entries = old.get("entries", {})
        else:
            log.info("text cache %s was built with other encoders/settings: rebuilding", idx_path)
    reuse = [k for k, _, _ in rows if k in old_entries]
    todo = [r for r in rows if r[0] not in old_entries]
    log.info("%s: %d rows, %d cached, %d to encode", split, len(rows), len(reuse), len(todo))
    if not todo and len(reuse) == len(old_entries):
        return st_path

    if conditioner is None:
        conditioner = family.conditioner(model_dir, text_cfg, dtype=_jnp_dtype(compute_dtype))
    if conditioner.fingerprint() != fp:
        raise StaleCacheError(f"the conditioner passed for {model_dir} has other settings than {text_cfg}")
    store = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)

    def encode(chunk):
        imgs = np.stack([image_of(i) for _, _, i in chunk]) if uses_image else None
        return conditioner([p for _, p, _ in chunk], imgs)

    def stored(name, x):  # masks stay integers
        return x.astype(store) if np.issubdtype(x.dtype, np.floating) else x

    # shapes and dtypes: from an existing row or from one encoded probe
    if reuse:
        with safe_open(str(st_path), framework="numpy") as f:
            probe = {n: f.get_tensor(f"{reuse[0]}.{n}") for n in names}
    else:
        probe = {n: v[0] for n, v in encode(todo[:1]).items()}
    shapes = {n: (tuple(v.shape), stored(n, v).dtype) for n, v in probe.items()}
    order = reuse + [k for k, _, _ in todo]
    specs = [(f"{k}.{n}", shapes[n][0], shapes[n][1]) for k in order for n in names]
    tmp_st = st_path.with_suffix(".new.safetensors")

    def produce() -> Iterable[tuple[str, np.ndarray]]:
        if reuse:
            with safe_open(str(st_path), framework="numpy") as f:
                for k in reuse:
                    for n in names:
                        yield f"{k}.{n}", stored(n, f.get_tensor(f"{k}.{n}"))
        from tqdm import tqdm

        batches = range(0, len(todo), batch_size)
        if todo:
            batches = tqdm(batches, desc=f"encoding {split} rows", unit="batch")
        for i in batches:
            chunk = todo[i:i + batch_size]
            out = encode(chunk)
            for j, (k, _, _) in enumerate(chunk):
                for n in names:
                    yield f"{k}.{n}", stored(n, np.asarray(out[n][j]))

    write_streaming(tmp_st, specs, produce(), metadata={"fingerprint": fp})
    entries = {k: old_entries[k] for k in reuse}
    entries.update({k: p for k, p, _ in todo})
    os.replace(tmp_st, st_path)
    tmp_idx = idx_path.with_suffix(".json.partial")
    index = {"format": FORMAT, "family": family.name, "fingerprint": fp, **conditioner.settings(),
             "uses_image": uses_image, "resolution": int(resolution) if uses_image else None, "dtype": dtype,
             "compute_dtype": compute_dtype, "split": split, "names": list(names), "entries": entries}
    tmp_idx.write_text(json.dumps(index, indent=1))
    os.replace(tmp_idx, idx_path)
    log.info("wrote %s (%d rows)", st_path, len(entries))
    return st_path


class TextCache:
    """Read side of the cache. ``lookup(prompts, images=None) -> {name: [B, ...]}`` (floats as float32).

    ``model_dir``: check the cache against the converted folder's encoders with ``text_cfg``'s settings (default:
    the settings the cache was built with)."""

    def __init__(self, data_dir: str | Path, split: str = "train", model_dir: str | Path | None = None, *,
                 family=None, text_cfg=None):
        self.st_path, self.idx_path = _paths(Path(data_dir), split)
        hint = f"python -m edit_r1_jax.embed_text --model MODEL --data {data_dir} --split {split}"
        if not self.idx_path.exists() or not self.st_path.exists():
            raise FileNotFoundError(f"no text cache for split {split!r} in {Path(data_dir) / CACHE_DIR}: run {hint}")
        self.index = json.loads(self.idx_path.read_text())
        if self.index.get("format") != FORMAT:
            raise StaleCacheError(f"{self.idx_path} was written by an older version (format "
                                  f"{self.index.get('format', 1)}, now {FORMAT}): re-run {hint}")
        self.names = tuple(self.index["names"])
        self.uses_image = bool(self.index["uses_image"])
        if model_dir is not None:
            from edit_r1_jax import editors

            family = family or editors.detect(model_dir)
            if family.name != self.index["family"]:
                raise StaleCacheError(f"{self.idx_path} holds {self.index['family']} embeddings; {model_dir} is "
                                      f"a {family.name} model: re-run {hint}")
            settings = text_cfg if text_cfg is not None else self.index
            fp = family.conditioner_fingerprint(model_dir, settings, self.index.get("compute_dtype", "float32"))
            if fp != self.index["fingerprint"]:
                raise StaleCacheError(f"{self.idx_path} was built with different text encoders or settings than "
                                      f"{model_dir} with {dict(settings) if text_cfg is not None else 'its own'}"
                                      f"; re-run {hint}")
        from safetensors import safe_open

        self._f = safe_open(str(self.st_path), framework="numpy")

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    def _keys(self, prompts, images):
        if not self.uses_image:
            return [prompt_key(p) for p in prompts]
        if images is None:
            raise ValueError(f"{self.idx_path} is keyed by instruction and image: pass the images")
        return [row_key(p, im) for p, im in zip(prompts, images)]

    def __contains__(self, prompt: str) -> bool:
        return prompt_key(prompt) in self.index["entries"]

    def __len__(self) -> int:
        return len(self.index["entries"])

    def lookup(self, prompts: Sequence[str], images=None) -> dict[str, np.ndarray]:
        keys = self._keys(prompts, images)
        missing = [p for p, k in zip(prompts, keys) if k not in self.index["entries"]]
        if missing:
            shown = ", ".join(repr(m[:60]) for m in missing[:3])
            what = "row(s) (instruction + image" + (f" at resolution {self.index['resolution']})"
                                                    if self.uses_image else ")")
            raise KeyError(f"{len(missing)} {what if self.uses_image else 'instruction(s)'} not in text cache "
                           f"{self.st_path}: {shown}{' ...' if len(missing) > 3 else ''} (re-run "
                           f"python -m edit_r1_jax.embed_text)")
        out = {}
        for n in self.names:
            x = np.stack([self._f.get_tensor(f"{k}.{n}") for k in keys])
            out[n] = x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) or x.dtype.kind == "V" else x
        return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edit_r1_jax.embed_text", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="converted editor folder (Kontext or Qwen-Image-Edit)")
    ap.add_argument("--data", required=True, help="dataset directory with <split>_metadata.jsonl")
    ap.add_argument("--split", default="train", choices=["train", "test", "all"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--t5-length", type=int, default=128, help="Kontext: T5 tokens per instruction")
    ap.add_argument("--clip-length", type=int, default=77, help="Kontext: CLIP tokens")
    ap.add_argument("--max-length", type=int, default=256, help="Qwen-Image-Edit: prompt-embedding tokens")
    ap.add_argument("--resolution", type=int, default=512,
                    help="Qwen-Image-Edit: the training resolution (data.resolution); the key covers the image")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="encoder compute dtype (the reference ran the text encoders in bf16)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from edit_r1_jax import editors

    family = editors.detect(args.model)
    text_cfg = {"t5_length": args.t5_length, "clip_length": args.clip_length, "max_length": args.max_length}
    splits = ["train", "test"] if args.split == "all" else [args.split]
    cond = None
    for split in splits:
        if args.split == "all" and not (Path(args.data) / f"{split}_metadata.jsonl").exists():
            log.warning("no %s_metadata.jsonl in %s; skipped", split, args.data)
            continue
        if cond is None:
            cond = family.conditioner(args.model, text_cfg, dtype=_jnp_dtype(args.compute_dtype))
        build_cache(args.model, args.data, split, conditioner=cond, family=family, text_cfg=text_cfg,
                    resolution=args.resolution, batch_size=args.batch_size, dtype=args.dtype,
                    compute_dtype=args.compute_dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
