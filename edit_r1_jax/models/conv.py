"""Convolution helpers shared by the VAEs (NHWC activations, HWIO kernels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _fold_taps(k, axis: int):
    """The 3 taps of a 3x3 kernel along ``axis`` as the two 2-tap kernels a nearest-x2 upsampled input sees:
    output rows 2i read input rows (i-1, i) with weights (k0, k1 + k2); rows 2i+1 read (i, i+1) with (k0 + k1, k2)."""
    k0, k1, k2 = jnp.split(k, 3, axis=axis)
    return jnp.concatenate([k0, k1 + k2], axis=axis), jnp.concatenate([k0 + k1, k2], axis=axis)


def upsample2x_conv3x3(x, kernel, bias, dtype):
    """``conv3x3(nearest_upsample_x2(x)) + bias`` (stride 1, zero padding 1), as the VAE decoders' upsamplers
    (diffusers ``Upsample2D`` / ``QwenImageResample("upsample2d")``), computed at the input resolution.

    Each of the four output phases (even/odd row x even/odd column) of the upsampled conv is a 2x2 conv of the
    low-resolution input with summed taps (``_fold_taps``); the four phases run as one 2x2 conv with 4x the
    output channels and are interleaved afterwards. That is 16 multiply-adds per input pixel and channel pair
    instead of 36 (the upsampled image has 4x the pixels, each 9 taps), the same result up to summation order:
    float32 rounding level in float32. In bf16 the summed taps are rounded to bf16 once (the reference rounds
    each tap), a relative error of at most 2^-9 on those taps. x ``[B, H, W, I]``, kernel ``[3, 3, I, O]``,
    bias ``[O]``; returns ``[B, 2H, 2W, O]`` in ``dtype``."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample2x_conv3x3 needs a 3x3 kernel, got {kernel.shape}")
    B, H, W, _ = x.shape
    O = kernel.shape[-1]
    k = kernel.astype(jnp.float32)
    phases = [col for row in _fold_taps(k, 0) for col in _fold_taps(row, 1)]  # (a, b) = (0,0), (0,1), (1,0), (1,1)
    k4 = jnp.concatenate(phases, axis=-1).astype(dtype)  # [2, 2, I, 4 O]
    # Padding 1 on every side: output position p reads input rows (p - 1, p), so phase a = 0 is p = i and
    # phase a = 1 (rows i, i + 1) is p = i + 1; the same for columns.
    y = jax.lax.conv_general_dilated(x.astype(dtype), k4, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B, H + 1, W + 1, 4 O]
    parts = [y[:, a:a + H, b:b + W, (2 * a + b) * O:(2 * a + b + 1) * O] for a in (0, 1) for b in (0, 1)]
    out = jnp.stack(parts, axis=0).reshape(2, 2, B, H, W, O)
    out = jnp.transpose(out, (2, 3, 0, 4, 1, 5)).reshape(B, 2 * H, 2 * W, O)  # [B, H, a, W, b, O]
    return out + bias.astype(dtype)
