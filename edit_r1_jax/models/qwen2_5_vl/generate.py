"""Batched autoregressive decoding for Qwen2.5-VL with a preallocated KV cache (the evaluation judge).

One jitted program per (batch, prompt length, max_new_tokens, sampling) shape:

    prefill:  the whole left-padded prompt (image tokens merged in) through every layer, writing K/V of all
              prompt positions into the cache [layers, B, L + max_new_tokens, kv_heads, head_dim]
    decode:   lax.while_loop: pick token t from the last logits (argmax, or a categorical draw at
              ``temperature``), feed it back as one query position L + t, stop when every row has emitted an
              EOS id (per-row ``done`` flags; finished rows emit ``pad_id``) or after ``max_new_tokens``.

M-RoPE positions of generated tokens continue from the prompt's largest position + 1 on every axis, per row
(transformers' ``rope_deltas``: position = cumsum(mask) - 1 + max + 1 - n_valid = max + 1 + t).

The layers are run by ``decode_layer`` (one layer, any number of query positions, reading and writing that
layer's cache slice); ``run_layers`` runs all of them as one ``lax.scan`` over the stacked layer state (the model's
``text_config.scan_layers``; models/scan.py) with the caches as scanned inputs/outputs, ``lax.scan(lambda x,
(layer, k, v): decode_layer(...), x, (layers, cache_k, cache_v))``, so prefill and the decode step each compile one
layer instead of ``num_hidden_layers``. ``scan_layers=False``: a python loop over the same stacked layers.
The submodules (q/k/v/o projections, norms, MLP) and the rope helpers are the prefill model's own, so the
parameters are shared with the reward and the parity of those pieces carries over.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models import scan
from edit_r1_jax.models.attention import attention
from edit_r1_jax.models.qwen2_5_vl.language import mrope_cos_sin
from edit_r1_jax.models.qwen2_5_vl.layers import apply_rope
from edit_r1_jax.parallel import rules

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature`` 0 is greedy (argmax, ties to the lowest id as torch.argmax)."""

    max_new_tokens: int = 512
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    temperature: float = 0.0
    return_logits: bool = False  # full-vocabulary logits of every step (memory: B x max_new x vocab floats)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))


class Generated(NamedTuple):
    tokens: np.ndarray          # [B, max_new_tokens] int32, pad_token_id after each row's EOS
    lengths: np.ndarray         # [B] generated tokens per row, the EOS included
    logits: np.ndarray | None   # [B, max_new_tokens, V] float32 logits that chose each token (return_logits)


# ---------------------------------------------------------------------------------------------------------------
# One layer, and the one loop over layers.


def decode_layer(layer, x, cos, sin, cache_k, cache_v, write_pos, mask):
    """One decoder layer over ``x`` [B, T, D] whose K/V are written at cache index ``write_pos`` (scalar).

    cache_k / cache_v: this layer's cache [B, S, kv_heads, head_dim]; ``mask`` [B, 1, T, S] (True = attend).
    Returns (x, cache_k, cache_v) with the T new positions written.
    """
    attn = layer.self_attn
    B, T, _ = x.shape
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).reshape(B, T, -1, attn.head_dim)
    k = attn.k_proj(h).reshape(B, T, -1, attn.head_dim)
    v = attn.v_proj(h).reshape(B, T, -1, attn.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = rules.constrain(q, ("batch", "length", "act_heads", None))
    start = (0, write_pos, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
    out = attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), mask=mask)
    x = x + attn.o_proj(out.reshape(B, T, -1))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return rules.constrain(x, ("batch", "length", "act_embed")), cache_k, cache_v


def run_layers(text_model, x, cos, sin, cache_k, cache_v, write_pos, mask, *, use_scan: bool | None = None):
    """Every decoder layer in order; caches [layers, B, S, kv_heads, head_dim]. Returns (normed x, caches).

    ``use_scan`` (default ``text_config.scan_layers``): one ``lax.scan`` over the stacked layers, each layer's
    cache slice a scanned input and its updated slice a scanned output; False: a python loop. cos/sin, the mask
    and ``write_pos`` are the same for every layer (closure)."""
    layers = text_model.layers
    if use_scan is None:
        use_scan = text_model.config.scan_layers
    if layers is None:
        return text_model.norm(x), cache_k, cache_v
    if cache_k.shape[0] != len(layers):
        raise ValueError(f"KV cache has {cache_k.shape[0]} layers, the model {len(layers)}")
    # the stacked layer state is split once: every layer is merged from its slice, nothing is written back
    graphdef, stacked, rest = nnx.split(layers, lambda path, v: scan.is_stacked(v), ...)

    def one(x, layer_state, k_i, v_i):
        layer = nnx.merge(graphdef, layer_state, rest)
        return decode_layer(layer, x, cos, sin, k_i, v_i, write_pos, mask)

    if use_scan:
        def body(x, inp):
            x, k_i, v_i = one(x, *inp)
            return x, (k_i, v_i)

        x, (cache_k, cache_v) = jax.lax.scan(body, x, (stacked, cache_k, cache_v))
    else:
        for i in range(len(layers)):
            x, k_i, v_i = one(x, jax.tree.map(lambda a, i=i: a[i], stacked), cache_k[i], cache_v[i])
            cache_k = cache_k.at[i].set(k_i)
            cache_v = cache_v.at[i].set(v_i)
    return text_model.norm(x), cache_k, cache_v


# ---------------------------------------------------------------------------------------------------------------


def embed_inputs(model, input_ids, image_embeds):
    """Token embeddings with the image tokens replaced by ``image_embeds`` rows in sequence order (as the
    model's prefill). Extra rows of ``image_embeds`` beyond the image-token count are ignored (bucket padding)."""
    x = model.model.embed_tokens(input_ids)
    if image_embeds is None:
        return x
    is_img = input_ids == model.config.image_token_id
    idx = jnp.cumsum(is_img.reshape(-1)) - 1
    gathered = jnp.take(image_embeds.astype(x.dtype), jnp.clip(idx, 0, image_embeds.shape[0] - 1), axis=0)
    return jnp.where(is_img[..., None], gathered.reshape(x.shape), x)


def _choose(logits, key, temperature):
    """argmax at temperature 0, else a categorical draw (traced: one program serves every temperature)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.maximum(temperature, jnp.float32(1e-30))
    drawn = jax.random.categorical(key, logits.astype(jnp.float32) / t, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def _generate(model, cfg: SamplingConfig, input_ids, attention_mask, position_ids, image_embeds, key, eos,
              temperature):
    tc = model.config.text_config
    B, L = input_ids.shape
    N = cfg.max_new_tokens
    S = L + N
    dtype = model.config.dtype
    valid = attention_mask.astype(bool)
    cache_shape = (tc.num_hidden_layers, B, S, tc.num_key_value_heads, tc.head_dim)
    cache_axes = (None, "batch", None, None, None)
    cache_k = rules.constrain(jnp.zeros(cache_shape, dtype), cache_axes)
    cache_v = rules.constrain(jnp.zeros(cache_shape, dtype), cache_axes)
    kv_valid = jnp.concatenate([valid, jnp.zeros((B, N), bool)], axis=1)  # [B, S]

    # prefill: causal over the prompt, padding keys masked; a padding query attends to itself (well defined,
    # and no real token ever reads a padding key)
    q_idx = jnp.arange(L)[:, None]
    k_idx = jnp.arange(S)[None, :]
    mask = ((k_idx <= q_idx)[None] & kv_valid[:, None, :]) | (k_idx == q_idx)[None]
    x = rules.constrain(embed_inputs(model, input_ids, image_embeds).astype(dtype), ("batch", "length", "act_embed"))
    cos, sin = mrope_cos_sin(position_ids, tc)
    h, cache_k, cache_v = run_layers(model.model, x, cos, sin, cache_k, cache_v, 0, mask[:, None])
    last_logits = model.logits(h[:, -1]).astype(jnp.float32)  # left padding: the last column is real

    # every axis continues from the row's largest prompt position (transformers' rope_deltas)
    next_pos = jnp.max(jnp.where(valid[None], position_ids, -1), axis=(0, 2)) + 1  # [B]
    V = last_logits.shape[-1]
    logits_buf = jnp.zeros((B, N, V) if cfg.return_logits else (B, 0, V), jnp.float32)
    tokens = jnp.full((B, N), cfg.pad_token_id, jnp.int32)
    done = jnp.zeros((B,), bool)
    lengths = jnp.zeros((B,), jnp.int32)

    def cond(carry):
        t, done = carry[0], carry[2]
        return (t < N) & ~jnp.all(done)

    def body(carry):
        t, tokens, done, lengths, cache_k, cache_v, kv_valid, last_logits, logits_buf, key = carry
        key, sub = jax.random.split(key)
        tok = _choose(last_logits, sub, temperature)
        tok = jnp.where(done, cfg.pad_token_id, tok)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, t))
        if cfg.return_logits:
            logits_buf = jax.lax.dynamic_update_slice(logits_buf, last_logits[:, None], (0, t, 0))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == eos[None], axis=-1)
        # feed the new token at cache index L + t (the forward after the last step is cheap and unused)
        p = L + t
        kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((B, 1), bool), (0, p))
        step_mask = ((jnp.arange(S) <= p)[None] & kv_valid)[:, None, None, :]  # [B, 1, 1, S]
        pos = jnp.broadcast_to((next_pos + t)[None, :, None], (3, B, 1))
        c, s = mrope_cos_sin(pos, tc)
        xt = model.model.embed_tokens(tok[:, None]).astype(dtype)
        h, cache_k, cache_v = run_layers(model.model, xt, c, s, cache_k, cache_v, p, step_mask)
        last_logits = model.logits(h[:, -1]).astype(jnp.float32)
        return t + 1, tokens, done, lengths, cache_k, cache_v, kv_valid, last_logits, logits_buf, key

    carry = (jnp.int32(0), tokens, done, lengths, cache_k, cache_v, kv_valid, last_logits, logits_buf, key)
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[1], carry[3], carry[8]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate_jit(graphdef, cfg, state, input_ids, attention_mask, position_ids, image_embeds, key, eos,
                  temperature):
    return _generate(nnx.merge(graphdef, state), cfg, input_ids, attention_mask, position_ids, image_embeds, key,
                     eos, temperature)


def generate(model, input_ids, attention_mask, position_ids, image_embeds=None, *, cfg: SamplingConfig,
             seed: int = 0, mesh=None, graphdef_state=None) -> Generated:
    """Decode from left-padded prompts.

    input_ids / attention_mask [B, L] (left padding: every row's last column is a real token), position_ids
    [3, B, L] from ``model.get_rope_index``, image_embeds [N, hidden] (``embed_images``; at least the prompt's
    image-token count rows, extra rows ignored). With ``mesh`` the batch is sharded over its batch axes
    (B must divide by them: callers pad). ``graphdef_state``: a cached ``nnx.split(model)``.
    """
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [B, L]")
    if not mask[:, -1].all():
        raise ValueError("prompts must be left padded: attention_mask[:, -1] has zeros "
                         f"in rows {np.nonzero(mask[:, -1] == 0)[0].tolist()}")
    pos = np.asarray(position_ids, np.int32)
    if pos.shape != (3,) + ids.shape:
        raise ValueError(f"position_ids must be [3, B, L] = {(3,) + ids.shape}, got {pos.shape}")
    n_img = int((ids == model.config.image_token_id).sum())
    if n_img and (image_embeds is None or image_embeds.shape[0] < n_img):
        got = None if image_embeds is None else image_embeds.shape[0]
        raise ValueError(f"prompt holds {n_img} image tokens but image_embeds has {got} rows")
    graphdef, state = graphdef_state if graphdef_state is not None else nnx.split(model)
    key = jax.random.key(seed)
    # EOS ids and temperature are traced (padded to a fixed count), so changing them does not recompile
    eos = np.full((8,), -1, np.int32)
    if len(cfg.eos_token_ids) > 8:
        raise ValueError(f"at most 8 EOS ids, got {len(cfg.eos_token_ids)}")
    eos[: len(cfg.eos_token_ids)] = cfg.eos_token_ids
    static = dataclasses.replace(cfg, eos_token_ids=(), temperature=0.0)
    extra = (key, jnp.asarray(eos), jnp.float32(cfg.temperature))
    args = [ids, mask, pos, None if image_embeds is None else jnp.asarray(image_embeds)]
    if mesh is not None:
        from jax.sharding import NamedSharding

        specs = [("batch", None), ("batch", None), (None, "batch", None), None]
        args = [a if sp is None or a is None else
                jax.device_put(a, NamedSharding(mesh, rules.partition_spec(sp, a.shape, mesh)))
                for a, sp in zip(args, specs)]
        with jax.set_mesh(mesh):
            out = _generate_jit(graphdef, static, state, *args, *extra)
    else:
        out = _generate_jit(graphdef, static, state, *args, *extra)
    tokens, lengths, logits = (np.asarray(jax.device_get(o)) for o in out)
    return Generated(tokens, lengths, logits if cfg.return_logits else None)


def trim(tokens: np.ndarray, lengths: np.ndarray, eos_token_ids: Sequence[int] = ()) -> list[list[int]]:
    """Per-row generated ids without the padding and without a trailing EOS."""
    out = []
    eos = set(int(e) for e in eos_token_ids)
    for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
        ids = [int(t) for t in row[: int(n)]]
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        out.append(ids)
    return out
