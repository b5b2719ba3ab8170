"""Key maps and loaders for converted Qwen-Image checkpoints (transformer and VAE).

* ``transformer_rules()``: diffusers ``QwenImageTransformer2DModel`` layout -> ``QwenImageTransformer`` paths: near
  identity (``X.weight -> X.kernel`` transposed, RMSNorm ``weight -> scale``, the additional-t embedding table
  ``weight -> embedding``).
* ``vae_rules()``: diffusers ``AutoencoderKLQwenImage`` layout -> ``QwenImageVAE`` paths: causal 3-D conv kernels
  keep their last temporal tap (``OIDHW[:, :, -1]`` -> HWIO; the only tap that meets data on single frames, see
  ``autoencoder.py``), 2-D convs OIHW -> HWIO, RMS_norm ``gamma [C,1,1(,1)] -> scale [C]``; ``VAE_IGNORE``: the
  temporal resampling convs, unused on single frames.
* ``load_transformer(dir, mesh=None, seed=0, **overrides) -> (config, graphdef, base_state, lora_state)`` for
  ``lora.apply``; ``load_vae(dir) -> QwenImageVAE``.
* LoRA export to the PEFT/diffusers layout is the generic ``export-lora`` subcommand
  (``edit_r1_jax.models.flux.params.lora_to_peft``): our LoRA paths already are diffusers' module names.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from edit_r1_jax.weights import CONV2D, COPY, LINEAR, Rule

_NORM = r"(?:.*\.norm_(?:added_)?[qk]|txt_norm)"


def transformer_rules() -> tuple[Rule, ...]:
    return (
        Rule(rf"({_NORM})\.weight", (r"\1.scale",), COPY),
        Rule(r"(time_text_embed\.addition_t_embedding)\.weight", (r"\1.embedding",), COPY),
        Rule(r"(.*)\.weight", (r"\1.kernel",), LINEAR),
        Rule(r"(.*)\.bias", (r"\1.bias",), COPY),
    )


def _flatten(x):
    return x.reshape(-1)


def _causal_last_tap(x):
    """OIDHW causal 3-D kernel -> HWIO kernel of its last temporal tap."""
    return x[:, :, -1].transpose(2, 3, 1, 0)


VAE_IGNORE = (r".*\.time_conv\.(?:weight|bias)",)


def vae_rules() -> tuple[Rule, ...]:
    # 2-D convs: the resample convs (``resample.1``) and the attention blocks' 1x1 convs; every other weight is a
    # causal 3-D conv. Keys of ``VAE_IGNORE`` match no rule (weights.convert drops only unmatched keys).
    return (
        Rule(r"(.*)\.gamma", (r"\1.scale",), _flatten),
        Rule(r"(.*\.(?:resample\.1|to_qkv|proj))\.weight", (r"\1.kernel",), CONV2D),
        Rule(r"(?!.*\.time_conv\.)(.*)\.weight", (r"\1.kernel",), _causal_last_tap),
        Rule(r"(?!.*\.time_conv\.)(.*)\.bias", (r"\1.bias",), COPY),
    )


def transformer_abstract_state(cfg):
    from edit_r1_jax.models.qwen_image.modeling import QwenImageTransformer

    return nnx.state(nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0))))


def vae_abstract_state(cfg):
    from edit_r1_jax.models.qwen_image.autoencoder import QwenImageVAE

    return nnx.state(nnx.eval_shape(lambda: QwenImageVAE(cfg, rngs=nnx.Rngs(0))))


def load_transformer(model_dir, *, mesh=None, seed: int = 0, **config_overrides):
    """Converted checkpoint -> ``(config, graphdef, base_state, lora_state)`` ready for ``lora.apply``.

    ``config_overrides`` go to ``QwenImageConfig.from_diffusers`` (``dtype``, ``param_dtype``, ``remat_policy``,
    ``attention_impl``, ``lora=LoRAConfig(...)``); loading as ``lora.load_policy_model``."""
    from edit_r1_jax import weights
    from edit_r1_jax.models import lora as lora_lib
    from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig, QwenImageTransformer

    cfg = QwenImageConfig.from_diffusers(weights.read_config(model_dir), **config_overrides)
    return (cfg, *lora_lib.load_policy_model(QwenImageTransformer, cfg, model_dir, mesh=mesh, seed=seed))


def load_vae(model_dir: str | Path, dtype=jnp.float32, param_dtype=jnp.float32, shardings=None):
    """A converted ``vae/`` directory -> ``QwenImageVAE`` (stateful module)."""
    from edit_r1_jax import weights
    from edit_r1_jax.models.qwen_image.autoencoder import QwenImageVAE, QwenImageVAEConfig

    cfg = QwenImageVAEConfig.from_diffusers(weights.read_config(model_dir), dtype=dtype, param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: QwenImageVAE(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    return nnx.merge(graphdef, weights.load_state(model_dir, abstract_state, shardings))
