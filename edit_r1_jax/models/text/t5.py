"""T5 v1.1 encoder (transformers ``T5EncoderModel``) in Flax NNX: last hidden state.

Pre-norm blocks with T5's RMS-style LayerNorm (no mean, no bias; statistics in float32), unscaled
dot-product attention plus a bucketed relative position bias computed by the first block and shared by all
blocks, gated-GELU (tanh approximation, ``gelu_new``) feed-forward. FLUX passes no attention mask (pads are
attended); ``attention_mask`` is optional here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.parallel.rules import constrain, param

__all__ = ["T5Config", "T5EncoderModel", "relative_position_buckets"]

_INIT = nnx.initializers.normal(0.05)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Mirrors transformers' ``T5Config`` (defaults: google/t5-v1_1-xxl, FLUX's ``text_encoder_2``)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.dense_act_fn not in _ACTS:
            raise ValueError(f"unsupported dense_act_fn {self.dense_act_fn!r}; known {sorted(_ACTS)}")


_ACTS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int = 32, max_distance: int = 128,
                              bidirectional: bool = True) -> np.ndarray:
    """``[q, k]`` int32 buckets, bit-identical to transformers' ``_relative_position_bucket`` (float32 log)."""
    rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        large = (np.log(rel.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                 * np.float32(num_buckets - max_exact))
    large = max_exact + np.where(is_small, 0, large).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class Linear(nnx.Module):
    def __init__(self, cin, cout, axes, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        self.kernel = param(_INIT(rngs.params(), (cin, cout), param_dtype), axes)
        self.dtype = dtype

    def __call__(self, x):
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)


class T5LayerNorm(nnx.Module):
    def __init__(self, dim, eps, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, rngs):
        inner = cfg.num_heads * cfg.d_kv
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q = Linear(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.k = Linear(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.v = Linear(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.o = Linear(inner, cfg.d_model, ("heads", "embed"), **kw)
        self.relative_attention_bias = (
            param(_INIT(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), cfg.param_dtype),
                  (None, None)) if has_relative_attention_bias else None)
        self.cfg = cfg

    def position_bias(self, t: int):
        cfg = self.cfg
        buckets = relative_position_buckets(t, t, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance, True)
        values = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), jnp.asarray(buckets), axis=0)
        return values.transpose(2, 0, 1)[None]  # [1, H, q, k]

    def __call__(self, x, bias):
        b, t, _ = x.shape
        h, d = self.cfg.num_heads, self.cfg.d_kv
        q = self.q(x).reshape(b, t, h, d)
        k = self.k(x).reshape(b, t, h, d)
        v = self.v(x).reshape(b, t, h, d)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(self.cfg.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h * d)
        return self.o(o)


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wo = Linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)
        self.act = _ACTS[cfg.dense_act_fn]

    def __call__(self, x):
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


class T5DenseActDense(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.wi = Linear(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wo = Linear(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)
        self.act = _ACTS[cfg.dense_act_fn]

    def __call__(self, x):
        return self.wo(self.act(self.wi(x)))


class T5Block(nnx.Module):
    """Parameter paths follow transformers: ``layer.0`` = self-attention sublayer, ``layer.1`` = feed-forward."""

    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool, *, rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.attn = T5Attention(cfg, has_relative_attention_bias, rngs=rngs)
        self.ff_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.ff = T5DenseGatedActDense(cfg, rngs=rngs) if cfg.is_gated_act else T5DenseActDense(cfg, rngs=rngs)

    def __call__(self, x, bias):
        x = x + self.attn(self.attn_norm(x), bias)
        x = x + self.ff(self.ff_norm(x))
        return constrain(x, ("batch", "length", "act_embed"))


class T5EncoderModel(nnx.Module):
    """``__call__(input_ids [B, T] int, attention_mask [B, T] | None) -> last_hidden_state [B, T, d_model]``."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.shared = param(_INIT(rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.param_dtype), ("vocab", "embed"))
        self.blocks = nnx.List([T5Block(cfg, i == 0, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=cfg.dtype,
                                            param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, attention_mask=None):
        cfg = self.cfg
        ids = jnp.asarray(input_ids, jnp.int32)
        t = ids.shape[1]
        x = jnp.take(self.shared[...], ids, axis=0).astype(cfg.dtype)
        bias = self.blocks[0].attn.position_bias(t)
        if attention_mask is not None:
            keep = jnp.asarray(attention_mask, bool)[:, None, None, :]
            bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
        for block in self.blocks:
            x = block(x, bias)
        return self.final_layer_norm(x)
