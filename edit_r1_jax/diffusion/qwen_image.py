"""Qwen-Image(-Edit) latent layout, position ids and sigma schedule (what QwenImageEditPlusPipeline does).

Latents
    The VAE latent of a ``H x W`` image is ``[B, H/8, W/8, 16]`` (NHWC here), normalised per channel
    ``(z - latents_mean) / latents_std`` (``QwenImageVAE.normalize`` / ``denormalize``), then packed 2x2 into tokens
    ``[B, (H/16)*(W/16), 64]`` with the same feature order as diffusers' ``_pack_latents``
    (``edit_r1_jax.diffusion.latents.pack`` / ``unpack``, re-exported here). The edit reference image's packed tokens
    are concatenated after the generated image's on the sequence axis.

Positions
    ``img_shapes`` is the per-sample list ``[(1, h, w) of the target, (1, h_ref, w_ref) of each reference]`` in
    packed-token units (``h = H/16``), as the pipeline builds it. :func:`position_ids` turns it into integer RoPE
    positions ``img_ids [sum f*h*w, 3]`` (frame index = image index, centred rows/columns) and ``txt_ids [T, 3]``
    (text after the image grid: ``max(h//2, w//2)`` over the images, then ``+ arange(T)`` on all three axes).

Schedule
    :func:`sigmas` reproduces ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``
    with ``mu`` from the pipeline's ``calculate_shift`` on the generated-image token count (reference tokens are not
    counted) and every setting read from the scheduler config: ``use_dynamic_shifting`` with ``time_shift_type``
    exponential or linear (else the static ``shift``), ``base/max_image_seq_len``, ``base/max_shift`` and
    ``shift_terminal`` (the stretch that ends the schedule at e.g. 0.02). Computed in float64; diffusers rounds its
    float32 ``sigmas`` input first, so values agree to ~1e-7.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from edit_r1_jax.diffusion.latents import pack, unpack

__all__ = ["pack", "unpack", "img_shapes_for", "position_ids", "read_scheduler_config",
           "mu_for", "sigmas", "timesteps", "VAE_SCALE", "QWEN_IMAGE_SCHEDULER"]

VAE_SCALE = 8  # pixels per latent pixel; a packed token covers 16x16 pixels

# The published Qwen-Image / Qwen-Image-Edit(-2509) ``scheduler/scheduler_config.json`` values that matter here
# (used only when a test or a caller has no converted folder; a converted model's own file always wins).
QWEN_IMAGE_SCHEDULER = {
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
    "shift": 1.0, "shift_terminal": 0.02, "use_dynamic_shifting": True, "time_shift_type": "exponential",
    "num_train_timesteps": 1000, "invert_sigmas": False, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False,
}


def img_shapes_for(height: int, width: int, refs: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int, int]]:
    """``[(1, h, w), (1, h_r, w_r), ...]`` in packed tokens for a ``height x width`` target (pixels) and reference
    images of the given pixel sizes ``(height, width)``; sizes must be multiples of 16."""
    out = []
    for hh, ww in [(height, width), *refs]:
        if hh % (2 * VAE_SCALE) or ww % (2 * VAE_SCALE):
            raise ValueError(f"image size {hh}x{ww} must be a multiple of {2 * VAE_SCALE}")
        out.append((1, hh // (2 * VAE_SCALE), ww // (2 * VAE_SCALE)))
    return out


def _centred(n: int) -> np.ndarray:
    """diffusers' scale_rope positions: ``-(n - n//2) .. n//2 - 1``."""
    return np.arange(n) - (n - n // 2)


def position_ids(img_shapes: Sequence[Sequence[int]], txt_len: int, *, scale_rope: bool = True,
                 layer3d: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(img_ids [N, 3], txt_ids [txt_len, 3])`` int32 RoPE positions (diffusers ``QwenEmbedRope``; ``layer3d``:
    ``QwenEmbedLayer3DRope``, where the last image is the condition on frame -1)."""
    if not img_shapes:
        raise ValueError("img_shapes is empty: it needs at least the generated image's (frames, h, w)")
    ids, max_index = [], 0
    last = len(img_shapes) - 1
    for idx, shape in enumerate(img_shapes):
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"img_shapes[{idx}] = {tuple(shape)} is not a positive (frames, height, width)")
        f, h, w = (int(s) for s in shape)
        if layer3d and idx == last:
            if f != 1:
                raise ValueError(f"layer3d: the condition image (img_shapes[{idx}]) must have 1 frame, got {f}")
            frames = np.array([-1])
        else:
            frames = idx + np.arange(f)
        rows = _centred(h) if scale_rope else np.arange(h)
        cols = _centred(w) if scale_rope else np.arange(w)
        grid = np.stack(np.meshgrid(frames, rows, cols, indexing="ij"), axis=-1)
        ids.append(grid.reshape(-1, 3))
        max_index = max(max_index, *((h // 2, w // 2) if scale_rope else (h, w)))
    if layer3d:
        max_index = max(max_index, last)
    txt = (max_index + np.arange(int(txt_len)))[:, None].repeat(3, axis=1)
    return np.concatenate(ids, axis=0).astype(np.int32), txt.astype(np.int32)


def read_scheduler_config(model_dir: str | Path) -> dict:
    """``MODEL_DIR/scheduler/scheduler_config.json`` of a converted (or diffusers) pipeline folder."""
    f = Path(model_dir) / "scheduler" / "scheduler_config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: the Qwen-Image schedule is read from the pipeline's scheduler "
                                f"config")
    return json.loads(f.read_text())


def mu_for(image_seq_len: int, config: Mapping) -> float:
    """The pipeline's ``calculate_shift`` with the config's ``base/max_image_seq_len`` and ``base/max_shift``."""
    base_seq = config.get("base_image_seq_len", 256)
    max_seq = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return image_seq_len * m + (base_shift - m * base_seq)


_UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")


def sigmas(num_steps: int, image_seq_len: int, config: Mapping = QWEN_IMAGE_SCHEDULER) -> np.ndarray:
    """``[num_steps + 1]`` float64 sigmas from 1 down to the trailing 0, for ``image_seq_len`` generated tokens."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
    bad = [k for k in _UNSUPPORTED if config.get(k)]
    if bad:
        raise ValueError(f"scheduler config sets {bad}: not supported by this schedule")
    s = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if config.get("use_dynamic_shifting", False):
        mu = mu_for(image_seq_len, config)
        kind = config.get("time_shift_type", "exponential")
        with np.errstate(divide="ignore"):
            if kind == "exponential":
                s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
            elif kind == "linear":
                s = mu / (mu + (1.0 / s - 1.0))
            else:
                raise ValueError(f"scheduler config time_shift_type {kind!r}: expected 'exponential' or 'linear'")
    else:
        shift = float(config.get("shift", 1.0))
        s = shift * s / (1.0 + (shift - 1.0) * s)
    terminal = config.get("shift_terminal")
    if terminal:
        one_minus = 1.0 - s
        s = 1.0 - one_minus / (one_minus[-1] / (1.0 - terminal))
    return np.concatenate([s, [0.0]])


def timesteps(num_steps: int, image_seq_len: int, config: Mapping = QWEN_IMAGE_SCHEDULER) -> np.ndarray:
    """``num_train_timesteps * sigmas[:N]`` (diffusers' ``scheduler.timesteps``)."""
    return float(config.get("num_train_timesteps", 1000)) * sigmas(num_steps, image_seq_len, config)[:-1]
