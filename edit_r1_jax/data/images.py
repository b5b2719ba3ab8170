"""Source-image loading and preprocessing for Kontext editing (spec A.1).

``load_image(path, resolution)`` returns the square ``uint8 [R, R, 3]`` image the editor and the reward see:

1. open with PIL (errors: :class:`FileNotFoundError` for a missing file, :class:`ImageLoadError` -- a
   ``ValueError`` -- for a file PIL cannot decode, e.g. truncated or not an image); the EXIF orientation is NOT
   applied (the reference does ``Image.open(p).convert("RGB")``);
2. convert to 8-bit RGB (:func:`to_rgb`):
   * ``RGBA`` / ``LA`` / ``P`` with transparency / ``PA``: **alpha-composited onto a white background** (dropping
     alpha would expose whatever colour the transparent pixels happen to store, often black garbage);
   * grayscale (``L``, ``1``), palette (``P``), ``CMYK``, ``YCbCr``, ...: PIL's conversion to RGB;
   * 16-bit grayscale (``I;16*``, and ``I`` which is how PIL opens some 16-bit PNGs): scaled by 255/65535 with
     rounding (PIL's own ``convert("L")`` would clip everything above 255 to white). 16-bit RGB(A) PNGs are
     delivered by PIL already reduced to 8 bits (high byte), which is kept;
   * 32-bit float (``F``) images: interpreted as values in [0, 1] if their maximum is <= 1, otherwise as [0, 255];
3. refuse images smaller than one latent patch (16x16 pixels = VAE factor 8 x patch 2): :class:`ImageLoadError`;
4. center crop to a square (side ``min(w, h)``, offsets ``floor((w-side)/2)``, ``floor((h-side)/2)``) and resize
   to ``resolution x resolution`` with LANCZOS (:func:`center_crop_resize`).

``to_model_range`` maps ``uint8`` to float32 in [-1, 1] the way diffusers' ``VaeImageProcessor`` does
(``2 * (x / 255) - 1``).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageLoadError", "MIN_SIDE", "load_image", "open_image", "to_rgb", "center_crop_resize",
           "to_model_range", "from_model_range"]

MIN_SIDE = 16  # one latent patch: VAE downsampling 8 x patch size 2


class ImageLoadError(ValueError):
    """An input image that cannot be used (unreadable, too small, unsupported)."""


def open_image(path) -> Image.Image:
    """Open and fully decode an image file, with clear errors."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ImageLoadError(f"image path is a directory, not a file: {path}")
    try:
        img = Image.open(path)
        img.load()  # force decoding now so truncated files fail here
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"cannot read image {path}: not an image format PIL recognises") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ImageLoadError(f"cannot read image {path}: {e}") from e
    return img


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB following the rules in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(img)
    if mode == "P":
        if "transparency" in img.info:
            return _composite_on_white(img)
        return img.convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(arr, 0, 65535) * (255.0 / 65535.0)
        gray = np.rint(arr).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), mode="RGB")
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        gray = np.rint(np.clip(np.nan_to_num(arr) * scale, 0, 255)).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), mode="RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Center-crop to a square (floor offsets) then LANCZOS-resize to ``resolution x resolution``."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return img


def load_image(path, resolution: int) -> np.ndarray:
    """Load ``path`` as a square ``uint8 [resolution, resolution, 3]`` RGB array (see module docstring)."""
    if resolution < MIN_SIDE or resolution % MIN_SIDE:
        raise ValueError(f"resolution must be a positive multiple of {MIN_SIDE}, got {resolution}")
    img = open_image(path)
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageLoadError(
            f"image {os.fspath(path)} is {w}x{h}; it must be at least {MIN_SIDE}x{MIN_SIDE} pixels "
            f"(one latent patch)")
    img = to_rgb(img)
    img = center_crop_resize(img, resolution)
    return np.asarray(img, dtype=np.uint8).copy()


def to_model_range(pixels) -> np.ndarray:
    """``uint8 [..., 3]`` -> float32 in [-1, 1] (diffusers' ``2 * (x / 255) - 1``)."""
    x = np.asarray(pixels)
    if x.dtype != np.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got {x.dtype}")
    return (x.astype(np.float32) / np.float32(255.0)) * np.float32(2.0) - np.float32(1.0)


def from_model_range(x) -> np.ndarray:
    """float in [-1, 1] -> ``uint8`` (clamp(x/2+0.5, 0, 1), then round(255 * .))."""
    x = np.clip(np.asarray(x, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.rint(x * 255.0).astype(np.uint8)
