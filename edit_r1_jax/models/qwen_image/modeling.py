"""Qwen-Image MMDiT in Flax NNX, matching diffusers 0.42.1 ``QwenImageTransformer2DModel``.

Parameter paths mirror the diffusers module names (``img_in``, ``txt_norm.scale``, ``txt_in``,
``time_text_embed.timestep_embedder.linear_1``, ``transformer_blocks.3.img_mod.1``, ``transformer_blocks.3.attn.to_q``,
``...attn.to_out.0``, ``...attn.add_q_proj``, ``...attn.norm_added_k.scale``, ``...img_mlp.net.0.proj``,
``...txt_mlp.net.2``, ``norm_out.linear``, ``proj_out``); Linear weights are ``kernel [in, out]`` + ``bias``.

The ``num_layers`` identical dual-stream blocks are stacked in memory (``transformer_blocks.attn.to_q.kernel
[60, in, out]``, LoRA likewise) and run under ``jax.lax.scan`` (models/scan.py; ``scan_layers=False``: a python loop
over the same stacked parameters); checkpoints and exported LoRA keep the per-layer keys above, the loaders stack at
load. A block's forward is ``block(img, txt, temb, rope, mask, modulate_index)``; everything but img/txt (timestep
embedding, RoPE tables, mask, ``modulate_index``) is the same for every block and reaches it by closure.

Conditioning as diffusers does it:
* ``timestep`` is sigma in [0, 1] (the pipeline passes ``t / 1000``); the sinusoidal features use scale 1000 inside.
  No guidance embedding (``guidance_embeds=True`` is rejected: diffusers 0.42.1 cannot run it either).
* RoPE (MSRoPE, axes 16/56/56 at full size) in complex form on adjacent pairs, from integer positions
  ``[L, 3]`` (see ``edit_r1_jax.diffusion.qwen_image.position_ids``): image ``k`` of ``img_shapes`` on frame index
  ``k``, centred row/column positions; text tokens after the image grid on all three axes.
* ``encoder_hidden_states_mask`` (``[B, T]``, 1 = real token) masks text *keys* in the joint attention; padded
  text positions still get RoPE positions (diffusers uses the padded length).
* ``zero_cond_t`` (2511 release): a second modulation from timestep 0 drives the reference-image tokens
  (``modulate_index`` 1 after the ``num_target_tokens`` generated-image tokens); text and ``norm_out`` use the
  real timestep.

Precision: RoPE tables, sinusoidal timestep features, the timestep embedder, norm statistics and the softmax run in
float32; everything else in ``config.dtype``. (diffusers casts the timestep to the hidden dtype first, which
rounds sigma to bf16 in bf16 runs; we keep it float32.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models import scan
from edit_r1_jax.models.attention import attention
from edit_r1_jax.models.flux.modeling import RMSNorm, _layer_norm, gelu_tanh  # the same norms and GELU
from edit_r1_jax.models.lora import LoRAConfig, linear_maker
from edit_r1_jax.parallel import rules

__all__ = ["QwenImageConfig", "QwenImageTransformer", "QwenImageTransformerBlock", "rope_tables",
           "qwen_image_velocity", "REMAT_POLICIES"]

REMAT_POLICIES = scan.REMAT_POLICIES

_DIFFUSERS_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "guidance_embeds", "axes_dims_rope",
                     "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


@dataclasses.dataclass(frozen=True)
class QwenImageConfig:
    """Mirrors diffusers' ``QwenImageTransformer2DModel`` config (defaults = Qwen-Image(-Edit-2509), 20B)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attention_impl: str | None = None
    lora: LoRAConfig | None = None
    # The blocks run under jax.lax.scan over stacked parameters (models/scan.py: one compiled block instead of
    # num_layers). False: the same stacked parameters in a python loop (reference for tests and benchmarks).
    scan_layers: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoRAConfig.from_dict(self.lora))
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {sorted(REMAT_POLICIES)}")
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True is not supported: Qwen-Image has no guidance embedding "
                             "(diffusers 0.42.1's QwenImageTransformer2DModel cannot run it either)")
        if len(self.axes_dims_rope) != 3 or any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be three even sizes")
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
    def from_diffusers(cls, d: dict, **overrides) -> "QwenImageConfig":
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


class _NoParams(nnx.Module):
    """Placeholder for parameter-free torch modules (SiLU, Dropout) so list indices match diffusers names."""


class _Proj(nnx.Module):
    """diffusers ``GELU`` module (``.proj`` Linear + tanh GELU)."""

    def __init__(self, lin):
        self.proj = lin

    def __call__(self, x):
        return gelu_tanh(self.proj(x))


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")``: net.0.proj, net.2."""

    def __init__(self, dim, mk, prefix):
        self.net = nnx.List([_Proj(mk(dim, 4 * dim, ("embed", "mlp"), prefix + ".net.0.proj")), _NoParams(),
                             mk(4 * dim, dim, ("mlp", "embed"), prefix + ".net.2")])

    def __call__(self, x):
        h = rules.constrain(self.net[0](x), ("batch", "length", "act_mlp"))
        return self.net[2](h)


class _LinearHolder(nnx.Module):
    """A module with a single ``linear`` (diffusers AdaLayerNormContinuous naming)."""


class TimestepEmbedding(nnx.Module):
    def __init__(self, in_dim, dim, mk, prefix):
        self.linear_1 = mk(in_dim, dim, (None, "embed"), prefix + ".linear_1", jnp.float32)
        self.linear_2 = mk(dim, dim, ("embed", None), prefix + ".linear_2", jnp.float32)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def timestep_features(t, dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0):
    """diffusers ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)``: [cos, sin], f32.

    Same op order as diffusers (``(t * f) * scale``). The frequencies are host constants: the float32 exponent
    with the diffusers op order, then a correctly rounded exp (arguments reach 1000 rad, where one ulp of a float32
    frequency moves the angle by ~6e-5 rad)."""
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = (t.astype(jnp.float32)[:, None] * freqs[None, :]) * jnp.float32(scale)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class _Embed(nnx.Module):
    """torch ``nn.Embedding`` table ``embedding [num, dim]``."""

    def __init__(self, num, dim, param_dtype, rngs):
        self.embedding = rules.param(jax.random.normal(rngs.params(), (num, dim), param_dtype), (None, "embed"))


class TimeTextEmbed(nnx.Module):
    """diffusers ``QwenTimestepProjEmbeddings`` (timestep embedder + optional 2-entry additional embedding)."""

    def __init__(self, cfg: QwenImageConfig, mk, rngs):
        self.timestep_embedder = TimestepEmbedding(256, cfg.inner_dim, mk, "time_text_embed.timestep_embedder")
        self.addition_t_embedding = _Embed(2, cfg.inner_dim, cfg.param_dtype, rngs) if cfg.use_additional_t_cond \
            else None

    def __call__(self, timestep, additional_t_cond=None):
        emb = self.timestep_embedder(timestep_features(timestep))
        if self.addition_t_embedding is not None:
            if additional_t_cond is None:
                raise ValueError("use_additional_t_cond=True: pass additional_t_cond ([B] ints in {0, 1})")
            emb = emb + self.addition_t_embedding.embedding[...].astype(jnp.float32)[additional_t_cond]
        elif additional_t_cond is not None:
            raise ValueError("additional_t_cond given but the config has use_additional_t_cond=False")
        return emb


def _rope_freqs(dim: int, theta: float = 10000.0) -> np.ndarray:
    """diffusers ``1 / theta ** (arange(0, dim, 2) / dim)`` in float32 (exponent in float32 like torch)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (1.0 / np.power(np.float64(theta), exponent.astype(np.float64))).astype(np.float32)


def rope_tables(pos, axes_dims, theta: float = 10000.0):
    """cos/sin tables ``[L, head_dim // 2]`` (one angle per adjacent pair) from integer positions ``pos [L, 3]``.

    The angle of pair ``i`` of axis ``a`` is ``pos[:, a] * f_i`` in float32, as diffusers' ``torch.outer(index,
    freqs)`` followed by ``torch.polar``."""
    pos = jnp.asarray(pos).astype(jnp.float32)
    angles = [pos[:, a:a + 1] * jnp.asarray(_rope_freqs(d, theta))[None, :] for a, d in enumerate(axes_dims)]
    ang = jnp.concatenate(angles, axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """x ``[B, L, H, D]``; pairs ``(x[2i], x[2i+1])`` as complex numbers times ``cos + i sin`` (float32 math)."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(xf.shape)
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Attention and the dual-stream block.


class QwenImageAttention(nnx.Module):
    """Joint attention over [text; image] (diffusers ``Attention`` + ``QwenDoubleStreamAttnProcessor2_0``)."""

    def __init__(self, cfg: QwenImageConfig, mk, prefix: str):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.heads, self.head_dim, self.impl = cfg.num_attention_heads, hd, cfg.attention_impl
        self.norm_q = RMSNorm(hd, param_dtype=cfg.param_dtype)
        self.norm_k = RMSNorm(hd, param_dtype=cfg.param_dtype)
        self.norm_added_q = RMSNorm(hd, param_dtype=cfg.param_dtype)
        self.norm_added_k = RMSNorm(hd, param_dtype=cfg.param_dtype)
        self.to_q = mk(d, d, ("embed", "heads"), prefix + ".to_q")
        self.to_k = mk(d, d, ("embed", "heads"), prefix + ".to_k")
        self.to_v = mk(d, d, ("embed", "heads"), prefix + ".to_v")
        self.add_q_proj = mk(d, d, ("embed", "heads"), prefix + ".add_q_proj")
        self.add_k_proj = mk(d, d, ("embed", "heads"), prefix + ".add_k_proj")
        self.add_v_proj = mk(d, d, ("embed", "heads"), prefix + ".add_v_proj")
        self.to_out = nnx.List([mk(d, d, ("heads", "embed"), prefix + ".to_out.0")])
        self.to_add_out = mk(d, d, ("heads", "embed"), prefix + ".to_add_out")

    def _heads(self, x):
        x = x.reshape(*x.shape[:-1], self.heads, self.head_dim)
        return rules.constrain(x, ("batch", "length", "act_heads", None))

    def __call__(self, img, txt, rope, mask):
        """img [B,N,D], txt [B,T,D], rope = (cos, sin) over [text; image], mask [B, T+N] bool or None."""
        cos, sin = rope
        q = jnp.concatenate([self.norm_added_q(self._heads(self.add_q_proj(txt))),
                             self.norm_q(self._heads(self.to_q(img)))], axis=1)
        k = jnp.concatenate([self.norm_added_k(self._heads(self.add_k_proj(txt))),
                             self.norm_k(self._heads(self.to_k(img)))], axis=1)
        v = jnp.concatenate([self._heads(self.add_v_proj(txt)), self._heads(self.to_v(img))], axis=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, mask=None if mask is None else mask[:, None, None, :], implementation=self.impl)
        o = rules.constrain(o, ("batch", "length", "act_heads", None))
        o = o.reshape(*o.shape[:2], -1)
        t = txt.shape[1]
        return self.to_out[0](o[:, t:]), self.to_add_out(o[:, :t])


def _chunks(mod, n):
    """``[B, n*D]`` modulation -> n chunks of ``[B, 1, D]``."""
    return [c[:, None, :] for c in jnp.split(mod, n, axis=-1)]


class QwenImageTransformerBlock(nnx.Module):
    """Dual-stream block (diffusers ``QwenImageTransformerBlock``); ``img_mod``/``txt_mod`` = [SiLU, Linear]."""

    def __init__(self, cfg: QwenImageConfig, mk, prefix: str):
        d = cfg.inner_dim
        self.zero_cond_t = cfg.zero_cond_t
        self.img_mod = nnx.List([_NoParams(), mk(d, 6 * d, ("embed", None), prefix + ".img_mod.1")])
        self.txt_mod = nnx.List([_NoParams(), mk(d, 6 * d, ("embed", None), prefix + ".txt_mod.1")])
        self.attn = QwenImageAttention(cfg, mk, prefix + ".attn")
        self.img_mlp = FeedForward(d, mk, prefix + ".img_mlp")
        self.txt_mlp = FeedForward(d, mk, prefix + ".txt_mlp")

    def __call__(self, img, txt, temb, rope, mask, modulate_index=None):
        """img [B,N,D], txt [B,T,D], temb [B,D] (``zero_cond_t``: [2B,D], the second half from timestep 0, and
        ``modulate_index`` [N] bool, True on reference-image tokens). Returns (img, txt)."""
        dt = img.dtype
        img_mod = jax.nn.silu(temb)
        txt_mod = img_mod
        if self.zero_cond_t:
            txt_mod = img_mod[: img_mod.shape[0] // 2]
        img_params = self.img_mod[1](img_mod)
        txt_params = self.txt_mod[1](txt_mod)
        if self.zero_cond_t:
            b = img_params.shape[0] // 2
            sel = modulate_index[None, :, None]
            img_chunks = [jnp.where(sel, z, c) for c, z in zip(_chunks(img_params[:b], 6), _chunks(img_params[b:], 6))]
        else:
            img_chunks = _chunks(img_params, 6)
        sh1, sc1, g1, sh2, sc2, g2 = img_chunks
        tsh1, tsc1, tg1, tsh2, tsc2, tg2 = _chunks(txt_params, 6)

        ni = (_layer_norm(img) * (1 + sc1) + sh1).astype(dt)
        nt = (_layer_norm(txt) * (1 + tsc1) + tsh1).astype(dt)
        ai, at = self.attn(ni, nt, rope, mask)
        img = img + g1 * ai
        txt = txt + tg1 * at
        img = img + g2 * self.img_mlp((_layer_norm(img) * (1 + sc2) + sh2).astype(dt))
        txt = txt + tg2 * self.txt_mlp((_layer_norm(txt) * (1 + tsc2) + tsh2).astype(dt))
        return img.astype(dt), txt.astype(dt)


class QwenImageTransformer(nnx.Module):
    def __init__(self, cfg: QwenImageConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.inner_dim

        def linears(r):
            return linear_maker(cfg, r)

        mk = linears(rngs)

        self.img_in = mk(cfg.in_channels, d, (None, "embed"), "img_in")
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, param_dtype=cfg.param_dtype)
        self.txt_in = mk(cfg.joint_attention_dim, d, (None, "embed"), "txt_in")
        self.time_text_embed = TimeTextEmbed(cfg, mk, rngs)
        # Stacked: transformer_blocks.<rest> [L, ...] <-> checkpoint keys transformer_blocks.{i}.<rest>; the
        # LoRA target path of a stacked layer carries "*" for the index (lora.lora_targeted).
        self.transformer_blocks = scan.stack(
            lambda r: QwenImageTransformerBlock(cfg, linears(r), "transformer_blocks.*"), cfg.num_layers, rngs)
        self.norm_out = _LinearHolder()
        self.norm_out.linear = mk(d, 2 * d, ("embed", None), "norm_out.linear")
        self.proj_out = mk(d, cfg.out_dim, ("embed", None), "proj_out")

    def _blocks(self, img, txt, temb, rope, mask, modulate_index):
        """All blocks, scanned (or looped, ``scan_layers=False``) over the stacked parameters with per-block remat
        (``remat_policy``); only (img, txt) is carried, the rest is shared by every block (closure)."""
        cfg = self.config

        def block_fn(block, carry, _):
            img, txt = block(carry[0], carry[1], temb, rope, mask, modulate_index)
            return (rules.constrain(img, ("batch", "length", "act_embed")),
                    rules.constrain(txt, ("batch", "length", "act_embed")))

        return scan.run(self.transformer_blocks, (img, txt), block_fn,
                        remat_policy=REMAT_POLICIES[cfg.remat_policy], use_scan=cfg.scan_layers)

    def __call__(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, img_ids, txt_ids,
                 *, num_target_tokens: int | None = None, additional_t_cond=None):
        """hidden_states [B,N,in_channels] (target then reference tokens), encoder_hidden_states [B,T,joint],
        encoder_hidden_states_mask [B,T] (1 = real token) or None, timestep [B] sigma in [0, 1],
        img_ids [N,3] / txt_ids [T,3] integer positions (``diffusion.qwen_image.position_ids``),
        num_target_tokens: generated-image tokens (required with ``zero_cond_t``). Returns [B,N,out_dim]."""
        cfg = self.config
        dt = cfg.dtype
        b, n = hidden_states.shape[:2]
        t_len = encoder_hidden_states.shape[1]
        if img_ids.shape[0] != n or txt_ids.shape[0] != t_len:
            raise ValueError(f"img_ids {img_ids.shape} / txt_ids {txt_ids.shape} do not match {n} image and "
                             f"{t_len} text tokens")
        if encoder_hidden_states_mask is not None and encoder_hidden_states_mask.shape != (b, t_len):
            raise ValueError(f"encoder_hidden_states_mask shape {encoder_hidden_states_mask.shape} must be "
                             f"(batch, text_len) = {(b, t_len)}")

        img = rules.constrain(self.img_in(hidden_states.astype(dt)), ("batch", "length", "act_embed"))
        txt = self.txt_in(self.txt_norm(encoder_hidden_states.astype(dt)))
        txt = rules.constrain(txt, ("batch", "length", "act_embed"))

        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        modulate_index = None
        if cfg.zero_cond_t:
            if num_target_tokens is None:
                raise ValueError("zero_cond_t=True: pass num_target_tokens (the generated-image token count)")
            timestep = jnp.concatenate([timestep, timestep * 0.0])
            if additional_t_cond is not None:
                additional_t_cond = jnp.concatenate([additional_t_cond, additional_t_cond])
            modulate_index = jnp.arange(n) >= num_target_tokens
        temb = self.time_text_embed(timestep, additional_t_cond).astype(dt)  # modulation linears in compute dtype

        rope = rope_tables(jnp.concatenate([txt_ids, img_ids], axis=0), cfg.axes_dims_rope)
        mask = None
        if encoder_hidden_states_mask is not None:
            mask = jnp.concatenate([jnp.asarray(encoder_hidden_states_mask).astype(bool),
                                    jnp.ones((b, n), bool)], axis=1)

        img, _ = self._blocks(img, txt, temb, rope, mask, modulate_index)

        if cfg.zero_cond_t:
            temb = temb[:b]
        scale, shift = _chunks(self.norm_out.linear(jax.nn.silu(temb)), 2)
        img = (_layer_norm(img) * (1 + scale) + shift).astype(dt)
        return self.proj_out(img)


def qwen_image_velocity(model, x_t, ref_latents, prompt_embeds, prompt_mask, sigma, img_ids, txt_ids):
    """Qwen-Image-Edit velocity: [noisy; reference] packed tokens through the model, first N (noisy) outputs.

    x_t [B,N,C], ref_latents [B,Nr,C] or None, prompt_embeds [B,T,joint], prompt_mask [B,T] or None, sigma [B],
    img_ids [N(+Nr),3], txt_ids [T,3]. Returns [B,N,out_dim] in the compute dtype."""
    n = x_t.shape[1]
    hidden = x_t if ref_latents is None else jnp.concatenate([x_t, ref_latents.astype(x_t.dtype)], axis=1)
    out = model(hidden, prompt_embeds, prompt_mask, sigma, img_ids, txt_ids, num_target_tokens=n)
    return out[:, :n]
