"""Programmatic verifier rewards (deterministic, NumPy on host).

``toy_edit_score`` scores a toy edit (``data/toy.py``) in [0, 1] from the edited image alone, given the source
and the exactly rendered expected target:

* per-pixel colour agreement ``a(p, e) = clip(1 - ||p - e||_2 / tau, 0, 1)`` (tau = 1.0 in [-1, 1] units; palette
  colours are >= 1.73 apart, so a pixel of the wrong palette colour scores 0);
* edit region E = pixels where source and target differ (the recoloured footprint, the removed footprint, or the
  old + new footprint of a move); keep region K = the rest, split into background and unedited-object pixels;
* ``keep = (mean_{K, background} a + mean_{K, objects} a) / 2`` (just the background mean if no other object),
  so that blanking the image does not pay;
* ``score = mean_E a * keep``: the edit must happen (no-edit output scores 0) *and* everything else must be
  preserved (random noise scores ~0).
Rows whose source equals target (no edit region) score ``keep``. A non-finite edited image gives NaN
(so the registry stops, naming the sample).
"""

from __future__ import annotations

import numpy as np

__all__ = ["toy_edit_score", "toy_verifier"]


def _as_float(x, name):
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    x = x.astype(np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} must be [B, H, W, 3], got shape {x.shape}")
    return x


def toy_edit_score(edited, source, target, tau: float = 1.0, background_colour=(0.0, 0.0, 0.0)) -> np.ndarray:
    """``[B]`` float64 scores; inputs ``[B, H, W, 3]`` in [-1, 1] (uint8 is also accepted)."""
    edited, source, target = (_as_float(a, n) for a, n in ((edited, "edited"), (source, "source"),
                                                            (target, "target")))
    if not (edited.shape == source.shape == target.shape):
        raise ValueError(f"shape mismatch: edited {edited.shape}, source {source.shape}, target {target.shape}")
    agree = np.clip(1.0 - np.linalg.norm(edited.astype(np.float64) - target, axis=-1) / tau, 0.0, 1.0)
    edit = np.any(np.abs(source - target) > 1e-3, axis=-1)
    keep = ~edit
    background = np.all(np.abs(target - np.asarray(background_colour, np.float32)) <= 1e-3, axis=-1)
    axes = (1, 2)

    def region_mean(region):
        n = region.sum(axes)
        return np.where(n > 0, (agree * region).sum(axes) / np.maximum(n, 1), np.nan), n > 0

    edit_score, has_edit = region_mean(edit)
    keep_bg, has_bg = region_mean(keep & background)
    keep_obj, has_obj = region_mean(keep & ~background)
    # Unedited objects weigh as much as the whole background: blanking the image must not pay.
    keep_score = np.where(has_bg & has_obj, 0.5 * (keep_bg + keep_obj),
                          np.where(has_bg, keep_bg, np.where(has_obj, keep_obj, 1.0)))
    return np.where(has_edit, edit_score, 1.0) * keep_score


def toy_verifier(batch: dict) -> np.ndarray:
    """Registry-style reward: ``batch["image"]`` (edited), ``batch["source"]``, ``batch["target"]``."""
    return toy_edit_score(batch["image"], batch["source"], batch["target"])
