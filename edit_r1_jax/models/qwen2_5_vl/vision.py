"""Qwen2.5-VL vision tower (ViT with 2D RoPE, window attention and a 2x2 patch merger).

Images are processed as a batch of same-grid images ``[n, L, C*T*P*P]`` with a static grid ``(t, h, w)``:
attention never crosses images in the reference (its ``cu_seqlens`` are per image / per frame), so a batch of
independent images is exactly the reference's packed sequence. Window attention follows the reference: the
tokens are permuted into window order (``window_index``), attention is block diagonal over the windows given
by ``cu_window_seqlens`` (here a boolean mask), and the merger output is permuted back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models import scan
from edit_r1_jax.models.attention import attention
from edit_r1_jax.models.qwen2_5_vl.layers import Linear, RMSNorm, SwiGLU, apply_rope
from edit_r1_jax.parallel import rules


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan_layers: bool = True  # blocks under jax.lax.scan (models/scan.py); False: python loop

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


# ----------------------------------------------------------------------------------------------------------------
# Static (host) index tables for one grid; mirror transformers.vision_utils.


@functools.lru_cache(maxsize=64)
def vision_position_ids(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(h, w) patch coordinates [t*h*w, 2] laid out block-major over merge x merge blocks."""
    t, h, w = grid
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hpos, wpos], -1), (t, 1))


@functools.lru_cache(maxsize=64)
def window_index(grid: tuple[int, int, int], merge: int, window_size: int, patch_size: int):
    """(window_index over merge units [t*h*w/merge^2], cu_window_seqlens over patches) for one image."""
    t, h, w = grid
    ws = window_size // merge // patch_size
    lh, lw = h // merge, w // merge
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = ws - lh % ws, ws - lw % ws
    nh, nw = (lh + pad_h) // ws, (lw + pad_w) // ws
    padded = np.full((t, lh + pad_h, lw + pad_w), -100, dtype=np.int64)
    padded[:, :lh, :lw] = index
    padded = padded.reshape(t, nh, ws, nw, ws).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
    seqlens = (padded != -100).sum((2, 3)).reshape(-1)
    flat = padded.reshape(-1)
    widx = flat[flat != -100]
    cu = np.concatenate([[0], np.cumsum(seqlens) * merge * merge])
    cu = cu[np.concatenate([[True], np.diff(cu) != 0])]  # unique_consecutive
    return widx, cu


def _segment_mask(cu: np.ndarray, n: int) -> np.ndarray:
    seg = np.searchsorted(cu, np.arange(n), side="right")
    return seg[:, None] == seg[None, :]


# ----------------------------------------------------------------------------------------------------------------


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, axes=("embed", "heads"), bias=True, **kw)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), bias=True, **kw)
        self.num_heads = cfg.num_heads

    def __call__(self, x, cos, sin, mask):
        n, L, _ = x.shape
        qkv = self.qkv(x).reshape(n, L, 3, self.num_heads, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = rules.constrain(q, ("batch", "length", "act_heads", None))
        k = rules.constrain(k, ("batch", "length", "act_heads", None))
        v = rules.constrain(v, ("batch", "length", "act_heads", None))
        out = attention(q, k, v, mask=mask)
        return self.proj(out.reshape(n, L, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, **norm)
        self.norm2 = RMSNorm(cfg.hidden_size, **norm)
        self.attn = VisionAttention(cfg, rngs=rngs)
        if cfg.hidden_act != "silu":
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} not supported (Qwen2.5-VL uses silu)")
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        x = x + self.mlp(self.norm2(x))
        return rules.constrain(x, ("batch", "length", "act_embed"))


class PatchEmbed(nnx.Module):
    """Conv3d with kernel == stride == (T, P, P) on pre-flattened patches is one matmul.

    ``proj.kernel`` is stored [C*T*P*P, hidden] in the (C, T, P, P) order of both the flattened patches and the
    PyTorch OIDHW weight.
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, axes=(None, "embed"), bias=False,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


class PatchMerger(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size * cfg.spatial_merge_size ** 2
        kw = dict(bias=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.mlp_0 = Linear(d, d, axes=("embed", "mlp"), **kw)
        self.mlp_2 = Linear(d, cfg.out_hidden_size, axes=("mlp", "embed"), **kw)
        self.unit = cfg.spatial_merge_size ** 2

    def __call__(self, x):
        n, L, D = x.shape
        h = self.ln_q(x).reshape(n, L // self.unit, self.unit * D)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(h), approximate=False))


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        # Stacked: visual.blocks.<rest> [depth, ...] <-> checkpoint keys visual.blocks.{i}.<rest> (models/scan.py).
        self.blocks = scan.stack(lambda r: VisionBlock(cfg, rngs=r), cfg.depth, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs)

    def rope(self, pos: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """float32 cos/sin [L, head_dim] for (h, w) positions [L, 2]."""
        spatial = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
        freqs = jnp.asarray(pos, jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [L, 2, d/4]
        freqs = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def __call__(self, pixel_values: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """pixel_values [n, t*h*w, patch_dim] of n images sharing ``grid`` -> merged tokens [n, L/4, out]."""
        cfg = self.config
        grid = tuple(int(g) for g in grid)
        n, L, _ = pixel_values.shape
        if L != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"pixel_values has {L} patches per image, grid {grid} needs {np.prod(grid)}")
        unit = cfg.spatial_merge_size ** 2
        widx, cu_win = window_index(grid, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        token_perm = (widx[:, None] * unit + np.arange(unit)[None]).reshape(-1)  # window order over patches

        x = self.patch_embed(pixel_values.astype(cfg.dtype))
        x = rules.constrain(x[:, token_perm], ("batch", "length", "act_embed"))
        cos, sin = self.rope(vision_position_ids(grid, cfg.spatial_merge_size)[token_perm])

        window_mask = jnp.asarray(_segment_mask(cu_win, L))[None, None]
        frame_cu = np.arange(grid[0] + 1) * grid[1] * grid[2]  # full attention is per frame
        full_mask = None if grid[0] == 1 else jnp.asarray(_segment_mask(frame_cu, L))[None, None]
        # One scanned block for both kinds: a per-layer flag (scanned with the parameters) selects the mask; an
        # all-true mask is full attention over a single frame.
        full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])

        def block(blk, x, is_full):
            mask = window_mask | is_full if full_mask is None else jnp.where(is_full, full_mask, window_mask)
            return blk(x, cos, sin, mask)

        x = scan.run(self.blocks, x, block, xs=full, use_scan=cfg.scan_layers)

        merged = self.merger(x)
        return merged[:, np.argsort(widx)]
