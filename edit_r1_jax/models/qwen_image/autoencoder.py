"""Qwen-Image VAE (diffusers ``AutoencoderKLQwenImage``, the Wan-2.1 causal video VAE) on single images, Flax NNX.

Images are one frame, so every causal 3-D convolution sees its input preceded by zero frames (its causal
padding): only the kernel's last temporal tap ever multiplies data. We therefore store and run each causal conv as
a 2-D conv with that tap (the converter slices ``weight[:, :, -1]``), and the temporal resampling convs
(``time_conv`` of ``downsample3d`` / ``upsample3d``, which diffusers skips on the first frame) are not converted.
This is exactly what diffusers computes for ``T = 1`` (encode: the first chunk; decode: frame 0).

Activations are NHWC. Parameter paths mirror diffusers (``encoder.down_blocks.3.conv1.kernel``,
``encoder.down_blocks.2.resample.1.kernel``, ``decoder.up_blocks.0.upsamplers.0.resample.1.kernel``,
``encoder.mid_block.attentions.0.to_qkv.kernel``, ``...norm1.scale`` for RMS_norm ``gamma``).

Precision: the RMS norms (L2 normalisation over channels) and the attention softmax run in float32.

API: ``encode(images [B,H,W,3] in [-1,1]) -> latent mean [B,H/8,W/8,z_dim]`` (``sample_mode="argmax"``);
``decode(z) -> images clamped to [-1, 1]`` (as diffusers' ``_decode``); ``normalize`` / ``denormalize`` apply the
per-channel ``latents_mean`` / ``latents_std`` as QwenImageEditPlusPipeline does (``(z - mean) / std`` before the
transformer, ``z * std + mean`` before decoding); ``encode_normalized`` / ``decode_normalized`` chain them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models.conv import upsample2x_conv3x3
from edit_r1_jax.parallel.rules import param

__all__ = ["QwenImageVAEConfig", "QwenImageVAE"]

_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632,
         -0.1922, -0.9497, 0.2503, -0.2921)
_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382,
        1.1253, 2.8251, 1.9160)
_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample", "dropout",
           "input_channels", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class QwenImageVAEConfig:
    """Mirrors diffusers' ``AutoencoderKLQwenImage`` config (defaults = Qwen-Image ``vae/config.json``)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = _MEAN
    latents_std: tuple[float, ...] = _STD
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample {self.temperal_downsample} needs len(dim_mult) - 1 = "
                             f"{len(self.dim_mult) - 1} entries")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean / latents_std need z_dim = {self.z_dim} entries, got "
                             f"{len(self.latents_mean)} / {len(self.latents_std)}")

    @property
    def scale_factor(self) -> int:
        """Pixel-to-latent downsampling factor (8 for Qwen-Image)."""
        return 2 ** len(self.temperal_downsample)

    @classmethod
    def from_diffusers(cls, d: dict, **overrides) -> "QwenImageVAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.update(overrides)
        return cls(**kw)

    def to_diffusers(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k in _FIELDS for v in [getattr(self, k)]}


_INIT = nnx.initializers.lecun_normal()


class Conv(nnx.Module):
    """2-D conv, kernel HWIO (a causal 3-D conv's last temporal tap, or a real 2-D conv)."""

    def __init__(self, cin, cout, k, cfg, rngs, *, stride=1, padding=None):
        self.kernel = param(_INIT(rngs.params(), (k, k, cin, cout), cfg.param_dtype),
                            (None, None, "conv_in", "conv_out"))
        self.bias = param(jnp.zeros((cout,), cfg.param_dtype), ("conv_out",))
        p = (k - 1) // 2 if padding is None else padding
        self.padding = ((p, p), (p, p)) if isinstance(p, int) else tuple(tuple(q) for q in p)
        self.stride, self.dtype = stride, cfg.dtype

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                         (self.stride, self.stride), self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class RMSNorm(nnx.Module):
    """diffusers ``QwenImageRMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels (float32)."""

    def __init__(self, dim, cfg):
        self.scale = param(jnp.ones((dim,), cfg.param_dtype), ("norm",))
        self.dim = dim

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * np.float32(self.dim ** 0.5) * self.scale[...].astype(jnp.float32)
        return y.astype(x.dtype)


class _Empty(nnx.Module):
    """Parameter-free torch module (ZeroPad2d, Upsample) kept so list indices match diffusers names."""


class Resample(nnx.Module):
    """``downsample2d/3d``: zero-pad right/bottom + 3x3 stride-2 conv; ``upsample2d/3d``: nearest x2 + 3x3 conv to
    dim // 2. (The 3-D modes' ``time_conv`` only acts from the second frame on.)"""

    def __init__(self, dim, mode, cfg, rngs):
        self.mode = mode
        if mode.startswith("downsample"):
            self.resample = nnx.List([_Empty(), Conv(dim, dim, 3, cfg, rngs, stride=2, padding=((0, 1), (0, 1)))])
        elif mode.startswith("upsample"):
            self.resample = nnx.List([_Empty(), Conv(dim, dim // 2, 3, cfg, rngs)])
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def __call__(self, x):
        conv = self.resample[1]
        if self.mode.startswith("upsample"):  # nearest-exact at an integer factor 2, then the conv (models/conv.py)
            return upsample2x_conv3x3(x, conv.kernel[...], conv.bias[...], conv.dtype)
        return conv(x)


class ResidualBlock(nnx.Module):
    def __init__(self, cin, cout, cfg, rngs):
        self.norm1 = RMSNorm(cin, cfg)
        self.conv1 = Conv(cin, cout, 3, cfg, rngs)
        self.norm2 = RMSNorm(cout, cfg)
        self.conv2 = Conv(cout, cout, 3, cfg, rngs)
        self.conv_shortcut = Conv(cin, cout, 1, cfg, rngs) if cin != cout else None

    def __call__(self, x):
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(jax.nn.silu(self.norm1(x)))
        x = self.conv2(jax.nn.silu(self.norm2(x)))  # dropout: inference/0.0
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of a frame (1x1 convs ``to_qkv`` and ``proj``)."""

    def __init__(self, dim, cfg, rngs):
        self.norm = RMSNorm(dim, cfg)
        self.to_qkv = Conv(dim, 3 * dim, 1, cfg, rngs)
        self.proj = Conv(dim, dim, 1, cfg, rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, h * w, 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / np.float32(np.sqrt(c))
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("bqk,bkc->bqc", p, v).reshape(b, h, w, c)
        return self.proj(o) + x


class MidBlock(nnx.Module):
    def __init__(self, dim, cfg, rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, cfg, rngs), ResidualBlock(dim, dim, cfg, rngs)])
        self.attentions = nnx.List([AttentionBlock(dim, cfg, rngs)])

    def __call__(self, x):
        x = self.resnets[0](x)
        return self.resnets[1](self.attentions[0](x))


class Encoder(nnx.Module):
    def __init__(self, cfg: QwenImageVAEConfig, rngs):
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = Conv(cfg.input_channels, dims[0], 3, cfg, rngs)
        blocks, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, cfg, rngs))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(cout, cfg, rngs))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(cout, mode, cfg, rngs))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], cfg, rngs)
        self.norm_out = RMSNorm(dims[-1], cfg)
        self.conv_out = Conv(dims[-1], 2 * cfg.z_dim, 3, cfg, rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for layer in self.down_blocks:
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class UpBlock(nnx.Module):
    def __init__(self, cin, cout, upsample_mode, cfg, rngs):
        res = []
        for _ in range(cfg.num_res_blocks + 1):
            res.append(ResidualBlock(cin, cout, cfg, rngs))
            cin = cout
        self.resnets = nnx.List(res)
        self.upsamplers = None if upsample_mode is None else nnx.List([Resample(cout, upsample_mode, cfg, rngs)])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nnx.Module):
    def __init__(self, cfg: QwenImageVAEConfig, rngs):
        dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = Conv(cfg.z_dim, dims[0], 3, cfg, rngs)
        self.mid_block = MidBlock(dims[0], cfg, rngs)
        ups = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous upsampler halved the channels
            mode = None
            if i != len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            ups.append(UpBlock(cin, cout, mode, cfg, rngs))
        self.up_blocks = nnx.List(ups)
        self.norm_out = RMSNorm(dims[-1], cfg)
        self.conv_out = Conv(dims[-1], cfg.input_channels, 3, cfg, rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for up in self.up_blocks:
            x = up(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class QwenImageVAE(nnx.Module):
    def __init__(self, cfg: QwenImageVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs)
        self.quant_conv = Conv(2 * cfg.z_dim, 2 * cfg.z_dim, 1, cfg, rngs)
        self.post_quant_conv = Conv(cfg.z_dim, cfg.z_dim, 1, cfg, rngs)
        self.decoder = Decoder(cfg, rngs)

    def _check(self, x, channels, what):
        f = self.cfg.scale_factor if what == "images" else 1
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"{what} must be [B, H, W, {channels}] (NHWC), got {tuple(x.shape)}")
        if what == "images" and (x.shape[1] % f or x.shape[2] % f):
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} must be a multiple of {f}")

    def encode_moments(self, images):
        """``[B, H, W, 3]`` in [-1, 1] -> ``(mean, logvar)`` each ``[B, H/8, W/8, z_dim]``."""
        self._check(images, self.cfg.input_channels, "images")
        h = self.quant_conv(self.encoder(images))
        z = self.cfg.z_dim
        return h[..., :z], jnp.clip(h[..., z:], -30.0, 20.0)

    def encode(self, images):
        """Latent distribution mean (``retrieve_latents(..., sample_mode="argmax")``), not normalised."""
        return self.encode_moments(images)[0]

    def decode(self, latents):
        """Raw latents ``[B, h, w, z_dim]`` -> images ``[B, 8h, 8w, 3]`` clamped to [-1, 1]."""
        self._check(latents, self.cfg.z_dim, "latents")
        return jnp.clip(self.decoder(self.post_quant_conv(latents)), -1.0, 1.0)

    def normalize(self, mean):
        m = jnp.asarray(self.cfg.latents_mean, jnp.float32).astype(mean.dtype)
        s = jnp.asarray(self.cfg.latents_std, jnp.float32).astype(mean.dtype)
        return (mean - m) / s

    def denormalize(self, z):
        m = jnp.asarray(self.cfg.latents_mean, jnp.float32).astype(z.dtype)
        s = jnp.asarray(self.cfg.latents_std, jnp.float32).astype(z.dtype)
        return z * s + m

    def encode_normalized(self, images):
        return self.normalize(self.encode(images))

    def decode_normalized(self, z):
        return self.decode(self.denormalize(z))
