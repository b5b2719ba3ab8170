"""2x2 patch packing of FLUX latents and Kontext position ids (spec A.3).

Layout conventions
------------------
* Latents inside edit_r1_jax are NHWC: ``[B, H, W, C]`` (H, W in latent pixels, C = 16 for FLUX).
* Packed tokens are ``[B, (H/2)*(W/2), 4*C]``; token index ``row*(W/2)+col`` over the patch grid and feature
  index ``c*4 + dy*2 + dx`` -- exactly what diffusers' ``FluxPipeline._pack_latents`` produces from the NCHW
  tensor, so packed tensors are interchangeable with diffusers'.
* Position ids (3 axes, used by the DiT's RoPE): ``(index, row, col)`` with index 0 for the generated image and
  1 for the Kontext reference image; text ids are zeros.

All functions work on numpy and jax arrays alike (they only use ``reshape``/``transpose`` methods).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack", "unpack", "image_ids", "kontext_ids", "text_ids"]


def pack(latents):
    """``[B, H, W, C]`` -> ``[B, (H/2)*(W/2), 4*C]`` (feature index ``c*4 + dy*2 + dx``)."""
    if latents.ndim != 4:
        raise ValueError(f"pack expects [B, H, W, C] latents, got shape {tuple(latents.shape)}")
    b, h, w, c = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack needs even latent height/width, got {h}x{w}")
    x = latents.reshape(b, h // 2, 2, w // 2, 2, c)  # b, row, dy, col, dx, c
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b, row, col, c, dy, dx
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens, height: int, width: int):
    """Inverse of :func:`pack`. ``height``/``width`` are the *latent* height and width (``H``, ``W``).

    ``[B, (H/2)*(W/2), 4*C]`` -> ``[B, H, W, C]``.
    """
    if tokens.ndim != 3:
        raise ValueError(f"unpack expects [B, L, 4C] tokens, got shape {tuple(tokens.shape)}")
    b, length, f = tokens.shape
    if height % 2 or width % 2:
        raise ValueError(f"unpack needs even latent height/width, got {height}x{width}")
    if length != (height // 2) * (width // 2):
        raise ValueError(f"{length} tokens do not form a {height // 2}x{width // 2} patch grid")
    if f % 4:
        raise ValueError(f"token width {f} is not a multiple of 4")
    c = f // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2)  # b, row, col, c, dy, dx
    x = x.transpose(0, 1, 4, 2, 5, 3)  # b, row, dy, col, dx, c
    return x.reshape(b, height, width, c)


def image_ids(h_tokens: int, w_tokens: int, index: int = 0) -> np.ndarray:
    """Position ids ``[h*w, 3]`` float32 of a ``h_tokens x w_tokens`` patch grid: ``(index, row, col)``."""
    ids = np.zeros((h_tokens, w_tokens, 3), np.float32)
    ids[..., 0] = index
    ids[..., 1] = np.arange(h_tokens, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(w_tokens, dtype=np.float32)[None, :]
    return ids.reshape(h_tokens * w_tokens, 3)


def kontext_ids(h_tokens: int, w_tokens: int) -> np.ndarray:
    """``[2*h*w, 3]``: target ids ``(0,row,col)`` followed by reference ids ``(1,row,col)`` (same grid)."""
    return np.concatenate([image_ids(h_tokens, w_tokens, 0), image_ids(h_tokens, w_tokens, 1)], axis=0)


def text_ids(length: int) -> np.ndarray:
    """``[length, 3]`` zeros (float32)."""
    return np.zeros((length, 3), np.float32)
