"""MLLM implicit-feedback reward (spec section D): Qwen2.5-VL judges (original, edited, instruction) and the
score is the expected digit under the softmax over the logits of "0".."5" at the first generated position:

    S = sum_k k * softmax(logits[id("0")..id("5")])_k / 5   in [0, 1]

Differences from the reference server, on purpose: batched (left padding; a pair's score does not depend on
its neighbours), jitted, sharded over a mesh, the image preprocessing runs on device (bit-exact with PIL, see
``processor.preprocess_device``), JPEG q75 round trip is an option (off by default), and failures raise with
the sample index instead of scoring 0.

On a mesh (one or many processes) the images are global arrays (the VAE decoder's output stays on the mesh);
the prompts are the whole global batch on every process, so every process builds the same token ids and the
same padded length and runs the same compiled program. The batch runs in micro-batches of ``batch_size``
(rounded up to the batch shards); the sequence length is padded to a bucket (:func:`bucket_length`: at most 8
buckets per octave of lengths, so a run compiles a handful of programs, not one per length). Scores come back
as one global array, gathered to the hosts once per call.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from edit_r1_jax.models.qwen2_5_vl import params as qparams
from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VL, get_rope_index
from edit_r1_jax.models.qwen2_5_vl.processor import (ImageProcessorConfig, PromptBuilder, grid_for, jpeg_roundtrip,
                                                     load_tokenizer, preprocess_device, to_uint8)
from edit_r1_jax.parallel import distributed, rules
from edit_r1_jax.rewards.registry import RewardError

log = logging.getLogger(__name__)

DIGITS = tuple(str(k) for k in range(6))

__all__ = ["RewardError", "MLLMReward", "bucket_length", "digit_token_ids", "expected_score"]


def bucket_length(n: int, multiple: int = 64) -> int:
    """Padded sequence length for ``n`` tokens: a multiple of ``multiple`` and of 1/8 of the octave that holds
    ``n`` (so padding wastes at most ~12.5% and lengths within one octave share at most 8 programs)."""
    if n <= 0:
        raise ValueError(f"sequence length must be positive, got {n}")
    step = max(int(multiple), 2 ** max(0, math.ceil(math.log2(n)) - 4))  # octave (2^(k-1), 2^k] in 8 steps
    return math.ceil(n / step) * step


def digit_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids of "0".."5"; each must be a single token (raises otherwise)."""
    out = []
    for d in DIGITS:
        ids = tokenizer.encode(d, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"digit {d!r} is not a single token in this tokenizer: {ids}")
        out.append(ids[0])
    if len(set(out)) != len(out):
        raise ValueError(f"digit token ids are not distinct: {out}")
    return tuple(out)


def expected_score(digit_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[B, 6] logits of "0".."5" -> (score [B], distribution [B, 6]); float32 softmax (the same formula is
    applied to transformers' logits in the tests)."""
    z = jnp.asarray(digit_logits, jnp.float32)
    p = jax.nn.softmax(z, axis=-1)
    return (p @ jnp.arange(6, dtype=jnp.float32)) / 5.0, p


class MLLMReward:
    """Score (source, edited, instruction, requirement) pairs with a converted Qwen2.5-VL.

    ``reward(sources, edited, instructions, requirements=None) -> np.ndarray [B] float32`` in [0, 1];
    ``reward.score(...) -> (scores [B], distribution [B, 6])``. Images: float [0, 1] arrays [B, H, W, 3]
    (numpy or jax, same size within ``sources`` and within ``edited``), or lists of HWC images (uint8 or float)
    that may differ in size (pairs are then grouped by size).
    """

    def __init__(self, model_dir: str | Path, *, mesh=None, dtype=jnp.bfloat16, param_dtype=None,
                 jpeg: bool = False, jpeg_quality: int = 75, padding_side: str = "left", pad_to_multiple: int = 64,
                 model: Qwen2_5_VL | None = None, batch_size: int | None = None,
                 prompt_template: str | Path | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model_dir = Path(model_dir)
        self.mesh = mesh
        self.jpeg, self.jpeg_quality = jpeg, jpeg_quality
        self.padding_side = padding_side
        self.pad_to_multiple = pad_to_multiple
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"reward batch_size must be >= 1 or None, got {batch_size}")
        self.batch_size = None if batch_size is None else int(batch_size)
        self.tokenizer = load_tokenizer(self.model_dir)
        # None: the built-in prompt (the reference's paraphrase, not the paper's wording); else a file or the text
        self.prompts = PromptBuilder(self.tokenizer, template=prompt_template)
        self.digit_ids = digit_token_ids(self.tokenizer)
        self.image_cfg = ImageProcessorConfig.from_dir(self.model_dir)
        if model is None:
            model = qparams.load_model(self.model_dir, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        elif mesh is not None:
            rules.shard_model(model, mesh)
        self.model = model
        cfg = model.config
        if self.prompts.image_token_id != cfg.image_token_id:
            raise ValueError(f"tokenizer <|image_pad|> id {self.prompts.image_token_id} != model image_token_id "
                             f"{cfg.image_token_id}")
        if max(self.digit_ids) >= cfg.text_config.vocab_size:
            raise ValueError(f"digit ids {self.digit_ids} outside the model vocabulary {cfg.text_config.vocab_size}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        self.graphdef, self.state = nnx.split(self.model)

    # ------------------------------------------------------------------------------------------------------
    def __call__(self, sources, edited, instructions: Sequence[str], requirements: Sequence[str] | None = None
                 ) -> np.ndarray:
        return self.score(sources, edited, instructions, requirements)[0]

    def score(self, sources, edited, instructions: Sequence[str], requirements: Sequence[str] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        B = len(instructions)
        requirements = [""] * B if requirements is None else list(requirements)
        if not (len(sources) == len(edited) == B == len(requirements)):
            raise ValueError(f"batch sizes differ: sources {len(sources)}, edited {len(edited)}, instructions {B}, "
                             f"requirements {len(requirements)}")
        if B == 0:
            return np.zeros((0,), np.float32), np.zeros((0, 6), np.float32)
        if self.jpeg:
            sources, edited = self._jpeg(sources), self._jpeg(edited)
        batched = all(hasattr(x, "shape") and len(x.shape) == 4 for x in (sources, edited))
        if batched:
            sources, edited = _batched_float(sources), _batched_float(edited)
            groups = {(tuple(sources.shape[1:3]), tuple(edited.shape[1:3])): list(range(B))}
        else:
            groups = {}
            for i in range(B):
                key = (tuple(np.shape(sources[i])[:2]), tuple(np.shape(edited[i])[:2]))
                groups.setdefault(key, []).append(i)
        scores = np.zeros((B,), np.float32)
        dist = np.zeros((B, 6), np.float32)
        for (src_hw, edit_hw), idx in groups.items():
            if batched:
                src, edt = sources, edited
            else:
                src = np.stack([_as_float(sources[i], i, "source") for i in idx])
                edt = np.stack([_as_float(edited[i], i, "edited") for i in idx])
            s, p = self._score_group(src, edt, [instructions[i] for i in idx], [requirements[i] for i in idx], idx)
            scores[idx], dist[idx] = s, p
        return scores, dist

    def batch_fn(self, source: str = "source_images", edited: str = "images", instruction: str = "prompts",
                 requirement: str = "requirements"):
        """``fn(batch: dict) -> [B]`` for ``rewards.registry`` (the requirement key may be absent)."""
        def fn(batch):
            return self(batch[source], batch[edited], batch[instruction], batch.get(requirement))
        return fn

    # ------------------------------------------------------------------------------------------------------
    def _jpeg(self, images):
        # JPEG is host-only: a global array is gathered to every host here (the one host copy this path needs).
        if isinstance(images, jax.Array):
            images = distributed.gather_global(images)
        out = []
        for i in range(len(images)):
            u8 = to_uint8(np.asarray(jax.device_get(images[i])))
            out.append(jpeg_roundtrip(u8, self.jpeg_quality).astype(np.float32) / np.float32(255.0))
        return out

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape]))

    def _score_group(self, src, edt, instructions, requirements, index):
        """Score one same-size group: ``src``/``edt`` [n, H, W, 3] (numpy, or global arrays on the mesh);
        ``instructions``/``requirements``: all n rows (the same on every process)."""
        n = len(index)
        for name, imgs in (("source", src), ("edited", edt)):
            if imgs.shape[-1] != 3:
                raise ValueError(f"{name} images must be [B, H, W, 3], got {imgs.shape}")
        grid_s = grid_for(src.shape[1], src.shape[2], self.image_cfg)
        grid_e = grid_for(edt.shape[1], edt.shape[2], self.image_cfg)
        seqs = []
        for j, i in enumerate(index):
            try:
                seqs.append(self.prompts(instructions[j], requirements[j], [grid_s, grid_e],
                                         self.image_cfg.merge_size))
            except Exception as e:  # noqa: BLE001 - re-raised naming the sample
                raise RewardError(f"sample {i}: cannot build the prompt: {e}", indices=[i]) from e
        # Micro-batches of batch_size rounded up to the batch shards; the last one repeats its last pair
        # (dropped afterwards), so every call has the same batch shape.
        shards = self._batch_multiple()
        mb = n if self.batch_size is None else min(n, self.batch_size)
        mb = math.ceil(mb / shards) * shards
        src, edt = self._on_mesh(src), self._on_mesh(edt)
        fn = self._fn(grid_s, grid_e)
        outs = []
        for start in range(0, n, mb):
            take = np.minimum(np.arange(start, start + mb), n - 1).astype(np.int32)
            rows = [seqs[j] for j in take]
            L = bucket_length(max(map(len, rows)), self.pad_to_multiple)
            ids = np.full((mb, L), self.pad_id, np.int32)
            mask = np.zeros((mb, L), np.int32)
            for r, q in enumerate(rows):
                if self.padding_side == "left":
                    ids[r, L - len(q):], mask[r, L - len(q):] = q, 1
                else:
                    ids[r, :len(q)], mask[r, :len(q)] = q, 1
            last = mask.sum(1) - 1
            pos = get_rope_index(ids, mask, [g for _ in rows for g in (grid_s, grid_e)],
                                 image_token_id=self.model.config.image_token_id,
                                 spatial_merge_size=self.model.config.vision_config.spatial_merge_size)
            args = (ids, mask, pos.astype(np.int32), last.astype(np.int32), take)
            if self.mesh is not None:
                args = self._shard_inputs(args)
                with jax.set_mesh(self.mesh):
                    outs.append(fn(self.state, *args, src, edt))
            else:
                outs.append(fn(self.state, *args, src, edt))
        # One read-back per call: the micro-batches' scores stay on device until here.
        joined = outs[0] if len(outs) == 1 else tuple(jnp.concatenate(xs) for xs in zip(*outs))
        scores, probs, ok = (distributed.gather_global(x) for x in joined)
        bad = [index[j] for j in range(n) if not ok[j]]
        if bad:
            raise RewardError(f"samples {bad}: non-finite images or logits (images must be finite floats in [0, 1])",
                              indices=bad, scores=scores[:n] if list(index) == list(range(n)) else None)
        return scores[:n].astype(np.float32), probs[:n].astype(np.float32)

    def _on_mesh(self, images):
        """Host images -> a batch-sharded global array (one process: device_put); global arrays unchanged."""
        if self.mesh is None or isinstance(images, jax.Array):
            return images
        if jax.process_count() > 1:
            raise ValueError("in a multi-process run the reward takes global arrays on the mesh (the decoder's "
                             "output), not host images")
        a = np.asarray(images)
        spec = rules.partition_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, self.mesh)
        return jax.device_put(a, NamedSharding(self.mesh, spec))

    def _shard_inputs(self, args):
        """Host arrays that are the same on every process -> global arrays; each process fills its own shards
        (no cross-process transfer or equality check)."""
        out = []
        for k, a in enumerate(args):
            if k == 2:  # position ids [3, B, L]
                spec = rules.partition_spec((None, "batch", None), a.shape, self.mesh)
            elif k == 4:  # row indices into the image batch: replicated
                spec = jax.sharding.PartitionSpec()
            else:
                spec = rules.partition_spec(("batch",) + (None,) * (a.ndim - 1), a.shape, self.mesh)
            out.append(jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, spec), lambda i, a=a: a[i]))
        return out

    def _fn(self, grid_s, grid_e):
        return functools.partial(_score_fn, self.graphdef, self.image_cfg, self.digit_ids,
                                 self.padding_side == "left", grid_s, grid_e)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _score_fn(graphdef, pcfg, digit_ids, left, grid_s, grid_e, state, ids, mask, pos, last, take, src, edt):
    """Module level so that every MLLMReward over the same architecture shares the compiled programs.
    ``take`` [mb] selects this micro-batch's rows of the whole image batch (on device, no host round trip)."""
    model = nnx.merge(graphdef, state)
    src, edt = jnp.take(src, take, axis=0), jnp.take(edt, take, axis=0)
    imgs_ok = jnp.all(jnp.isfinite(src), axis=(1, 2, 3)) & jnp.all(jnp.isfinite(edt), axis=(1, 2, 3))
    src_tok = model.encode_images(preprocess_device(src, pcfg), grid_s)
    edt_tok = model.encode_images(preprocess_device(edt, pcfg), grid_e)
    image_embeds = jnp.concatenate([src_tok, edt_tok], axis=1).reshape(-1, src_tok.shape[-1])
    logits = model(ids, mask, pos, image_embeds, last_only=left, gather_index=None if left else last,
                   vocab_ids=digit_ids)
    score, probs = expected_score(logits.astype(jnp.float32))
    return score, probs, imgs_ok & jnp.all(jnp.isfinite(logits), axis=-1)


def _as_float(image, i, what) -> np.ndarray:
    a = np.asarray(jax.device_get(image))
    if a.ndim != 3 or a.shape[-1] != 3:
        raise RewardError(f"sample {i}: {what} image must be HWC RGB, got shape {a.shape}", indices=[i])
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255.0)
    return a.astype(np.float32)


def _batched_float(images):
    """uint8 batches -> float [0, 1]; float batches unchanged (values are clipped to [0, 1] by the uint8
    rounding of the preprocessing, as the reference client clamps)."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        if images.dtype != jnp.uint8:
            raise ValueError(f"integer images must be uint8, got {images.dtype}")
        return images.astype(np.float32) / np.float32(255.0)
    return images
