"""CLIP text encoder (transformers ``CLIPTextModel``) in Flax NNX: last hidden state and pooled output.

Pooled output = final-layer-normed hidden state at the EOS position, per transformers' rule: when
``eos_token_id == 2`` (old configs) the position of the largest token id, otherwise the first position whose
id equals ``eos_token_id`` (position 0 if a row has none). Attention is causal; FLUX passes no padding mask.
LayerNorm statistics and softmax run in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from edit_r1_jax.parallel.rules import constrain, param

__all__ = ["CLIPTextConfig", "CLIPTextModel"]

_INIT = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Mirrors transformers' ``CLIPTextConfig`` (widths: FLUX's openai/clip-vit-large-patch14 text tower; token ids:
    transformers' defaults -- the real FLUX config says eos_token_id=2, which selects the legacy argmax rule)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int | None = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.hidden_act not in _ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; known {sorted(_ACTS)}")


_ACTS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class Linear(nnx.Module):
    def __init__(self, cin, cout, axes, *, bias=True, dtype=jnp.float32, param_dtype=jnp.float32, rngs):
        self.kernel = param(_INIT(rngs.params(), (cin, cout), param_dtype), axes)
        self.bias = param(jnp.zeros((cout,), param_dtype), (axes[1],)) if bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim, eps, *, dtype=jnp.float32, param_dtype=jnp.float32):
        self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((dim,), param_dtype), ("norm",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Embed(nnx.Module):
    def __init__(self, num, dim, *, param_dtype=jnp.float32, rngs):
        self.embedding = param(_INIT(rngs.params(), (num, dim), param_dtype), ("vocab", "embed"))

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs):
        d = cfg.hidden_size
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.q_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, ("embed", "heads"), **kw)
        self.out_proj = Linear(d, d, ("heads", "embed"), **kw)
        self.heads, self.head_dim, self.dtype = cfg.num_attention_heads, d // cfg.num_attention_heads, cfg.dtype

    def __call__(self, x, bias):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.heads, self.head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits * (self.head_dim ** -0.5) + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
        return self.out_proj(o)


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)
        self.act = _ACTS[cfg.hidden_act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.self_attn = CLIPAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(cfg, rngs=rngs)

    def __call__(self, x, bias):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, ("batch", "length", "act_embed"))


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs):
        self.token_embedding = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=cfg.param_dtype, rngs=rngs)
        self.position_embedding = Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                        param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, ids):
        t = ids.shape[-1]
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(t))[None]


class CLIPTextModel(nnx.Module):
    """``__call__(input_ids [B, T] int, attention_mask [B, T] | None) -> (last_hidden [B, T, D], pooled [B, D])``."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs)
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=cfg.dtype,
                                          param_dtype=cfg.param_dtype)

    def __call__(self, input_ids, attention_mask=None):
        cfg = self.cfg
        ids = jnp.asarray(input_ids, jnp.int32)
        b, t = ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed max_position_embeddings={cfg.max_position_embeddings}")
        x = self.embeddings(ids).astype(cfg.dtype)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            allowed = allowed & jnp.asarray(attention_mask, bool)[:, None, None, :]
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        for layer in self.layers:
            x = layer(x, bias)
        x = self.final_layer_norm(x)
        if cfg.eos_token_id == 2:
            pos = jnp.argmax(ids, axis=-1)
        else:
            pos = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        return x, pooled
