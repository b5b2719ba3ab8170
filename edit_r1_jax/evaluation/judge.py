"""The local judge: a converted Qwen2.5-VL answering benchmark prompts with images (KV-cache generation), and
the digit-logit expected score (``--judge-mode logits``).

A request is (images, text, order): GEdit's VIEScore asks with the images first, ImgEdit with the text first.
Requests are batched (left padding, the batch padded to a fixed size and the length to a multiple of
``pad_to_multiple`` so that few programs compile) and, with a mesh, sharded over its batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models.qwen2_5_vl import params as qparams
from edit_r1_jax.models.qwen2_5_vl.generate import SamplingConfig, embed_inputs, generate, trim
from edit_r1_jax.models.qwen2_5_vl.model import get_rope_index
from edit_r1_jax.models.qwen2_5_vl.processor import (ImageProcessorConfig, PromptBuilder, load_tokenizer,
                                                     preprocess_host)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Request:
    images: list            # uint8 HWC arrays
    text: str
    images_first: bool = True
    prefix: str = ""        # assistant-turn prefix (logits mode)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode_fn(graphdef, grid, state, pixels):
    return nnx.merge(graphdef, state).encode_images(pixels, grid)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _digit_fn(graphdef, digit_ids, two_positions, state, ids, mask, pos, image_embeds):
    """Digit logits at the last position (or the one before, with the full-vocabulary log-probability of "0"
    at the last position: the second token of "10")."""
    model = nnx.merge(graphdef, state)
    x = embed_inputs(model, ids, image_embeds)
    h = model.model(x, mask, pos)
    if not two_positions:
        return model.logits(h[:, -1], digit_ids).astype(jnp.float32), jnp.zeros((ids.shape[0],), jnp.float32)
    first = model.logits(h[:, -2], digit_ids).astype(jnp.float32)
    full = jax.nn.log_softmax(model.logits(h[:, -1]).astype(jnp.float32), axis=-1)
    return first, full[:, digit_ids[0]]


class QwenJudge:
    def __init__(self, model_dir: str | Path, *, mesh=None, dtype=jnp.float32, batch_size: int = 4,
                 pad_to_multiple: int = 64, max_new_tokens: int = 512, model=None):
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"judge directory not found: {self.model_dir} (python -m tools.convert_weights "
                                    f"qwen2.5-vl --src HF_DIR --dst {self.model_dir})")
        self.tokenizer = load_tokenizer(self.model_dir)
        self.prompts = PromptBuilder(self.tokenizer)
        self.image_cfg = ImageProcessorConfig.from_dir(self.model_dir)
        self.model = model if model is not None else qparams.load_model(self.model_dir, dtype=dtype, mesh=mesh)
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(self.model)
        shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
        self.batch_size = math.ceil(batch_size / shards) * shards
        self.pad_to_multiple = pad_to_multiple
        self.max_new_tokens = max_new_tokens
        tok = self.tokenizer
        eos = {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")} | {tok.eos_token_id}
        self.eos_ids = tuple(sorted(int(e) for e in eos if e is not None and e >= 0))
        pad = tok.pad_token_id
        self.pad_id = int(pad if pad is not None else tok.convert_tokens_to_ids("<|endoftext|>"))
        self.digit_ids = []
        for d in "0123456789":
            ids = tok.encode(d, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"digit {d!r} is not one token in {self.model_dir}'s tokenizer: {ids}")
            self.digit_ids.append(ids[0])
        self.name = str(self.model_dir)

    # -------------------------------------------------------------------------------------- batching
    def _encode_batch(self, reqs: Sequence[Request], extra_ids: Sequence[int] = ()):
        seqs, images = [], []
        for r in reqs:
            content = [{"type": "image"} for _ in r.images]
            content = (content + [{"type": "text", "text": r.text}] if r.images_first
                       else [{"type": "text", "text": r.text}] + content)
            pre = [preprocess_host(np.asarray(im), self.image_cfg) for im in r.images]
            ids = self.prompts.expand(self.prompts.chat_text(content) + r.prefix, [g for _, g in pre],
                                      self.image_cfg.merge_size)
            seqs.append(ids + list(extra_ids))
            images += pre
        n = len(reqs)
        B = math.ceil(n / self.batch_size) * self.batch_size
        # padding rows repeat the last request's text with no images (their output is dropped)
        tail = [t for t in seqs[-1] if t != self.prompts.image_token_id] or [self.pad_id]
        rows = seqs + [tail] * (B - n)
        L = math.ceil(max(map(len, rows)) / self.pad_to_multiple) * self.pad_to_multiple
        ids = np.full((B, L), self.pad_id, np.int32)
        mask = np.zeros((B, L), np.int32)
        for i, s in enumerate(rows):
            ids[i, L - len(s):], mask[i, L - len(s):] = s, 1
        cfg = self.model.config
        pos = get_rope_index(ids, mask, [g for _, g in images], image_token_id=cfg.image_token_id,
                             spatial_merge_size=cfg.vision_config.spatial_merge_size)
        emb = self._embed(images) if images else None
        return ids, mask, pos, emb

    def _embed(self, images):
        groups: dict[tuple, list[int]] = {}
        for i, (_, g) in enumerate(images):
            groups.setdefault(tuple(g), []).append(i)
        out = [None] * len(images)
        for g, members in groups.items():
            enc = _encode_fn(self.graphdef, g, self.state, jnp.stack([jnp.asarray(images[i][0]) for i in members]))
            for j, i in enumerate(members):
                out[i] = enc[j]
        emb = jnp.concatenate(out, axis=0)
        bucket = math.ceil(emb.shape[0] / 256) * 256  # fewer distinct shapes -> fewer compilations
        return jnp.pad(emb, ((0, bucket - emb.shape[0]), (0, 0)))

    def _chunks(self, reqs):
        for i in range(0, len(reqs), self.batch_size):
            yield reqs[i: i + self.batch_size]

    # -------------------------------------------------------------------------------------- generation
    def answer(self, requests: Sequence[Request], *, temperature: float = 0.0, seed: int = 0) -> list[str]:
        """Generated answers (greedy at temperature 0), special tokens removed."""
        out = []
        cfg = SamplingConfig(max_new_tokens=self.max_new_tokens, eos_token_ids=self.eos_ids,
                             pad_token_id=self.pad_id, temperature=temperature)
        for chunk in self._chunks(list(requests)):
            ids, mask, pos, emb = self._encode_batch(chunk)
            g = generate(self.model, ids, mask, pos, emb, cfg=cfg, seed=seed, mesh=self.mesh,
                         graphdef_state=(self.graphdef, self.state))
            for row in trim(g.tokens, g.lengths, self.eos_ids)[: len(chunk)]:
                out.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return out

    # -------------------------------------------------------------------------------------- logits
    def expected_scores(self, requests: Sequence[Request], lo: int, hi: int) -> list[float]:
        """Expected integer score in [lo, hi] from the digit distribution right after each request's prefix.

        Scores up to 9 are one digit token. For hi = 10 the score "10" is the two tokens "1" "0": the prompt is
        run once with "1" appended, P(first digit) is read at the position before it and P("0" | "1") over the
        full vocabulary at the last position; then P(10) = P(1) P(0|1), P(1 alone) = P(1) (1 - P(0|1)).
        """
        if not 0 <= lo < hi <= 10:
            raise ValueError(f"score range [{lo}, {hi}] must lie in [0, 10]")
        two = hi == 10
        first_digits = tuple(self.digit_ids[lo: min(hi, 9) + 1])
        digit_ids = (self.digit_ids[0],) + first_digits if two else first_digits
        out = []
        for chunk in self._chunks(list(requests)):
            ids, mask, pos, emb = self._encode_batch(chunk, extra_ids=[self.digit_ids[1]] if two else [])
            if self.mesh is not None:
                with jax.set_mesh(self.mesh):
                    first, logp0 = _digit_fn(self.graphdef, digit_ids, two, self.state, ids, mask, pos, emb)
            else:
                first, logp0 = _digit_fn(self.graphdef, digit_ids, two, self.state, ids, mask, pos, emb)
            first = np.asarray(first)[: len(chunk)]
            logp0 = np.asarray(logp0)[: len(chunk)]
            if two:
                first = first[:, 1:]  # drop the "0" column used for the second position
            p = np.exp(first - first.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            values = np.arange(lo, min(hi, 9) + 1, dtype=np.float64)
            e = p @ values
            if two and lo <= 1:
                q = np.exp(logp0)
                p1 = p[:, 1 - lo]
                e = e + p1 * q * (10.0 - 1.0)  # the "1" mass moves to 10 with probability P(0|1)
            out += [float(v) for v in e]
        return out
