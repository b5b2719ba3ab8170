"""FLUX.1 / FLUX.1-Kontext transformer (MMDiT) in Flax NNX, matching diffusers 0.42 ``FluxTransformer2DModel``.

Parameter paths mirror the diffusers module names (``transformer_blocks.3.attn.to_q.kernel``,
``transformer_blocks.3.attn.to_out.0.kernel``, ``transformer_blocks.3.ff.net.0.proj.kernel``,
``single_transformer_blocks.5.proj_mlp.kernel``, ``time_text_embed.timestep_embedder.linear_1.kernel``,
``norm_out.linear.kernel``, ...); Linear weights are ``kernel [in, out]`` + ``bias``, RMSNorm weights ``scale``.
In memory the double and single blocks are stacked (``transformer_blocks.attn.to_q.kernel [19, in, out]``, LoRA
likewise) and run under ``jax.lax.scan`` (models/scan.py); checkpoints and exported LoRA keep the per-layer keys
above, the loaders stack at load.

Precision: RoPE tables, the sinusoidal timestep/guidance features, the timestep/guidance/pooled-text embedders,
all norm statistics and the attention softmax run in float32; everything else in ``config.dtype``.

Usage::

    cfg = FluxConfig(dtype=jnp.bfloat16, remat_policy="full", lora=LoRAConfig())
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0))
    v = kontext_velocity(model, x_t, ref_latents, prompt_embeds, pooled, sigma, img_ids, txt_ids, guidance)

``timestep`` and ``guidance`` are passed like diffusers (``sigma`` in [0, 1], guidance scale e.g. 2.5); both are
multiplied by 1000 inside. The single-stream blocks keep ``[text; image]`` concatenated across all 38 blocks
(diffusers re-concatenates per block: identical values).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models.attention import attention
from edit_r1_jax.models import scan
from edit_r1_jax.models.lora import LoRAConfig, linear_maker
from edit_r1_jax.parallel import rules

REMAT_POLICIES = scan.REMAT_POLICIES

_DIFFUSERS_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                     "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                     "guidance_embeds", "axes_dims_rope")


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None
    lora: LoRAConfig | None = None
    # Double and single blocks run under jax.lax.scan over stacked parameters (models/scan.py: one compiled block
    # per kind). False: the same stacked parameters in a python loop (reference for tests and bench/compile.py).
    scan_layers: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoRAConfig.from_dict(self.lora))
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim "
                             f"{self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> "FluxConfig":
        """From a diffusers ``config.json`` dict (unknown keys such as ``_class_name`` are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "axes_dims_rope" in kw:
            kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
        kw.update(overrides)
        return cls(**kw)

    def to_diffusers(self) -> dict:
        d = {k: getattr(self, k) for k in _DIFFUSERS_FIELDS}
        d["axes_dims_rope"] = list(d["axes_dims_rope"])
        return d


# ---------------------------------------------------------------------------------------------------------
# Small building blocks.


def _layer_norm(x, eps=1e-6):
    """LayerNorm without affine parameters, statistics in float32, result in x.dtype."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = rules.param(jnp.ones((dim,), param_dtype), ("norm",))

    def __call__(self, x):
        return _rms_norm(x, self.scale[...], self.eps)


# The norm and the GELU are elementwise chains whose autodiff residuals (x and several intermediates, some saved
# twice) each cost a [tokens, features] write per layer, stacked by the layer scan; under jax.checkpoint the backward
# keeps only the input and recomputes the chain inside its own fusion. bench/dit.py (FLUX, 2+4 blocks, float32, 2
# cores): forward+backward 2.36 -> 2.17 s; the forward is unchanged (checkpoint is the identity there).
@functools.partial(jax.checkpoint, static_argnums=(2,))
def _rms_norm(x, scale, eps):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


@jax.checkpoint
def gelu_tanh(x):
    """diffusers' ``gelu-approximate`` (tanh GELU), rematerialised in the backward (see _rms_norm)."""
    return jax.nn.gelu(x, approximate=True)


class _NoParams(nnx.Module):
    """Placeholder for parameter-free diffusers modules (Dropout) so list indices match diffusers names."""


class _Proj(nnx.Module):
    """diffusers ``GELU`` module (``.proj`` Linear + tanh GELU)."""

    def __init__(self, dim, hidden, mk):
        self.proj = mk(dim, hidden, ("embed", "mlp"), "proj")

    def __call__(self, x):
        return gelu_tanh(self.proj(x))


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")``: net.0.proj, net.2."""

    def __init__(self, dim, mk):
        self.net = nnx.List([_Proj(dim, 4 * dim, lambda *a: mk(a[0], a[1], a[2], "net.0." + a[3])), _NoParams(),
                             mk(4 * dim, dim, ("mlp", "embed"), "net.2")])

    def __call__(self, x):
        h = self.net[0](x)
        h = rules.constrain(h, ("batch", "length", "act_mlp"))
        return self.net[2](h)


class _LinearHolder(nnx.Module):
    """A module with a single ``linear`` (diffusers AdaLayerNorm* / TimestepEmbedding naming helper)."""


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection(act=silu))."""

    def __init__(self, in_dim, dim, mk, prefix):
        self.linear_1 = mk(in_dim, dim, (None, "embed"), prefix + ".linear_1", jnp.float32)
        self.linear_2 = mk(dim, dim, ("embed", None), prefix + ".linear_2", jnp.float32)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def timestep_features(t, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features [cos, sin] (diffusers ``Timesteps(256, flip_sin_to_cos=True, shift=0)``), float32."""
    # The arguments reach t*1000 ~ 2500 rad (guidance 2.5), where one ulp of a float32 frequency moves the angle
    # by ~1e-4 rad, so the frequencies are host constants: the float32 exponent computed with the diffusers op
    # order, then a correctly rounded exp (torch's float32 exp agrees on 126 of the 128 values).
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeTextEmbed(nnx.Module):
    def __init__(self, cfg: FluxConfig, mk):
        d = cfg.inner_dim
        self.guidance_embeds = cfg.guidance_embeds
        self.timestep_embedder = TimestepEmbedding(256, d, mk, "time_text_embed.timestep_embedder")
        self.guidance_embedder = (TimestepEmbedding(256, d, mk, "time_text_embed.guidance_embedder")
                                  if cfg.guidance_embeds else None)
        self.text_embedder = TimestepEmbedding(cfg.pooled_projection_dim, d, mk, "time_text_embed.text_embedder")

    def __call__(self, timestep, guidance, pooled):
        emb = self.timestep_embedder(timestep_features(timestep))
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_features(guidance))
        return emb + self.text_embedder(pooled.astype(jnp.float32))


def rope_tables(ids, axes_dims, theta: float = 10000.0):
    """cos/sin tables [L, head_dim] for 3-axis RoPE (pairs interleaved, like diffusers ``FluxPosEmbed``), f32."""
    ids = ids.astype(jnp.float32)
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = jnp.asarray(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d), jnp.float32)
        ang = ids[:, i:i + 1] * freqs[None, :]
        cos.append(jnp.repeat(jnp.cos(ang), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(ang), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x, cos, sin):
    """x [B, L, H, D]; pairs (x[2i], x[2i+1]) rotated by the angle in cos/sin[:, 2i]. float32 math."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(xf.shape)
    out = xf * cos[None, :, None, :] + rot * sin[None, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Attention and blocks.


class FluxAttention(nnx.Module):
    def __init__(self, cfg: FluxConfig, mk, prefix: str, joint: bool):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.head_dim, self.impl = cfg.num_attention_heads, hd, cfg.attention_impl
        self.norm_q = RMSNorm(hd, param_dtype=cfg.param_dtype)
        self.norm_k = RMSNorm(hd, param_dtype=cfg.param_dtype)
        self.to_q = mk(d, d, ("embed", "heads"), prefix + ".to_q")
        self.to_k = mk(d, d, ("embed", "heads"), prefix + ".to_k")
        self.to_v = mk(d, d, ("embed", "heads"), prefix + ".to_v")
        self.joint = joint
        if joint:
            self.to_out = nnx.List([mk(d, d, ("heads", "embed"), prefix + ".to_out.0")])
            self.norm_added_q = RMSNorm(hd, param_dtype=cfg.param_dtype)
            self.norm_added_k = RMSNorm(hd, param_dtype=cfg.param_dtype)
            self.add_q_proj = mk(d, d, ("embed", "heads"), prefix + ".add_q_proj")
            self.add_k_proj = mk(d, d, ("embed", "heads"), prefix + ".add_k_proj")
            self.add_v_proj = mk(d, d, ("embed", "heads"), prefix + ".add_v_proj")
            self.to_add_out = mk(d, d, ("heads", "embed"), prefix + ".to_add_out")

    def _heads(self, x):
        x = x.reshape(*x.shape[:-1], self.heads, self.head_dim)
        return rules.constrain(x, ("batch", "length", "act_heads", None))

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        return norm_q(self._heads(to_q(x))), norm_k(self._heads(to_k(x))), self._heads(to_v(x))

    def __call__(self, x, cos, sin, context=None):
        """Joint: x image [B,L,D], context text [B,T,D] -> (image out, text out) after output projections.
        Single: x = [text; image] [B,T+L,D] -> attention output [B,T+L,D] (no output projection)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q, self.norm_added_k)
            q = jnp.concatenate([cq, q], axis=1)
            k = jnp.concatenate([ck, k], axis=1)
            v = jnp.concatenate([cv, v], axis=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, implementation=self.impl)
        o = rules.constrain(o, ("batch", "length", "act_heads", None))
        o = o.reshape(*o.shape[:2], -1)
        if context is None:
            return o
        t = context.shape[1]
        return self.to_out[0](o[:, t:]), self.to_add_out(o[:, :t])


def _modulation(holder, temb, n):
    """SiLU(temb) -> linear -> n chunks of [B, 1, D]."""
    emb = holder.linear(jax.nn.silu(temb))
    return [c[:, None, :] for c in jnp.split(emb, n, axis=-1)]


class FluxTransformerBlock(nnx.Module):
    """Double-stream block (diffusers FluxTransformerBlock)."""

    def __init__(self, cfg: FluxConfig, mk, prefix: str):
        d = cfg.inner_dim
        self.norm1 = _LinearHolder()
        self.norm1.linear = mk(d, 6 * d, ("embed", None), prefix + ".norm1.linear")
        self.norm1_context = _LinearHolder()
        self.norm1_context.linear = mk(d, 6 * d, ("embed", None), prefix + ".norm1_context.linear")
        self.attn = FluxAttention(cfg, mk, prefix + ".attn", joint=True)
        self.ff = FeedForward(d, lambda i, o, ax, name: mk(i, o, ax, prefix + ".ff." + name))
        self.ff_context = FeedForward(d, lambda i, o, ax, name: mk(i, o, ax, prefix + ".ff_context." + name))

    def __call__(self, x, c, temb, cos, sin):
        dt = x.dtype
        sh, sc, g, sh2, sc2, g2 = _modulation(self.norm1, temb, 6)
        csh, csc, cg, csh2, csc2, cg2 = _modulation(self.norm1_context, temb, 6)
        nx = _layer_norm(x) * (1 + sc) + sh
        nc = _layer_norm(c) * (1 + csc) + csh
        ax, ac = self.attn(nx.astype(dt), cos, sin, context=nc.astype(dt))
        x = x + g * ax
        x = x + g2 * self.ff((_layer_norm(x) * (1 + sc2) + sh2).astype(dt))
        c = c + cg * ac
        c = c + cg2 * self.ff_context((_layer_norm(c) * (1 + csc2) + csh2).astype(dt))
        return x.astype(dt), c.astype(dt)


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block (diffusers FluxSingleTransformerBlock) on h = [text; image]."""

    def __init__(self, cfg: FluxConfig, mk, prefix: str):
        d = cfg.inner_dim
        self.norm = _LinearHolder()
        self.norm.linear = mk(d, 3 * d, ("embed", None), prefix + ".norm.linear")
        self.proj_mlp = mk(d, 4 * d, ("embed", "mlp"), prefix + ".proj_mlp")
        self.proj_out = mk(5 * d, d, ("mlp", "embed"), prefix + ".proj_out")
        self.attn = FluxAttention(cfg, mk, prefix + ".attn", joint=False)

    def __call__(self, h, temb, cos, sin):
        dt = h.dtype
        sh, sc, g = _modulation(self.norm, temb, 3)
        nh = (_layer_norm(h) * (1 + sc) + sh).astype(dt)
        mlp = gelu_tanh(self.proj_mlp(nh))
        mlp = rules.constrain(mlp, ("batch", "length", "act_mlp"))
        a = self.attn(nh, cos, sin)
        out = self.proj_out(jnp.concatenate([a, mlp], axis=-1))
        return (h + g * out).astype(dt)


class FluxTransformer(nnx.Module):
    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.inner_dim

        def linears(r):
            return linear_maker(cfg, r)

        mk = linears(rngs)

        self.x_embedder = mk(cfg.in_channels, d, (None, "embed"), "x_embedder")
        self.context_embedder = mk(cfg.joint_attention_dim, d, (None, "embed"), "context_embedder")
        self.time_text_embed = TimeTextEmbed(cfg, mk)
        # Stacked: transformer_blocks.<rest> [L, ...] <-> checkpoint keys transformer_blocks.{i}.<rest>; the
        # LoRA target path of a stacked layer carries "*" for the index (lora.lora_targeted).
        self.transformer_blocks = scan.stack(
            lambda r: FluxTransformerBlock(cfg, linears(r), "transformer_blocks.*"), cfg.num_layers, rngs)
        self.single_transformer_blocks = scan.stack(
            lambda r: FluxSingleTransformerBlock(cfg, linears(r), "single_transformer_blocks.*"),
            cfg.num_single_layers, rngs)
        self.norm_out = _LinearHolder()
        self.norm_out.linear = mk(d, 2 * d, ("embed", None), "norm_out.linear")
        self.proj_out = mk(d, cfg.out_dim, ("embed", None), "proj_out")

    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                 guidance=None):
        cfg = self.config
        dt = cfg.dtype
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this model has guidance embeddings (guidance_embeds=True): pass guidance")
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        t_len = encoder_hidden_states.shape[1]

        x = self.x_embedder(hidden_states.astype(dt))
        x = rules.constrain(x, ("batch", "length", "act_embed"))
        timestep = jnp.asarray(timestep, jnp.float32) * 1000.0
        g = None if guidance is None else jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), timestep.shape) * 1000.0
        temb = self.time_text_embed(timestep, g, pooled_projections)  # float32 [B, D]
        c = self.context_embedder(encoder_hidden_states.astype(dt))
        c = rules.constrain(c, ("batch", "length", "act_embed"))
        cos, sin = rope_tables(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)
        temb_c = temb.astype(dt)  # modulation linears run in the compute dtype

        # Per-block remat (policy from REMAT_POLICIES) inside the layer scan.
        run = functools.partial(scan.run, remat_policy=REMAT_POLICIES[cfg.remat_policy], use_scan=cfg.scan_layers)

        def double(block, xc, _):
            x, c = block(xc[0], xc[1], temb_c, cos, sin)
            return (rules.constrain(x, ("batch", "length", "act_embed")),
                    rules.constrain(c, ("batch", "length", "act_embed")))

        def single(block, h, _):
            return rules.constrain(block(h, temb_c, cos, sin), ("batch", "length", "act_embed"))

        x, c = run(self.transformer_blocks, (x, c), double)
        h = jnp.concatenate([c, x], axis=1)
        h = run(self.single_transformer_blocks, h, single)
        x = h[:, t_len:]
        scale, shift = _modulation(self.norm_out, temb_c, 2)
        x = (_layer_norm(x) * (1 + scale) + shift).astype(dt)
        return self.proj_out(x)


def kontext_velocity(model, x_t, ref_latents, prompt_embeds, pooled, sigma, img_ids, txt_ids, guidance):
    """FLUX.1-Kontext velocity: [noisy; reference] tokens through the model, first N (noisy) outputs.

    x_t [B,N,C], ref_latents [B,Nr,C] or None, img_ids [N(+Nr),3] (reference ids have first coordinate 1),
    sigma [B] in [0, 1], guidance [B] or scalar (e.g. 2.5). Returns [B,N,C] in the compute dtype.
    """
    n = x_t.shape[1]
    hidden = x_t if ref_latents is None else jnp.concatenate([x_t, ref_latents.astype(x_t.dtype)], axis=1)
    if img_ids.shape[-2] != hidden.shape[1]:
        raise ValueError(f"img_ids has {img_ids.shape[-2]} rows for {hidden.shape[1]} image tokens")
    out = model(hidden, prompt_embeds, pooled, sigma, img_ids, txt_ids, guidance)
    return out[:, :n]
