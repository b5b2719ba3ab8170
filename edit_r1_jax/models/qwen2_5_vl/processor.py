"""Qwen2.5-VL inputs without torchvision: image preprocessing (host PIL path and a jittable device path) and the
reward prompt built with the checkpoint's own tokenizer and chat template.

Host path = transformers' ``Qwen2VLImageProcessorPil`` exactly: uint8 image -> PIL bicubic resize to the
``smart_resize`` size -> /255 -> CLIP mean/std -> patches of (C, T=2 duplicated frames, 14, 14), ordered in
2x2 merge blocks.

Device path (``preprocess_device``): float [0, 1] images [B, H, W, 3] -> the same patches, under jit. It
rounds to uint8 levels (as the reference client does before JPEG) and then runs PIL's own bicubic resampling
algorithm on device: PIL's separable two-pass filter (horizontal, then vertical) with its fixed-point
(22-bit) coefficients, its rounding and its uint8 clipping between the passes, as two matmuls with
coefficient matrices precomputed on the host. The matmuls are exact: each coefficient is split into two
11-bit halves so every partial sum is an integer below 2**24, computed in float32 at HIGHEST precision and
recombined in int32. So the device path equals the host path bit for bit up to the float32 rounding of the
final normalisation (tests assert max |diff| <= 1e-6); the only thing it does not do is JPEG.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PROMPT_TEMPLATE = (
    "There are two images: the original image and the edited image. Evaluate the edited image against the "
    "editing instruction and the requirement.\nInstruction: {prompt}\nRequirement: {requirement}\n"
    "Rate from 0 to 5 the accuracy and quality of the edit: 0 means the wrong object was edited or the "
    "requirements are not met at all; 5 means the correct object was edited, the requirements are met and the "
    "visual quality is high. Answer directly with a single number from 0 to 5."
)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ImageProcessorConfig":
        """From ``preprocessor_config.json`` (transformers 4 ``min/max_pixels`` or 5 ``size`` keys); defaults
        when the file is absent."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.exists():
            return cls()
        d = json.loads(path.read_text())
        size = d.get("size") or {}
        kw = dict(min_pixels=d.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
                  max_pixels=d.get("max_pixels", size.get("longest_edge", cls.max_pixels)))
        for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
            if k in d:
                kw[k] = d[k]
        for k in ("image_mean", "image_std"):
            if k in d:
                kw[k] = tuple(d[k])
        return cls(**kw)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Sides divisible by ``factor``, pixel count within [min_pixels, max_pixels], aspect kept (reference)."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def grid_for(height: int, width: int, cfg: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[int, int, int]:
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    return 1, rh // cfg.patch_size, rw // cfg.patch_size


def num_image_tokens(grid: Sequence[int], merge_size: int = 2) -> int:
    t, h, w = grid
    return t * h * w // (merge_size ** 2)


def patchify(x, cfg: ImageProcessorConfig):
    """Normalised images [B, C, H, W] (numpy or jax) -> patches [B, gh*gw, C*T*P*P] in merge-block order."""
    xp = jnp if isinstance(x, jax.Array) else np
    B, C, H, W = x.shape
    p, m, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = H // p, W // p
    x = x.reshape(B, C, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7)  # B, gh/m, gw/m, m, m, C, p, p
    x = xp.broadcast_to(x[:, :, :, :, :, :, None], x.shape[:6] + (T,) + x.shape[6:])
    return x.reshape(B, gh * gw, C * T * p * p)


# ----------------------------------------------------------------------------------------------------------------
# Host path (PIL): exactly the transformers PIL image processor.


def to_uint8(image) -> np.ndarray:
    """HWC image: PIL, uint8, or float in [0, 1] (rounded as the reference client: round(x*255), clipped)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an HWC RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected uint8 or float [0, 1] image, got {image.dtype}")
    # float32 as the reference client (torch: (x * 255).round().clamp(0, 255)), ties to even
    return np.clip(np.round(image.astype(np.float32) * np.float32(255.0)), 0, 255).astype(np.uint8)


def jpeg_roundtrip(image_u8: np.ndarray, quality: int = 75) -> np.ndarray:
    """Encode/decode through JPEG as the reference client does (PIL default quality 75)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def preprocess_host(image, cfg: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[np.ndarray, tuple]:
    """One image -> (patches [gh*gw, C*T*P*P] float32, grid (1, gh, gw))."""
    from PIL import Image

    u8 = to_uint8(image)
    h, w = u8.shape[:2]
    rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    resized = np.asarray(Image.fromarray(u8).resize((rw, rh), resample=Image.BICUBIC))
    x = resized.astype(np.float32) * np.float32(cfg.rescale_factor)
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    patches = patchify(x.transpose(2, 0, 1)[None], cfg)[0]
    return np.ascontiguousarray(patches, dtype=np.float32), (1, rh // cfg.patch_size, rw // cfg.patch_size)


# ----------------------------------------------------------------------------------------------------------------
# Device path (jittable).


_PRECISION_BITS = 22  # PIL Resample.c: 32 - 8 - 2


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic filter (a = -0.5), evaluated in float64 with PIL's operation order."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


@functools.lru_cache(maxsize=32)
def pil_bicubic_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """PIL's fixed-point resampling coefficients as a dense int64 matrix [in_size, out_size]
    (``precompute_coeffs`` + ``normalize_coeffs_8bpc`` of Pillow's Resample.c)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ss = 1.0 / filterscale
    out = np.zeros((in_size, out_size), np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        w = _bicubic((taps.astype(np.float64) - center + 0.5) * ss)
        ww = w.sum()
        if ww != 0.0:
            w = w / ww
        fixed = w * (1 << _PRECISION_BITS)
        out[taps, xx] = np.where(w < 0, np.trunc(-0.5 + fixed), np.trunc(0.5 + fixed)).astype(np.int64)
    return out


def _pil_pass(x: jax.Array, coeffs: np.ndarray, spec: str) -> jax.Array:
    """One exact PIL pass on uint8-valued float32 ``x``: clip8((sum_k x*c + 2**21) >> 22)."""
    hi = np.floor_divide(coeffs, 2048)
    lo = coeffs - hi * 2048
    for part in (np.abs(hi), lo):  # every partial sum must be an integer float32 represents exactly
        if 255 * part.sum(0).max() >= 2 ** 24:
            raise ValueError(f"resize {coeffs.shape} too large a reduction for the exact device resampler")
    dot = functools.partial(jnp.einsum, spec, precision=jax.lax.Precision.HIGHEST)
    s_hi = dot(x, jnp.asarray(hi, jnp.float32)).astype(jnp.int32)
    s_lo = dot(x, jnp.asarray(lo, jnp.float32)).astype(jnp.int32)
    total = s_hi * 2048 + s_lo + (1 << (_PRECISION_BITS - 1))
    return jnp.clip(jnp.right_shift(total, _PRECISION_BITS), 0, 255).astype(jnp.float32)


def pil_bicubic_resize(x: jax.Array, height: int, width: int) -> jax.Array:
    """PIL ``Image.resize((width, height), BICUBIC)`` of uint8-valued float32 images [B, H, W, C], on device."""
    B, H, W, C = x.shape
    if W != width:  # PIL: horizontal pass first, only when the width changes
        x = _pil_pass(x, pil_bicubic_coefficients(W, width), "bhwc,wo->bhoc")
    if H != height:
        x = _pil_pass(x, pil_bicubic_coefficients(H, height), "bhwc,ho->bowc")
    return x


def preprocess_device(images: jax.Array, cfg: ImageProcessorConfig = ImageProcessorConfig()) -> jax.Array:
    """Same-size float [0, 1] images [B, H, W, 3] -> patches [B, gh*gw, C*T*P*P] (float32); the grid is
    ``grid_for(H, W, cfg)`` (static). Equals ``preprocess_host`` of ``to_uint8(image)``."""
    B, H, W, C = images.shape
    rh, rw = smart_resize(H, W, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    x = jnp.clip(jnp.round(images.astype(jnp.float32) * 255.0), 0, 255)
    x = pil_bicubic_resize(x, rh, rw)
    x = x * jnp.float32(cfg.rescale_factor)
    x = (x - jnp.asarray(cfg.image_mean, jnp.float32)) / jnp.asarray(cfg.image_std, jnp.float32)
    return patchify(x.transpose(0, 3, 1, 2), cfg)


# ----------------------------------------------------------------------------------------------------------------
# Prompt.


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer with the chat template the reference processor applies: the processor's
    ``chat_template.jinja`` / ``chat_template.json`` when present (Qwen2.5-VL checkpoints ship it), else the
    tokenizer's own. ``PromptBuilder`` checks that the template produced the two image slots."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    # Our config.json is not a transformers config, which transformers 5 takes for a (pre-5.0) Mistral
    # tokenizer and warns about its regex; Qwen's pre-tokenizer is loaded exactly as written.
    tok = AutoTokenizer.from_pretrained(str(model_dir), fix_mistral_regex=False)
    if (model_dir / "chat_template.jinja").exists():
        tok.chat_template = (model_dir / "chat_template.jinja").read_text()
    elif (model_dir / "chat_template.json").exists():
        tok.chat_template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    elif not getattr(tok, "chat_template", None):
        raise FileNotFoundError(f"{model_dir}: no chat_template.jinja/.json and the tokenizer has no chat template")
    return tok


def conversation(instruction: str, requirement: str = "", template: str = PROMPT_TEMPLATE) -> list[dict]:
    """The reference judge conversation: one user turn [original image, edited image, text]."""
    text = template.format(prompt=instruction, requirement=requirement or "")
    return [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": text}]}]


def resolve_template(value: str | Path | None) -> str:
    """A reward prompt template: None -> the built-in ``PROMPT_TEMPLATE``; a path to an existing file -> its
    text; otherwise the string itself. It must hold ``{prompt}`` and may hold ``{requirement}`` (str.format
    fields; write literal braces as ``{{ }}``)."""
    if value is None:
        return PROMPT_TEMPLATE
    text = str(value)
    p = Path(text)
    if len(text) < 4096 and "\n" not in text and p.suffix and p.exists():
        text = p.read_text(encoding="utf-8")
        where = str(p)
    elif "{prompt}" not in text and "\n" not in text and " " not in text and p.suffix:
        raise FileNotFoundError(f"reward prompt template file not found: {p}")
    else:
        where = "the template string"
    try:
        text.format(prompt="x", requirement="y")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"reward prompt template from {where}: only {{prompt}} and {{requirement}} fields are "
                         f"allowed (write literal braces as {{{{ }}}}): {e!r}") from e
    if "{prompt}" not in text:
        raise ValueError(f"reward prompt template from {where} has no {{prompt}} field")
    return text


class PromptBuilder:
    """Token ids of the judge prompt with each ``<|image_pad|>`` expanded to that image's token count."""

    def __init__(self, tokenizer, image_token: str = "<|image_pad|>", template: str | Path | None = None):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.template = resolve_template(template)  # default: today's built-in PROMPT_TEMPLATE
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{image_token!r} is not a single token in this tokenizer: {ids}")
        self.image_token_id = ids[0]

    def text(self, instruction: str, requirement: str = "") -> str:
        return self.tokenizer.apply_chat_template(conversation(instruction, requirement, self.template),
                                                  tokenize=False, add_generation_prompt=True)

    def chat_text(self, content: Sequence[dict]) -> str:
        """Any one-turn user message (content items ``{"type": "image"}`` / ``{"type": "text", "text": ...}``)
        through the chat template, with the assistant turn opened."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": list(content)}], tokenize=False,
                                                  add_generation_prompt=True)

    def __call__(self, instruction: str, requirement: str, grids: Sequence[Sequence[int]],
                 merge_size: int = 2) -> list[int]:
        return self.expand(self.text(instruction, requirement), grids, merge_size)

    def expand(self, text: str, grids: Sequence[Sequence[int]], merge_size: int = 2) -> list[int]:
        """Token ids of ``text`` with its i-th ``<|image_pad|>`` expanded to image i's token count."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(grids):
            raise ValueError(f"prompt has {len(slots)} image slots, {len(grids)} images given")
        out, prev = [], 0
        for slot, grid in zip(slots, grids):
            out += ids[prev:slot] + [self.image_token_id] * num_image_tokens(grid, merge_size)
            prev = slot + 1
        return out + ids[prev:]
