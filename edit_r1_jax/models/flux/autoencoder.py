"""FLUX AutoencoderKL (diffusers ``AutoencoderKL`` with 16 latent channels) in Flax NNX.

Activations are NHWC. Parameter paths mirror diffusers' module names (``encoder.down_blocks.0.resnets.1.conv1``,
``decoder.mid_block.attentions.0.to_q``...) with ``weight`` renamed ``kernel`` (convs HWIO, linears [in, out])
or ``scale`` (GroupNorm), and ``to_out.0`` shortened to ``to_out``.

Precision: GroupNorm statistics and the attention softmax run in float32 whatever the compute dtype.
``encode`` returns the latent distribution's mean (``sample_mode="argmax"`` in diffusers; the FLUX VAE has
no quant convs, but ``use_quant_conv``/``use_post_quant_conv`` are honoured for completeness).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from edit_r1_jax.models.conv import upsample2x_conv3x3
from edit_r1_jax.parallel.rules import constrain, param

__all__ = ["AutoencoderKLConfig", "AutoencoderKL", "FLUX_VAE_CONFIG"]


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Mirrors diffusers' ``AutoencoderKL`` config (defaults = FLUX.1 ``vae/config.json``)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 16
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.3611
    shift_factor: float | None = 0.1159
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ValueError(f"unsupported down_block_types {self.down_block_types}")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ValueError(f"unsupported up_block_types {self.up_block_types}")
        if not (len(self.down_block_types) == len(self.up_block_types) == len(self.block_out_channels)):
            raise ValueError("down_block_types, up_block_types and block_out_channels must have equal lengths")
        if self.act_fn != "silu":
            raise ValueError(f"unsupported act_fn {self.act_fn!r} (FLUX uses silu)")

    @property
    def scale_factor(self) -> int:
        """Pixel-to-latent downsampling factor (8 for FLUX)."""
        return 2 ** (len(self.block_out_channels) - 1)


FLUX_VAE_CONFIG = AutoencoderKLConfig()

_INIT = nnx.initializers.lecun_normal()


class Conv2d(nnx.Module):
    def __init__(self, cin: int, cout: int, kernel_size: int = 3, *, stride: int = 1, padding=None,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        k = kernel_size
        self.kernel = param(_INIT(rngs.params(), (k, k, cin, cout), param_dtype),
                            (None, None, "conv_in", "conv_out"))
        self.bias = param(jnp.zeros((cout,), param_dtype), ("conv_out",))
        self.stride = stride
        p = (k - 1) // 2 if padding is None else padding
        self.padding = ((p, p), (p, p)) if isinstance(p, int) else tuple(tuple(q) for q in p)
        self.dtype = dtype

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride, self.stride), self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class Linear(nnx.Module):
    def __init__(self, cin: int, cout: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(_INIT(rngs.params(), (cin, cout), param_dtype), ("conv_in", "conv_out"))
        self.bias = param(jnp.zeros((cout,), param_dtype), ("conv_out",))
        self.dtype = dtype

    def __call__(self, x):
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC with float32 statistics (PyTorch semantics: biased variance, eps inside sqrt)."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-6, *, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        self.scale = param(jnp.ones((channels,), param_dtype), ("norm",))
        self.bias = param(jnp.zeros((channels,), param_dtype), ("norm",))
        self.groups, self.eps, self.dtype = groups, eps, dtype

    def __call__(self, x):
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = xf.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.norm1 = GroupNorm(cfg.norm_num_groups, cin, 1e-6, **kw)
        self.conv1 = Conv2d(cin, cout, 3, rngs=rngs, **kw)
        self.norm2 = GroupNorm(cfg.norm_num_groups, cout, 1e-6, **kw)
        self.conv2 = Conv2d(cout, cout, 3, rngs=rngs, **kw)
        self.conv_shortcut = Conv2d(cin, cout, 1, rngs=rngs, **kw) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head spatial self-attention with a residual (diffusers ``Attention`` in the VAE mid block)."""

    def __init__(self, channels: int, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.group_norm = GroupNorm(cfg.norm_num_groups, channels, 1e-6, **kw)
        self.to_q = Linear(channels, channels, rngs=rngs, **kw)
        self.to_k = Linear(channels, channels, rngs=rngs, **kw)
        self.to_v = Linear(channels, channels, rngs=rngs, **kw)
        self.to_out = Linear(channels, channels, rngs=rngs, **kw)
        self.dtype = cfg.dtype

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(
            jnp.float32(c))
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        o = jnp.einsum("bqk,bkc->bqc", probs, v)
        return x + self.to_out(o).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, channels: int, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, cfg, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List(
            [AttentionBlock(channels, cfg, rngs=rngs)] if cfg.mid_block_add_attention else [])

    def __call__(self, x):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    def __init__(self, channels: int, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        # diffusers Downsample2D(padding=0): pad right/bottom by one, 3x3 conv stride 2
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, channels: int, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x):
        # nearest-neighbour x2, then the 3x3 conv: computed at the input resolution (models/conv.py)
        return upsample2x_conv3x3(x, self.conv.kernel[...], self.conv.bias[...], self.conv.dtype)


class DownBlock(nnx.Module):
    def __init__(self, cin, cout, add_downsample, cfg, *, rngs):
        self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, cfg, rngs=rngs)
                                 for j in range(cfg.layers_per_block)])
        self.downsamplers = nnx.List([Downsample(cout, cfg, rngs=rngs)] if add_downsample else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpBlock(nnx.Module):
    def __init__(self, cin, cout, add_upsample, cfg, *, rngs):
        self.resnets = nnx.List([ResnetBlock(cin if j == 0 else cout, cout, cfg, rngs=rngs)
                                 for j in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample(cout, cfg, rngs=rngs)] if add_upsample else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, rngs=rngs, **kw)
        blocks, prev = [], ch[0]
        for i, c in enumerate(ch):
            blocks.append(DownBlock(prev, c, i != len(ch) - 1, cfg, rngs=rngs))
            prev = c
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], 1e-6, **kw)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, rngs=rngs, **kw)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = constrain(blk(x), ("batch", None, None, None))
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, rngs=rngs, **kw)
        self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
        rev = list(reversed(ch))
        blocks, prev = [], rev[0]
        for i, c in enumerate(rev):
            blocks.append(UpBlock(prev, c, i != len(ch) - 1, cfg, rngs=rngs))
            prev = c
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], 1e-6, **kw)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, rngs=rngs, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = constrain(blk(x), ("batch", None, None, None))
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """``encode``: images NHWC in [-1, 1] -> latent mean NHWC; ``decode``: latents -> images (unclamped)."""

    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = Conv2d(c2, c2, 1, rngs=rngs, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = (Conv2d(cfg.latent_channels, cfg.latent_channels, 1, rngs=rngs, **kw)
                                if cfg.use_post_quant_conv else None)

    def encode_moments(self, images):
        """``[B, H, W, 3]`` -> ``(mean, logvar)`` each ``[B, H/f, W/f, latent_channels]``."""
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        c = self.cfg.latent_channels
        return h[..., :c], jnp.clip(h[..., c:], -30.0, 20.0)

    def encode(self, images):
        """Latent distribution mean (``retrieve_latents(..., sample_mode="argmax")``)."""
        return self.encode_moments(images)[0]

    def decode(self, latents):
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    # FLUX normalisation of the latent space: z = (mean - shift) * scale
    def normalize(self, mean):
        shift = self.cfg.shift_factor or 0.0
        return (mean - shift) * self.cfg.scaling_factor

    def denormalize(self, z):
        shift = self.cfg.shift_factor or 0.0
        return z / self.cfg.scaling_factor + shift

    def encode_normalized(self, images):
        return self.normalize(self.encode(images))

    def decode_normalized(self, z):
        return self.decode(self.denormalize(z))
