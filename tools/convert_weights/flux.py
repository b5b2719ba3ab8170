"""FLUX transformer conversion subcommands.

``flux-transformer --src SRC --dst DST [--dtype float32|bfloat16] [--config CONFIG_JSON]``
    SRC: a diffusers ``transformer/`` folder (sharded safetensors + index json + config.json), or one
    ``.safetensors`` file in the original BFL layout (``double_blocks.*``; config inferred from key shapes unless
    ``--config`` is given) or in the diffusers layout (then ``--config`` is required). DST gets ``params.safetensors``
    (our paths) and ``config.json`` (diffusers-style fields, read back with ``FluxConfig.from_diffusers``).
    Everything is validated before anything is written (missing / unexpected keys / wrong shapes).

``export-lora --src CKPT --dst FILE``
    CKPT: folder with ``lora.safetensors`` (our LoRA paths, e.g. ``transformer_blocks.0.attn.to_q.lora_a``) and
    ``config.json`` holding ``rank`` and ``alpha`` (top level or under ``"lora"``). FILE: PEFT/diffusers LoRA
    safetensors loadable by ``FluxKontextPipeline.load_lora_weights`` / ``FluxTransformer2DModel.load_lora_adapter``,
    with ``lora_adapter_metadata`` so diffusers rebuilds ``LoraConfig(r=rank, lora_alpha=alpha)`` (same scale).
    diffusers reads that metadata only when the file is named via ``weight_name`` (``pipe.load_lora_weights(dir,
    weight_name="x.safetensors")`` or ``transformer.load_lora_adapter(dir, weight_name=...)``); a bare file path
    falls back to alpha = rank. ``--fold-scale`` writes ``B * alpha/rank`` with alpha = rank instead, which every
    loader reads the same way (exact when alpha/rank is a power of two, e.g. the default 64/32).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flux-transformer", help="FLUX(-Kontext) transformer: diffusers folder or BFL file")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="storage dtype of the converted tensors (FLUX ships bf16; float32 is lossless for any source)")
    p.add_argument("--config", default=None, help="diffusers config.json for a single-file source (optional for "
                                                  "a BFL file with head size 128: inferred from shapes; needed "
                                                  "otherwise, for the RoPE split)")
    p.set_defaults(func=run_transformer)

    q = subparsers.add_parser("export-lora", help="our FLUX LoRA checkpoint -> PEFT/diffusers safetensors")
    q.add_argument("--src", required=True)
    q.add_argument("--dst", required=True)
    q.add_argument("--prefix", default="transformer", help="key prefix diffusers expects (default: transformer)")
    q.add_argument("--fold-scale", action="store_true",
                   help="multiply lora_B by alpha/rank and declare alpha = rank (for loaders that ignore metadata)")
    q.set_defaults(func=run_export_lora)


def _abstract_state(cfg_dict: dict, dtype: str):
    import jax.numpy as jnp
    from flax import nnx

    from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer

    cfg = FluxConfig.from_diffusers(cfg_dict, param_dtype=jnp.dtype(dtype), lora=None)
    return nnx.state(nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0))))


def convert_transformer(src: str, dst: str, dtype: str = "float32", config: str | dict | None = None) -> Path:
    from edit_r1_jax import weights
    from edit_r1_jax.models.flux import params

    source = weights.SafetensorsSource(src)
    keys = source.keys()
    bfl = params.is_bfl_layout(keys)
    if isinstance(config, dict):
        cfg = dict(config)
    elif config is not None:
        cfg = weights.read_json(config)
    elif Path(src).is_dir() and (Path(src) / "config.json").exists():
        cfg = weights.read_json(Path(src) / "config.json")
    elif bfl:
        cfg = params.infer_bfl_config({k: source.shape(k) for k in keys})
        if cfg["attention_head_dim"] != 128:
            # The shapes give the head size but not how RoPE splits it over (index, row, column): FLUX's
            # (16, 56, 56) holds for 128 only, and a guessed split converts "fine" and computes wrong outputs.
            raise weights.ConversionError(
                f"{src}: BFL checkpoint with head size {cfg['attention_head_dim']} (not FLUX's 128): its RoPE "
                f"split (axes_dims_rope) cannot be inferred from the shapes; pass --config with a diffusers "
                f"config.json that sets axes_dims_rope")
        log.info("inferred FLUX config from %s: %s", src, cfg)
    else:
        raise weights.ConversionError(f"{src}: diffusers-layout source without config.json; pass --config")
    inner = int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128))
    rules = params.bfl_rules(inner) if bfl else params.diffusers_rules()
    abstract = _abstract_state(cfg, dtype)
    out_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    out_cfg["_class_name"] = "FluxTransformer"
    out_cfg["source_layout"] = "bfl" if bfl else "diffusers"
    return weights.convert(source, rules, abstract, dst, out_cfg, dtype=np.dtype(dtype) if dtype != "bfloat16"
                           else _bf16())


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def run_transformer(args: argparse.Namespace) -> None:
    convert_transformer(args.src, args.dst, args.dtype, args.config)


def _lora_hparams(cfg: dict) -> tuple[int, float, tuple[str, ...] | None]:
    c = cfg.get("lora", cfg) if isinstance(cfg.get("lora", None), dict) else cfg
    if "rank" not in c or "alpha" not in c:
        raise ValueError(f"LoRA config needs 'rank' and 'alpha' (top level or under 'lora'), got keys {sorted(cfg)}")
    targets = c.get("targets")
    return int(c["rank"]), float(c["alpha"]), tuple(targets) if targets else None


def export_lora(src: str, dst: str, prefix: str = "transformer", fold_scale: bool = False) -> Path:
    from edit_r1_jax import weights
    from edit_r1_jax.models.flux import params
    from edit_r1_jax.models.lora import DEFAULT_TARGETS

    src_p = Path(src)
    tensors = weights.read_tensors(src_p / "lora.safetensors")
    rank, alpha, targets = _lora_hparams(weights.read_json(src_p / "config.json"))
    problems = []
    modules = {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(.*)\.lora_([ab])", k)
        if m is None:
            problems.append(f"{k}: not a LoRA path")
            continue
        modules.setdefault(m.group(1), {})[m.group(2)] = v
    for mod, ab in sorted(modules.items()):
        if set(ab) != {"a", "b"}:
            problems.append(f"{mod}: has {sorted(ab)}, needs lora_a and lora_b")
            continue
        a, b = ab["a"], ab["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != rank or b.shape[0] != rank:
            problems.append(f"{mod}: lora_a {a.shape} / lora_b {b.shape} do not match rank {rank}")
    if problems:
        raise weights.ConversionError(f"{src_p / 'lora.safetensors'}:\n  " + "\n  ".join(problems))
    if targets is None:
        targets = DEFAULT_TARGETS
    if fold_scale:
        scale = np.float32(alpha / rank)
        tensors = {k: (v * scale).astype(v.dtype) if k.endswith(".lora_b") else v for k, v in tensors.items()}
        alpha = float(rank)
    peft = params.lora_to_peft(tensors, prefix=prefix + ".")
    dst_p = Path(dst)
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    weights.save_tensors(dst_p, peft, metadata=params.peft_metadata(rank, alpha, targets, prefix=prefix))
    log.info("exported %d LoRA modules (rank %d, alpha %g) to %s", len(modules), rank, alpha, dst_p)
    return dst_p


def run_export_lora(args: argparse.Namespace) -> None:
    export_lora(args.src, args.dst, args.prefix, args.fold_scale)
