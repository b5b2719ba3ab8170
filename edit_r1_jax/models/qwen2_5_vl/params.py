"""Hub checkpoint keys (``visual.*``, ``model.*``, ``lm_head``) -> our parameter paths, plus model loading.

transformers 5 renames these in memory (``model.visual.*``, ``model.language_model.*``) but ``save_pretrained``
writes the hub layout, which is what every Qwen2.5-VL checkpoint on disk uses.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from edit_r1_jax import weights
from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig
from edit_r1_jax.weights import COPY, LINEAR, Rule


def PATCH_EMBED(x):  # noqa: N802
    """Conv3d weight [D, C, T, P, P] -> matmul kernel [C*T*P*P, D] (same (C, T, P, P) order as the patches)."""
    return x.reshape(x.shape[0], -1).T


RULES = (
    Rule(r"visual\.patch_embed\.proj\.weight", "visual.patch_embed.proj.kernel", PATCH_EMBED),
    Rule(r"(.*\.(?:norm1|norm2|ln_q|input_layernorm|post_attention_layernorm)|model\.norm)\.weight",
         r"\1.weight", COPY),
    Rule(r"visual\.merger\.mlp\.(0|2)\.weight", r"visual.merger.mlp_\1.kernel", LINEAR),
    Rule(r"visual\.merger\.mlp\.(0|2)\.bias", r"visual.merger.mlp_\1.bias", COPY),
    Rule(r"model\.embed_tokens\.weight", "model.embed_tokens.embedding", COPY),
    Rule(r"((?:visual\.blocks|model\.layers)\.\d+\.\w+\.\w+|lm_head)\.weight", r"\1.kernel", LINEAR),
    Rule(r"((?:visual\.blocks|model\.layers)\.\d+\.\w+\.\w+)\.bias", r"\1.bias", COPY),
)


def ignore_keys(cfg: Qwen2_5_VLConfig) -> tuple[str, ...]:
    # With tied embeddings some writers still store lm_head.weight (a copy of embed_tokens): drop it.
    return (r"lm_head\.weight",) if cfg.text_config.tie_word_embeddings else ()


def abstract_state(cfg: Qwen2_5_VLConfig):
    return nnx.state(nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))))


def load_model(model_dir: str | Path, *, dtype=jnp.float32, param_dtype=None, mesh=None) -> Qwen2_5_VL:
    """Build the model from a converted directory; parameters sharded over ``mesh`` by their logical axes."""
    from edit_r1_jax.parallel import rules

    cfg = Qwen2_5_VLConfig.from_dict(weights.read_config(model_dir), dtype=dtype,
                                     param_dtype=dtype if param_dtype is None else param_dtype)
    abstract = nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))
    graphdef, astate = nnx.split(abstract)
    shardings = None if mesh is None else rules.state_shardings(astate, mesh)
    state = weights.load_state(model_dir, astate, shardings)
    return nnx.merge(graphdef, state)
