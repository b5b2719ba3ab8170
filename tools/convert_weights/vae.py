"""``flux-vae``: FLUX AutoencoderKL (diffusers ``vae/`` folder or BFL ``ae.safetensors``) -> our layout.

    python -m tools.convert_weights flux-vae --src PIPELINE_DIR/vae --dst OUT/vae [--dtype float32]
    python -m tools.convert_weights flux-vae --src ae.safetensors --dst OUT/vae
"""

from __future__ import annotations

import logging
from pathlib import Path

from edit_r1_jax.models.flux import autoencoder_params as P
from edit_r1_jax.weights import SafetensorsSource, convert, read_json

log = logging.getLogger(__name__)


def convert_vae(src: str | Path, dst: str | Path, dtype=None, config: str | Path | None = None) -> Path:
    """Convert a diffusers VAE folder (or a pipeline folder with ``vae/``) or an ldm single file.

    ``config``: a diffusers AutoencoderKL ``config.json`` to use for a single file (default: the FLUX.1 VAE
    config with block widths, depth and latent channels read from the tensor shapes).
    """
    src = Path(src)
    if src.is_dir() and not (src / "config.json").exists() and (src / "vae").is_dir():
        src = src / "vae"
    source = SafetensorsSource(src)
    layout, prefix = P.detect_layout(source.keys())
    if layout == "diffusers":
        cfg_file = (src if src.is_dir() else src.parent) / "config.json"
        if not cfg_file.exists():
            raise FileNotFoundError(f"{cfg_file} not found: a diffusers-layout VAE needs its config.json")
        cfg = P.config_from_diffusers(read_json(cfg_file))
        rules = P.diffusers_rules(cfg)
        ignore = ()
    else:
        if config is not None:
            cfg = P.config_from_diffusers(read_json(config))
        else:
            cfg = P.infer_ldm_config(source, prefix)
        rules = P.ldm_rules(cfg, prefix)
        # a full LDM/SD checkpoint carries other models too: only keys under the VAE prefix are ours
        ignore = (r"(?!" + prefix.replace(".", r"\.") + r"(?:encoder|decoder|quant_conv|post_quant_conv)\.).*",) \
            if prefix else ()
    log.info("VAE layout %s%s: %s", layout, f" (prefix {prefix!r})" if prefix else "", cfg)
    return convert(source, rules, P.abstract_state(cfg), dst, P.config_to_dict(cfg), dtype=dtype, ignore=ignore)


def _run(args):
    convert_vae(args.src, args.dst, args.dtype, args.config)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("flux-vae", help="FLUX VAE (diffusers vae/ folder or BFL ae.safetensors)")
    p.add_argument("--src", required=True, help="diffusers vae folder, pipeline folder, or ae.safetensors")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--dtype", default=None, help="storage dtype (default float32)")
    p.add_argument("--config", default=None,
                   help="diffusers AutoencoderKL config.json for a single-file source (default: FLUX.1's)")
    p.set_defaults(func=_run)
