"""Checkpoint layouts of the FLUX VAE -> our AutoencoderKL parameter paths.

Two source layouts:

* ``diffusers``: a diffusers ``vae/`` folder (``diffusion_pytorch_model.safetensors`` + ``config.json``), keys like
  ``encoder.down_blocks.0.resnets.1.conv1.weight``, ``decoder.mid_block.attentions.0.to_out.0.weight`` (older
  folders: ``query``/``key``/``value``/``proj_attn``).
* ``ldm``: Black Forest Labs' single file ``ae.safetensors`` (optionally prefixed ``first_stage_model.`` or
  ``vae.``): ``encoder.down.N.block.M.{norm1,conv1,norm2,conv2,nin_shortcut}``, ``encoder.down.N.downsample.conv``,
  ``{en,de}coder.mid.block_{1,2}``, ``{en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}`` (q/k/v/proj_out are 1x1 convs),
  ``{en,de}coder.norm_out``, ``decoder.up.N.block.M`` and ``decoder.up.N.upsample.conv`` where ldm ``up.N`` is
  diffusers ``up_blocks.(n_blocks-1-N)`` (see diffusers ``convert_ldm_vae_checkpoint``). The single file has no
  config: the FLUX.1 config (:data:`FLUX_VAE_CONFIG`) is assumed, with block count / widths inferred from shapes.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from edit_r1_jax.models.flux.autoencoder import FLUX_VAE_CONFIG, AutoencoderKL, AutoencoderKLConfig
from edit_r1_jax.weights import CONV2D, COPY, LINEAR, Rule

__all__ = ["config_from_diffusers", "config_to_dict", "config_from_dict", "diffusers_rules", "ldm_rules",
           "detect_layout", "infer_ldm_config", "abstract_state", "load_vae"]

_CFG_FIELDS = {f.name for f in dataclasses.fields(AutoencoderKLConfig)} - {"dtype", "param_dtype"}


def config_from_diffusers(d: dict, **overrides) -> AutoencoderKLConfig:
    """Our config from a diffusers ``vae/config.json`` dict (unknown keys such as ``_class_name`` ignored)."""
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in _CFG_FIELDS}
    kw.update(overrides)
    return AutoencoderKLConfig(**kw)


def config_to_dict(cfg: AutoencoderKLConfig) -> dict[str, Any]:
    d = {f: getattr(cfg, f) for f in sorted(_CFG_FIELDS)}
    d["_class_name"] = "AutoencoderKL"
    return d


def config_from_dict(d: dict, dtype=jnp.float32, param_dtype=jnp.float32) -> AutoencoderKLConfig:
    return config_from_diffusers(d, dtype=dtype, param_dtype=param_dtype)


def _conv1x1_to_linear(x):
    """1x1 conv weight [out, in, 1, 1] (or Conv1d [out, in, 1]) -> kernel [in, out]."""
    return x.reshape(x.shape[0], x.shape[1]).T


def _biases_norms_convs(prefix_re: str = "") -> list[Rule]:
    p = prefix_re
    return [
        Rule(p + r"(.*\.(?:norm1|norm2|group_norm|conv_norm_out))\.weight", (r"\1.scale",), COPY),
        Rule(p + r"(.*)\.to_out\.0\.weight", (r"\1.to_out.kernel",), LINEAR),
        Rule(p + r"(.*)\.to_out\.0\.bias", (r"\1.to_out.bias",), COPY),
        Rule(p + r"(.*\.(?:to_q|to_k|to_v))\.weight", (r"\1.kernel",), _linear_any),
        Rule(p + r"(.*)\.query\.(weight|bias)", (r"\1.to_q.\2",), _linear_any),
        Rule(p + r"(.*)\.key\.(weight|bias)", (r"\1.to_k.\2",), _linear_any),
        Rule(p + r"(.*)\.value\.(weight|bias)", (r"\1.to_v.\2",), _linear_any),
        Rule(p + r"(.*)\.proj_attn\.(weight|bias)", (r"\1.to_out.\2",), _linear_any),
        Rule(p + r"((?:.*\.)?(?:conv_in|conv_out|conv1|conv2|conv_shortcut|conv|quant_conv|post_quant_conv))"
                 r"\.weight", (r"\1.kernel",), CONV2D),
        Rule(p + r"(.*)\.bias", (r"\1.bias",), COPY),
    ]


def _linear_any(x):
    """Linear weight [out, in] -> [in, out]; also accepts 1x1 conv weights; biases (1-D) pass through."""
    if x.ndim == 1:
        return x
    return x.reshape(x.shape[0], x.shape[1]).T


def diffusers_rules(cfg: AutoencoderKLConfig) -> list[Rule]:
    del cfg
    return _biases_norms_convs()


def _resnet_rules(src: str, tgt: str) -> list[Rule]:
    """Rules for one ldm resnet whose key stem regex is ``src`` (with capture groups) and our stem ``tgt``."""
    g = re.compile(src).groups + 1  # index of the leaf's own group
    return [
        Rule(src + r"\.(norm1|norm2)\.weight", (tgt + rf".\{g}.scale",), COPY),
        Rule(src + r"\.(norm1|norm2)\.bias", (tgt + rf".\{g}.bias",), COPY),
        Rule(src + r"\.(conv1|conv2)\.weight", (tgt + rf".\{g}.kernel",), CONV2D),
        Rule(src + r"\.(conv1|conv2)\.bias", (tgt + rf".\{g}.bias",), COPY),
        Rule(src + r"\.nin_shortcut\.weight", (tgt + ".conv_shortcut.kernel",), CONV2D),
        Rule(src + r"\.nin_shortcut\.bias", (tgt + ".conv_shortcut.bias",), COPY),
    ]


def _conv_rules(src: str, tgt: str) -> list[Rule]:
    return [Rule(src + r"\.weight", (tgt + ".kernel",), CONV2D), Rule(src + r"\.bias", (tgt + ".bias",), COPY)]


def ldm_rules(cfg: AutoencoderKLConfig, prefix: str = "") -> list[Rule]:
    """Rules for the BFL/LDM single-file layout (``prefix``: literal key prefix, e.g. ``first_stage_model.``)."""
    p = re.escape(prefix)
    n = len(cfg.block_out_channels)
    rules: list[Rule] = []
    for s in ("encoder", "decoder"):
        attn = f"{s}.mid_block.attentions.0"
        rules += [
            Rule(p + rf"{s}\.norm_out\.weight", (f"{s}.conv_norm_out.scale",), COPY),
            Rule(p + rf"{s}\.norm_out\.bias", (f"{s}.conv_norm_out.bias",), COPY),
            *_conv_rules(p + rf"{s}\.conv_in", f"{s}.conv_in"),
            *_conv_rules(p + rf"{s}\.conv_out", f"{s}.conv_out"),
            *_resnet_rules(p + rf"{s}\.mid\.block_1", f"{s}.mid_block.resnets.0"),
            *_resnet_rules(p + rf"{s}\.mid\.block_2", f"{s}.mid_block.resnets.1"),
            Rule(p + rf"{s}\.mid\.attn_1\.norm\.weight", (f"{attn}.group_norm.scale",), COPY),
            Rule(p + rf"{s}\.mid\.attn_1\.norm\.bias", (f"{attn}.group_norm.bias",), COPY),
            Rule(p + rf"{s}\.mid\.attn_1\.(q|k|v)\.weight", (rf"{attn}.to_\1.kernel",), _conv1x1_to_linear),
            Rule(p + rf"{s}\.mid\.attn_1\.(q|k|v)\.bias", (rf"{attn}.to_\1.bias",), COPY),
            Rule(p + rf"{s}\.mid\.attn_1\.proj_out\.weight", (f"{attn}.to_out.kernel",), _conv1x1_to_linear),
            Rule(p + rf"{s}\.mid\.attn_1\.proj_out\.bias", (f"{attn}.to_out.bias",), COPY),
        ]
    rules += _resnet_rules(p + r"encoder\.down\.(\d+)\.block\.(\d+)", r"encoder.down_blocks.\1.resnets.\2")
    rules += _conv_rules(p + r"encoder\.down\.(\d+)\.downsample\.conv", r"encoder.down_blocks.\1.downsamplers.0.conv")
    for b in range(n):  # ldm up.b is diffusers up_blocks.(n-1-b)
        i = n - 1 - b
        rules += _resnet_rules(p + rf"decoder\.up\.{b}\.block\.(\d+)", rf"decoder.up_blocks.{i}.resnets.\1")
        rules += _conv_rules(p + rf"decoder\.up\.{b}\.upsample\.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    rules += _conv_rules(p + r"quant_conv", "quant_conv") + _conv_rules(p + r"post_quant_conv", "post_quant_conv")
    return rules


LDM_PREFIXES = ("first_stage_model.", "vae.", "")


def detect_layout(keys) -> tuple[str, str]:
    """``("diffusers", "")`` or ``("ldm", prefix)`` from the checkpoint's key names."""
    keys = list(keys)
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in keys):
        return "diffusers", ""
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix + "encoder.down.") or k.startswith(prefix + "decoder.up.") for k in keys):
            return "ldm", prefix
    raise ValueError("unrecognised VAE checkpoint layout: neither diffusers (encoder.down_blocks...) nor "
                     "ldm/BFL (encoder.down.N.block...) keys found")


def infer_ldm_config(source, prefix: str = "", base: AutoencoderKLConfig = FLUX_VAE_CONFIG) -> AutoencoderKLConfig:
    """FLUX config with block widths, depth and latent channels read from the single file's shapes."""
    keys = set(source.keys())
    widths = []
    i = 0
    while f"{prefix}encoder.down.{i}.block.0.conv1.weight" in keys:
        widths.append(source.shape(f"{prefix}encoder.down.{i}.block.0.conv1.weight")[0])
        i += 1
    if not widths:
        raise ValueError(f"{source.path}: no {prefix}encoder.down.0.block.0.conv1.weight")
    layers = len({m.group(1) for k in keys if (m := re.fullmatch(
        re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\..*", k))})
    latent = source.shape(f"{prefix}decoder.conv_in.weight")[1]
    groups = base.norm_num_groups
    if any(w % groups for w in widths):
        raise ValueError(f"{source.path}: block widths {widths} are not multiples of {groups} GroupNorm groups; "
                         "pass the VAE's diffusers config.json (flux-vae --config)")
    return dataclasses.replace(
        base, block_out_channels=tuple(widths), down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths), layers_per_block=layers, latent_channels=latent,
        norm_num_groups=groups, mid_block_add_attention=f"{prefix}encoder.mid.attn_1.q.weight" in keys,
        use_quant_conv=f"{prefix}quant_conv.weight" in keys,
        use_post_quant_conv=f"{prefix}post_quant_conv.weight" in keys)


def abstract_state(cfg: AutoencoderKLConfig):
    return nnx.state(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))))


def load_vae(model_dir: str | Path, dtype=jnp.float32, param_dtype=jnp.float32, shardings=None) -> AutoencoderKL:
    """Build our AutoencoderKL from a converted directory (``params.safetensors`` + ``config.json``)."""
    from edit_r1_jax.weights import load_state, read_config

    cfg = config_from_dict(read_config(model_dir), dtype=dtype, param_dtype=param_dtype)
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    state = load_state(model_dir, nnx.state(model), shardings)
    nnx.update(model, state)
    return model
