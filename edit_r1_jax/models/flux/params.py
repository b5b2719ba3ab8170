"""Key maps between PyTorch FLUX transformer checkpoints and ``FluxTransformer`` parameter paths.

* ``diffusers_rules()``: diffusers ``FluxTransformer2DModel`` layout (``transformer/`` folder). Near identity:
  ``X.weight -> X.kernel`` (transposed), ``X.bias -> X.bias``, q/k RMSNorm ``X.weight -> X.scale``.
* ``bfl_rules(inner_dim)``: original Black Forest Labs single-file layout (``flux1-kontext-dev.safetensors``),
  optionally prefixed ``model.diffusion_model.``: fused ``img_attn.qkv`` / ``txt_attn.qkv``, fused single-block
  ``linear1`` = [q; k; v; mlp], ``linear2``, ``*.norm.query_norm.scale``, and ``final_layer.adaLN_modulation.1``
  stored as (shift, scale) where diffusers uses (scale, shift).
* ``infer_bfl_config(shapes)``: diffusers-style config dict inferred from a BFL file's key shapes.
* LoRA: ``lora_to_peft(flat)`` maps our LoRA paths (``transformer_blocks.0.attn.to_q.lora_a [in, r]``) to PEFT /
  diffusers names (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight [r, in]``, ``lora_B.weight
  [out, r]``); ``peft_lora_rules()`` is the inverse (for ``weights.convert``); ``peft_metadata(lora_cfg)`` is the
  ``lora_adapter_metadata`` JSON diffusers reads to rebuild the ``LoraConfig`` (rank, alpha -> same scale).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import numpy as np

from edit_r1_jax.weights import COPY, LINEAR, Rule, split_rows, swap_halves

# q/k RMSNorms carry ``weight`` in torch and ``scale`` here.
_NORM = r"norm_(?:added_)?[qk]"


def diffusers_rules() -> tuple[Rule, ...]:
    return (
        Rule(rf"(.*\.{_NORM})\.weight", (r"\1.scale",), COPY),
        Rule(r"(.*)\.weight", (r"\1.kernel",), LINEAR),
        Rule(r"(.*)\.bias", (r"\1.bias",), COPY),
    )


_P = r"(?:model\.diffusion_model\.)?"  # optional prefix of ComfyUI/BFL full checkpoints


def bfl_rules(inner_dim: int, mlp_ratio: float = 4.0) -> tuple[Rule, ...]:
    d = inner_dim
    mlp = int(d * mlp_ratio)
    rules: list[Rule] = []

    def lin(src: str, dst: str):
        rules.append(Rule(_P + src + r"\.weight", (dst + ".kernel",), LINEAR))
        rules.append(Rule(_P + src + r"\.bias", (dst + ".bias",), COPY))

    def fused(src: str, dsts: tuple[str, ...], sizes):
        rules.append(Rule(_P + src + r"\.weight", tuple(t + ".kernel" for t in dsts), split_rows(sizes, LINEAR)))
        rules.append(Rule(_P + src + r"\.bias", tuple(t + ".bias" for t in dsts), split_rows(sizes, COPY)))

    def norm(src: str, dst: str):
        rules.append(Rule(_P + src + r"\.scale", (dst + ".scale",), COPY))

    lin(r"time_in\.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin(r"time_in\.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin(r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1")
    lin(r"guidance_in\.out_layer", "time_text_embed.guidance_embedder.linear_2")
    lin(r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1")
    lin(r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2")
    lin(r"txt_in", "context_embedder")
    lin(r"img_in", "x_embedder")

    db, tb = r"double_blocks\.(\d+)\.", r"transformer_blocks.\1."
    lin(db + r"img_mod\.lin", tb + "norm1.linear")
    lin(db + r"txt_mod\.lin", tb + "norm1_context.linear")
    fused(db + r"img_attn\.qkv", (tb + "attn.to_q", tb + "attn.to_k", tb + "attn.to_v"), (d, d, d))
    fused(db + r"txt_attn\.qkv", (tb + "attn.add_q_proj", tb + "attn.add_k_proj", tb + "attn.add_v_proj"),
          (d, d, d))
    norm(db + r"img_attn\.norm\.query_norm", tb + "attn.norm_q")
    norm(db + r"img_attn\.norm\.key_norm", tb + "attn.norm_k")
    norm(db + r"txt_attn\.norm\.query_norm", tb + "attn.norm_added_q")
    norm(db + r"txt_attn\.norm\.key_norm", tb + "attn.norm_added_k")
    lin(db + r"img_attn\.proj", tb + "attn.to_out.0")
    lin(db + r"txt_attn\.proj", tb + "attn.to_add_out")
    lin(db + r"img_mlp\.0", tb + "ff.net.0.proj")
    lin(db + r"img_mlp\.2", tb + "ff.net.2")
    lin(db + r"txt_mlp\.0", tb + "ff_context.net.0.proj")
    lin(db + r"txt_mlp\.2", tb + "ff_context.net.2")

    sb, st = r"single_blocks\.(\d+)\.", r"single_transformer_blocks.\1."
    lin(sb + r"modulation\.lin", st + "norm.linear")
    fused(sb + r"linear1", (st + "attn.to_q", st + "attn.to_k", st + "attn.to_v", st + "proj_mlp"), (d, d, d, mlp))
    norm(sb + r"norm\.query_norm", st + "attn.norm_q")
    norm(sb + r"norm\.key_norm", st + "attn.norm_k")
    lin(sb + r"linear2", st + "proj_out")

    lin(r"final_layer\.linear", "proj_out")
    rules.append(Rule(_P + r"final_layer\.adaLN_modulation\.1\.weight", ("norm_out.linear.kernel",),
                      swap_halves(LINEAR)))
    rules.append(Rule(_P + r"final_layer\.adaLN_modulation\.1\.bias", ("norm_out.linear.bias",), swap_halves(COPY)))
    return tuple(rules)


def is_bfl_layout(keys) -> bool:
    return any(re.match(_P + r"(double_blocks|single_blocks|img_in|final_layer)\.", k) for k in keys)


def infer_bfl_config(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """diffusers-style config from the shapes of a BFL-layout checkpoint."""
    s = {re.sub(r"^model\.diffusion_model\.", "", k): tuple(v) for k, v in shapes.items()}

    def count(prefix):
        idx = {int(m.group(1)) for k in s if (m := re.match(prefix + r"\.(\d+)\.", k))}
        if idx and idx != set(range(max(idx) + 1)):
            raise ValueError(f"{prefix} block indices are not contiguous: {sorted(idx)}")
        return len(idx)

    try:
        inner, in_ch = s["img_in.weight"]
        _, joint = s["txt_in.weight"]
        _, pooled = s["vector_in.in_layer.weight"]
        out_dim = s["final_layer.linear.weight"][0]
        if "double_blocks.0.img_attn.norm.query_norm.scale" in s:
            head_dim = s["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        else:
            head_dim = s["single_blocks.0.norm.query_norm.scale"][0]
    except KeyError as e:
        raise ValueError(f"cannot infer the FLUX config: key {e} missing from the checkpoint") from None
    if inner % head_dim:
        raise ValueError(f"width {inner} is not a multiple of head dim {head_dim}")
    return {
        "patch_size": 1,
        "in_channels": in_ch,
        "out_channels": out_dim,
        "num_layers": count("double_blocks"),
        "num_single_layers": count("single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": joint,
        "pooled_projection_dim": pooled,
        "guidance_embeds": "guidance_in.in_layer.weight" in s,
        "axes_dims_rope": list(_default_axes(head_dim)),
    }


def _default_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX uses (16, 56, 56) for head dim 128; other head dims keep the 2:7:7 split (rounded to even)."""
    if head_dim == 128:
        return (16, 56, 56)
    a = max(2, int(round(head_dim * 16 / 128 / 2)) * 2)
    b = (head_dim - a) // 2
    b -= b % 2
    return (head_dim - 2 * b, b, b)


# ---------------------------------------------------------------------------------------------------------
# LoRA <-> PEFT / diffusers.

PEFT_PREFIX = "transformer."


def lora_to_peft(flat: Mapping[str, Any], prefix: str = PEFT_PREFIX) -> dict[str, np.ndarray]:
    """``{our lora path: array}`` -> PEFT state dict (``lora_A.weight [r, in]``, ``lora_B.weight [out, r]``)."""
    out, bad = {}, []
    for k, v in flat.items():
        m = re.fullmatch(r"(.*)\.lora_([ab])", k)
        if m is None:
            bad.append(k)
            continue
        out[f"{prefix}{m.group(1)}.lora_{m.group(2).upper()}.weight"] = np.ascontiguousarray(np.asarray(v).T)
    if bad:
        raise ValueError(f"not LoRA parameter paths (expected '<module>.lora_a' / '.lora_b'): {bad}")
    return out


def peft_lora_rules(prefix: str = PEFT_PREFIX) -> tuple[Rule, ...]:
    """PEFT/diffusers LoRA keys -> our LoRA paths (``weights.convert`` direction)."""
    p = re.escape(prefix)
    return (
        Rule(p + r"(.*)\.lora_A(?:\.default)?\.weight", (r"\1.lora_a",), LINEAR),
        Rule(p + r"(.*)\.lora_B(?:\.default)?\.weight", (r"\1.lora_b",), LINEAR),
    )


def peft_metadata(rank: int, alpha: float, targets, prefix: str = "transformer") -> dict[str, str]:
    """safetensors ``__metadata__`` that diffusers' ``load_lora_adapter`` turns into ``LoraConfig`` (scale
    ``alpha / rank`` preserved exactly; without it diffusers assumes alpha = rank)."""
    cfg = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": sorted(targets), "lora_dropout": 0.0,
           "bias": "none", "init_lora_weights": "gaussian", "use_dora": False}
    packed = {f"{prefix}.{k}": v for k, v in cfg.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(packed, indent=2, sort_keys=True)}


# ---------------------------------------------------------------------------------------------------------
# Loading a converted transformer for training / sampling.


def load_transformer(model_dir, *, mesh=None, seed: int = 0, **config_overrides):
    """Converted checkpoint -> ``(config, graphdef, base_state, lora_state)`` ready for ``lora.apply``.

    ``config_overrides`` go to ``FluxConfig.from_diffusers`` (``dtype``, ``param_dtype``, ``remat_policy``,
    ``attention_impl``, ``lora=LoRAConfig(...)``); loading as ``lora.load_policy_model``."""
    from edit_r1_jax import weights
    from edit_r1_jax.models import lora as lora_lib
    from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer

    cfg = FluxConfig.from_diffusers(weights.read_config(model_dir), **config_overrides)
    return (cfg, *lora_lib.load_policy_model(FluxTransformer, cfg, model_dir, mesh=mesh, seed=seed))
