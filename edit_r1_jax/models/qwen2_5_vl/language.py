"""Qwen2 language model of Qwen2.5-VL: GQA attention with biases on q/k/v, multimodal RoPE (M-RoPE), SwiGLU,
RMSNorm. Prefill only (no KV cache): the reward needs the logits of the first generated token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models import scan
from edit_r1_jax.models.attention import attention
from edit_r1_jax.models.qwen2_5_vl.layers import Linear, RMSNorm, SwiGLU, _init, apply_rope
from edit_r1_jax.parallel import rules


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True  # decoder layers under jax.lax.scan (models/scan.py); False: python loop

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def mrope_cos_sin(position_ids: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """position_ids [3, B, L] (temporal, height, width) -> float32 cos/sin [B, L, head_dim].

    Frequency band i of the head dimension takes its angle from axis (section index % 3), sections given by
    ``mrope_section`` (which sums to head_dim/2); the half is then duplicated (rotate-half layout).
    """
    d = cfg.head_dim
    if sum(cfg.mrope_section) != d // 2:
        raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim/2 = {d // 2}")
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [3, B, L, d/2]
    axis_of_band = np.concatenate([np.full(s, i % 3) for i, s in enumerate(cfg.mrope_section)])
    band = jnp.asarray(axis_of_band)
    freqs = jnp.where(band == 0, freqs[0], jnp.where(band == 1, freqs[1], freqs[2]))  # [B, L, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        hd, h, kvh = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = Linear(cfg.hidden_size, h * hd, axes=("embed", "heads"), bias=True, **kw)
        self.k_proj = Linear(cfg.hidden_size, kvh * hd, axes=("embed", "kv_heads"), bias=True, **kw)
        self.v_proj = Linear(cfg.hidden_size, kvh * hd, axes=("embed", "kv_heads"), bias=True, **kw)
        self.o_proj = Linear(h * hd, cfg.hidden_size, axes=("heads", "embed"), bias=False, **kw)
        self.head_dim = hd

    def __call__(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, -1, self.head_dim)
        k = self.k_proj(x).reshape(B, L, -1, self.head_dim)
        v = self.v_proj(x).reshape(B, L, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = rules.constrain(q, ("batch", "length", "act_heads", None))
        k = rules.constrain(k, ("batch", "length", "act_heads", None))
        v = rules.constrain(v, ("batch", "length", "act_heads", None))
        out = attention(q, k, v, mask=mask)  # GQA: kv heads divide q heads (grouped, as repeat_kv)
        return self.o_proj(out.reshape(B, L, -1))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, rngs=rngs)
        if cfg.hidden_act != "silu":
            raise ValueError(f"text hidden_act {cfg.hidden_act!r} not supported (Qwen2.5-VL uses silu)")
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return rules.constrain(x, ("batch", "length", "act_embed"))


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = rules.param(_init(rngs.params(), (vocab, dim), param_dtype), ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x):
        return jnp.dot(x, self.embedding[...].astype(self.dtype).T)


def causal_padding_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, L] (1 = token, 0 = padding) -> boolean [B, 1, L, L]: causal, padding keys masked.

    A padding query (whose keys would all be masked under left padding) attends to itself so that its row
    is well defined; padding rows never feed real tokens because padding keys are masked for everyone.
    """
    L = attention_mask.shape[-1]
    valid = attention_mask.astype(bool)
    causal = jnp.tril(jnp.ones((L, L), bool))
    mask = causal[None] & valid[:, None, :]
    mask = mask | jnp.eye(L, dtype=bool)[None]
    return mask[:, None]


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  rngs=rngs)
        # Stacked: model.layers.<rest> [L, ...] <-> checkpoint keys model.layers.{i}.<rest> (models/scan.py).
        self.layers = scan.stack(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, inputs_embeds, attention_mask, position_ids):
        """inputs_embeds [B, L, D], attention_mask [B, L], position_ids [3, B, L] -> final hidden [B, L, D]."""
        cos, sin = mrope_cos_sin(position_ids, self.config)
        mask = causal_padding_mask(attention_mask)
        x = rules.constrain(inputs_embeds.astype(self.config.dtype), ("batch", "length", "act_embed"))
        x = scan.run(self.layers, x, lambda layer, x, _: layer(x, cos, sin, mask), use_scan=self.config.scan_layers)
        return self.norm(x)
