"""transformers on-disk layouts of the CLIP and T5 text encoders -> our parameter paths; loaders.

* CLIP (``CLIPTextModel`` / ``CLIPModel`` files): keys may carry a ``text_model.`` prefix (hub files, e.g. FLUX's
  ``text_encoder``) or not (transformers 5 ``save_pretrained``); vision-tower / projection keys of a full
  ``CLIPModel`` file and the ``position_ids`` buffer are ignored.
* T5 (``T5EncoderModel``): the input embedding is ``shared.weight``; ``encoder.embed_tokens.weight`` is tied to it
  and usually absent (used instead of ``shared.weight`` only when that is missing); decoder / ``lm_head`` keys
  of a full T5 checkpoint are ignored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from edit_r1_jax.models.text.clip import CLIPTextConfig, CLIPTextModel
from edit_r1_jax.models.text.t5 import T5Config, T5EncoderModel
from edit_r1_jax.weights import COPY, LINEAR, Rule

__all__ = ["clip_config_from_hf", "t5_config_from_hf", "config_to_dict", "clip_rules", "CLIP_IGNORE",
           "t5_rules", "T5_IGNORE", "clip_abstract_state", "t5_abstract_state", "load_clip", "load_t5"]


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}


def _pick(cls, d: dict, overrides: dict):
    kw = {k: v for k, v in d.items() if k in _fields(cls) and v is not None}
    kw.update(overrides)
    return cls(**kw)


def clip_config_from_hf(d: dict, **overrides) -> CLIPTextConfig:
    """From a transformers CLIPTextConfig / CLIPConfig dict (``text_config`` sub-dict used when present)."""
    if "text_config" in d and isinstance(d["text_config"], dict):
        d = d["text_config"]
    if isinstance(d.get("eos_token_id"), list):
        d = dict(d, eos_token_id=d["eos_token_id"][0])
    return _pick(CLIPTextConfig, d, overrides)


def t5_config_from_hf(d: dict, **overrides) -> T5Config:
    d = dict(d)
    ff = d.get("feed_forward_proj", "relu")
    if "is_gated_act" not in d:
        d["is_gated_act"] = ff.startswith("gated-")
    if "dense_act_fn" not in d:
        act = ff.split("-")[-1]
        d["dense_act_fn"] = "gelu_new" if ff == "gated-gelu" else act
    return _pick(T5Config, d, overrides)


def config_to_dict(cfg) -> dict[str, Any]:
    out = {f: getattr(cfg, f) for f in sorted(_fields(type(cfg)))}
    out["_class_name"] = type(cfg).__name__
    return out


# ------------------------------------------------------------------------------------------------- CLIP
_P = r"(?:text_model\.)?"

CLIP_IGNORE = (r"(?:text_model\.)?embeddings\.position_ids", r"vision_model\..*", r"visual_projection\..*",
               r"text_projection\..*", r"logit_scale")


def clip_rules() -> list[Rule]:
    return [
        Rule(_P + r"embeddings\.(token_embedding|position_embedding)\.weight", (r"embeddings.\1.embedding",), COPY),
        Rule(_P + r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight",
             (r"layers.\1.self_attn.\2.kernel",), LINEAR),
        Rule(_P + r"encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias",
             (r"layers.\1.self_attn.\2.bias",), COPY),
        Rule(_P + r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.weight", (r"layers.\1.\2.scale",), COPY),
        Rule(_P + r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.bias", (r"layers.\1.\2.bias",), COPY),
        Rule(_P + r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.weight", (r"layers.\1.mlp.\2.kernel",), LINEAR),
        Rule(_P + r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.bias", (r"layers.\1.mlp.\2.bias",), COPY),
        Rule(_P + r"final_layer_norm\.weight", ("final_layer_norm.scale",), COPY),
        Rule(_P + r"final_layer_norm\.bias", ("final_layer_norm.bias",), COPY),
    ]


# --------------------------------------------------------------------------------------------------- T5
T5_IGNORE = (r"decoder\..*", r"lm_head\..*")


def t5_rules(keys) -> tuple[list[Rule], tuple[str, ...]]:
    """Rules and ignore patterns for the keys present (picks ``shared`` vs ``encoder.embed_tokens``)."""
    keys = set(keys)
    ignore = T5_IGNORE
    if "shared.weight" in keys:
        embed = Rule(r"shared\.weight", ("shared",), COPY)
        ignore = ignore + (r"encoder\.embed_tokens\.weight",)
    else:
        embed = Rule(r"encoder\.embed_tokens\.weight", ("shared",), COPY)
    b = r"encoder\.block\.(\d+)\.layer"
    return [
        embed,
        Rule(b + r"\.0\.SelfAttention\.(q|k|v|o)\.weight", (r"blocks.\1.attn.\2.kernel",), LINEAR),
        Rule(b + r"\.0\.SelfAttention\.relative_attention_bias\.weight", (r"blocks.\1.attn.relative_attention_bias",),
             COPY),
        Rule(b + r"\.0\.layer_norm\.weight", (r"blocks.\1.attn_norm.scale",), COPY),
        Rule(b + r"\.1\.DenseReluDense\.(wi_0|wi_1|wi|wo)\.weight", (r"blocks.\1.ff.\2.kernel",), LINEAR),
        Rule(b + r"\.1\.layer_norm\.weight", (r"blocks.\1.ff_norm.scale",), COPY),
        Rule(r"encoder\.final_layer_norm\.weight", ("final_layer_norm.scale",), COPY),
    ], ignore


# ------------------------------------------------------------------------------------------------ state
def clip_abstract_state(cfg: CLIPTextConfig):
    return nnx.state(nnx.eval_shape(lambda: CLIPTextModel(cfg, rngs=nnx.Rngs(0))))


def t5_abstract_state(cfg: T5Config):
    return nnx.state(nnx.eval_shape(lambda: T5EncoderModel(cfg, rngs=nnx.Rngs(0))))


def _load(model_cls, cfg, model_dir, shardings):
    from edit_r1_jax.weights import load_state

    model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    nnx.update(model, load_state(model_dir, nnx.state(model), shardings))
    return model


def load_clip(model_dir: str | Path, dtype=jnp.float32, param_dtype=jnp.float32, shardings=None) -> CLIPTextModel:
    from edit_r1_jax.weights import read_config

    cfg = clip_config_from_hf(read_config(model_dir), dtype=dtype, param_dtype=param_dtype)
    return _load(CLIPTextModel, cfg, model_dir, shardings)


def load_t5(model_dir: str | Path, dtype=jnp.float32, param_dtype=jnp.float32, shardings=None) -> T5EncoderModel:
    from edit_r1_jax.weights import read_config

    cfg = t5_config_from_hf(read_config(model_dir), dtype=dtype, param_dtype=param_dtype)
    return _load(T5EncoderModel, cfg, model_dir, shardings)
