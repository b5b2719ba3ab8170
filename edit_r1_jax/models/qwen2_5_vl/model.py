"""Qwen2.5-VL for conditional generation (prefill logits only): vision tower + Qwen2 language model + lm_head.

Module names mirror the hub checkpoint layout (``visual.*``, ``model.*``, ``lm_head``) so the key map is a
rename plus transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models.qwen2_5_vl.language import TextConfig, TextModel
from edit_r1_jax.models.qwen2_5_vl.layers import Linear
from edit_r1_jax.models.qwen2_5_vl.vision import VisionConfig, VisionTransformer
from edit_r1_jax.parallel import rules


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:
    vision_config: VisionConfig = VisionConfig()
    text_config: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = True  # vision blocks and decoder layers under jax.lax.scan (models/scan.py)

    def __post_init__(self):
        # one precision policy (and one layer-loop choice) for the whole model
        for name in ("vision_config", "text_config"):
            sub = getattr(self, name)
            if (sub.dtype, sub.param_dtype, sub.scan_layers) != (self.dtype, self.param_dtype, self.scan_layers):
                object.__setattr__(self, name, dataclasses.replace(sub, dtype=self.dtype,
                                                                    param_dtype=self.param_dtype,
                                                                    scan_layers=self.scan_layers))

    def to_dict(self) -> dict:
        """JSON-able dict of the architecture (dtypes excluded: they are a run-time choice)."""
        def sub(c):
            d = dataclasses.asdict(c)
            d.pop("dtype"), d.pop("param_dtype"), d.pop("scan_layers")
            return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"vision_config": sub(self.vision_config), "text_config": sub(self.text_config),
                "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id}

    @classmethod
    def from_dict(cls, d: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> "Qwen2_5_VLConfig":
        """Inverse of ``to_dict`` (our converted ``config.json``)."""
        def make(klass, sub, where):
            fields = {f.name for f in dataclasses.fields(klass)} - {"dtype", "param_dtype", "scan_layers"}
            unknown = set(sub) - fields
            if unknown:
                raise ValueError(f"config.{where}: unknown fields {sorted(unknown)}")
            return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()},
                         dtype=dtype, param_dtype=param_dtype)
        top = {k: v for k, v in d.items() if k not in ("vision_config", "text_config")}
        return cls(vision_config=make(VisionConfig, d["vision_config"], "vision_config"),
                   text_config=make(TextConfig, d["text_config"], "text_config"),
                   dtype=dtype, param_dtype=param_dtype, **top)

    @classmethod
    def from_hf(cls, hf: Mapping, dtype=jnp.float32, param_dtype=jnp.float32) -> "Qwen2_5_VLConfig":
        """From a transformers ``config.json`` (transformers 5 nested layout or the hub's flat 4.x layout)."""
        if hf.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not qwen2_5_vl")
        text = dict(hf.get("text_config") or hf)
        vis = dict(hf["vision_config"])
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
        if "mrope_section" not in rope:
            raise ValueError("config.json: text rope parameters carry no mrope_section")
        if text.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        tc = TextConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            hidden_act=text.get("hidden_act", "silu"), rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), mrope_section=tuple(rope["mrope_section"]), tie_word_embeddings=tie)
        vrope = dict(vis.get("rope_parameters") or {})
        vc = VisionConfig(
            depth=vis.get("depth", 32), hidden_size=vis.get("hidden_size", 1280),
            hidden_act=vis.get("hidden_act", "silu"), intermediate_size=vis.get("intermediate_size", 3420),
            num_heads=vis.get("num_heads", 16), in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
            patch_size=vis.get("patch_size", vis.get("spatial_patch_size", 14)),
            spatial_merge_size=vis.get("spatial_merge_size", 2),
            temporal_patch_size=vis.get("temporal_patch_size", 2),
            tokens_per_second=vis.get("tokens_per_second", 2), window_size=vis.get("window_size", 112),
            out_hidden_size=vis.get("out_hidden_size", tc.hidden_size),
            fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
            rope_theta=float(vrope.get("rope_theta", 10000.0)))
        ids = {k: hf[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id") if k in hf}
        return cls(vision_config=vc, text_config=tc, dtype=dtype, param_dtype=param_dtype, **ids)


class Qwen2_5_VL(nnx.Module):
    def __init__(self, cfg: Qwen2_5_VLConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision_config, rngs=rngs)
        self.model = TextModel(cfg.text_config, rngs=rngs)
        tc = cfg.text_config
        self.lm_head = None if tc.tie_word_embeddings else Linear(
            tc.hidden_size, tc.vocab_size, axes=("embed", "vocab"), bias=False, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype, rngs=rngs)

    def encode_images(self, pixel_values: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """[n, t*h*w, patch_dim] images sharing ``grid`` -> [n, t*h*w/4, hidden] language-space tokens."""
        return self.visual(pixel_values, grid)

    def logits(self, hidden: jax.Array, vocab_ids=None) -> jax.Array:
        """lm_head (or tied embedding) on ``hidden`` [..., D]; only the columns ``vocab_ids`` when given."""
        if self.lm_head is None:
            w = self.model.embed_tokens.embedding[...].T  # [D, V]
        else:
            w = self.lm_head.kernel[...]
        if vocab_ids is not None:
            w = jnp.take(w, jnp.asarray(vocab_ids), axis=1)
        out = jnp.dot(hidden.astype(self.config.dtype), w.astype(self.config.dtype))
        if vocab_ids is None:
            out = rules.constrain(out, ("batch", "length", "act_mlp") if out.ndim == 3 else ("batch", "act_mlp"))
        return out

    def hidden_states(self, input_ids, attention_mask, position_ids, image_embeds=None) -> jax.Array:
        """Last-layer hidden states [B, L, D] after the final norm (transformers' ``hidden_states[-1]``, what
        Qwen-Image's prompt embeddings are); arguments as ``__call__``."""
        x = self.model.embed_tokens(input_ids)
        if image_embeds is not None:
            is_img = (input_ids == self.config.image_token_id)
            idx = jnp.cumsum(is_img.reshape(-1)) - 1
            gathered = jnp.take(image_embeds.astype(x.dtype), jnp.clip(idx, 0, image_embeds.shape[0] - 1), axis=0)
            x = jnp.where(is_img[..., None], gathered.reshape(x.shape), x)
        return self.model(x, attention_mask, position_ids)

    def __call__(self, input_ids, attention_mask, position_ids, image_embeds=None, *, last_only: bool = False,
                 gather_index=None, vocab_ids=None):
        """Prefill logits.

        input_ids / attention_mask [B, L]; position_ids [3, B, L] (``get_rope_index``); image_embeds
        [N, hidden]: the image tokens in sequence order (row-major over batch then position), N must equal the
        number of ``image_token_id`` in ``input_ids`` (checked by the callers on the host: it cannot be checked
        under jit). Returns logits [B, L, V]; [B, V] at the last position with ``last_only``, or at
        ``gather_index`` [B] (e.g. the last real token under right padding). ``vocab_ids``: only those logits.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, image_embeds)
        if last_only:
            h = h[:, -1]
        elif gather_index is not None:
            h = jnp.take_along_axis(h, jnp.asarray(gather_index)[:, None, None], axis=1)[:, 0]
        return self.logits(h, vocab_ids)


def embed_images(model: Qwen2_5_VL, images: Sequence[tuple[jax.Array, tuple[int, int, int]]]) -> jax.Array:
    """Encode images of possibly different grids ([t*h*w, patch_dim], grid) in order -> [N, hidden].

    Images sharing a grid run as one batch through the vision tower (attention never crosses images).
    """
    groups: dict[tuple, list[int]] = {}
    for i, (_, g) in enumerate(images):
        groups.setdefault(tuple(int(x) for x in g), []).append(i)
    out: list = [None] * len(images)
    for g, members in groups.items():
        enc = model.encode_images(jnp.stack([jnp.asarray(images[i][0]) for i in members]), g)
        for j, i in enumerate(members):
            out[i] = enc[j]
    return jnp.concatenate(out, axis=0)


def get_rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None,
                   image_grid_thw: Sequence[Sequence[int]], *, image_token_id: int,
                   spatial_merge_size: int = 2) -> np.ndarray:
    """3D M-RoPE position ids [3, B, L] (host numpy), as transformers' ``get_rope_index`` for images.

    Text runs advance all three axes together; an image run of grid (t, h, w) gets (start + t_idx,
    start + row, start + col) over the merged grid and the next text starts at start + max(h, w)/merge.
    Padding positions (attention_mask 0) get 0. Images are consumed in order across the batch.
    """
    input_ids = np.asarray(input_ids)
    B, L = input_ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    pos = np.zeros((3, B, L), np.int32)
    grids = iter([tuple(int(x) for x in g) for g in image_grid_thw])
    for b in range(B):
        ids = input_ids[b][mask[b]]
        is_img = ids == image_token_id
        chunks, cur, i = [], 0, 0
        while i < len(ids):
            j = i
            while j < len(ids) and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                chunks.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
                cur += j - i
            else:
                try:
                    t, h, w = next(grids)
                except StopIteration:
                    raise ValueError(f"sequence {b}: more image token runs than image grids") from None
                lh, lw = h // spatial_merge_size, w // spatial_merge_size
                if t * lh * lw != j - i:
                    raise ValueError(f"sequence {b}: image run of {j - i} tokens does not match grid {(t, h, w)}"
                                     f" ({t * lh * lw} tokens)")
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
                chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
                cur += max(h, w) // spatial_merge_size
            i = j
        pos[:, b, mask[b]] = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int32)
    if next(grids, None) is not None:
        raise ValueError("more image grids than image token runs in input_ids")
    return pos
