"""Qwen-Image(-Edit) conversion subcommands.

``qwen-image-transformer --src DIR --dst OUT [--dtype float32|bfloat16]``
    A diffusers ``QwenImageTransformer2DModel`` folder (``config.json`` + (sharded) safetensors) -> OUT with
    ``params.safetensors`` (our paths) and ``config.json`` (diffusers fields, read back with
    ``QwenImageConfig.from_diffusers``).
``qwen-image-vae --src DIR --dst OUT [--dtype ...]``
    A diffusers ``AutoencoderKLQwenImage`` folder -> OUT (``QwenImageVAEConfig.from_diffusers`` reads it back,
    latents_mean/std included).
``qwen-image-edit --src PIPELINE_DIR --dst OUT [--dtype ...] [--skip-text]``
    A whole diffusers ``QwenImageEditPlusPipeline`` (or ``QwenImageEditPipeline``) folder: ``OUT/transformer``,
    ``OUT/vae``, ``OUT/text_encoder`` (the ``qwen2.5-vl`` converter, with the pipeline's tokenizer and processor
    files next to it so it is loadable on its own, e.g. as the reward model), ``OUT/tokenizer`` and
    ``OUT/processor`` (copied), ``OUT/scheduler/scheduler_config.json`` and ``OUT/qwen_image_edit.json`` (what was
    converted from where). Every component is validated before anything of it is written, tensors stream one by one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PIPELINE_CLASSES = ("QwenImageEditPlusPipeline", "QwenImageEditPipeline", "QwenImagePipeline")


def _store_dtype(dtype):
    if dtype in (None, "float32"):
        return np.dtype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _read_config(folder: Path, what: str) -> dict:
    f = folder / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} not found: is {folder} a diffusers {what} folder?")
    return json.loads(f.read_text())


def convert_transformer(src, dst, dtype=None) -> Path:
    from edit_r1_jax import weights
    from edit_r1_jax.models.qwen_image import params
    from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig

    src = Path(src)
    d = _read_config(src, "QwenImageTransformer2DModel")
    cls = d.get("_class_name")
    if cls not in (None, "QwenImageTransformer2DModel"):
        raise ValueError(f"{src / 'config.json'}: _class_name is {cls!r}, expected QwenImageTransformer2DModel")
    cfg = QwenImageConfig.from_diffusers(d)
    out_cfg = {**cfg.to_diffusers(), "_class_name": "QwenImageTransformer"}
    log.info("qwen-image transformer %s: %d blocks, width %d", src, cfg.num_layers, cfg.inner_dim)
    return weights.convert(weights.SafetensorsSource(src), params.transformer_rules(),
                           params.transformer_abstract_state(cfg), dst, out_cfg, dtype=_store_dtype(dtype))


def convert_vae(src, dst, dtype=None) -> Path:
    from edit_r1_jax import weights
    from edit_r1_jax.models.qwen_image import params
    from edit_r1_jax.models.qwen_image.autoencoder import QwenImageVAEConfig

    src = Path(src)
    d = _read_config(src, "AutoencoderKLQwenImage")
    cls = d.get("_class_name")
    if cls not in (None, "AutoencoderKLQwenImage"):
        raise ValueError(f"{src / 'config.json'}: _class_name is {cls!r}, expected AutoencoderKLQwenImage")
    cfg = QwenImageVAEConfig.from_diffusers(d)
    out_cfg = {**cfg.to_diffusers(), "_class_name": "QwenImageVAE"}
    log.info("qwen-image VAE %s: base_dim %d, z_dim %d", src, cfg.base_dim, cfg.z_dim)
    return weights.convert(weights.SafetensorsSource(src), params.vae_rules(), params.vae_abstract_state(cfg),
                           dst, out_cfg, dtype=_store_dtype(dtype), ignore=params.VAE_IGNORE)


def _convert_text_encoder(src: Path, tok_dirs: list[Path], dst: Path, dtype) -> None:
    """The qwen2.5-vl converter wants the tokenizer files beside the weights; the pipeline keeps them in
    ``tokenizer/`` and ``processor/``, so stage a folder of links to all of them and convert that."""
    from tools.convert_weights import qwen

    with tempfile.TemporaryDirectory(prefix="qwen_te_") as tmp:
        stage = Path(tmp)
        for folder in [*tok_dirs, src]:  # the text encoder's own files win over same-named ones
            for f in folder.iterdir():
                if f.is_file():
                    link = stage / f.name
                    if link.exists() or link.is_symlink():
                        link.unlink()
                    link.symlink_to(f.resolve())
        qwen.convert(stage, dst, None if dtype in (None, "float32") else dtype)


def convert_edit_pipeline(src, dst, dtype=None, skip_text: bool = False) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {src}")
    index_file = src / "model_index.json"
    if not index_file.exists():
        raise FileNotFoundError(f"{index_file} not found: is {src} a diffusers Qwen-Image pipeline folder?")
    index = json.loads(index_file.read_text())
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise ValueError(f"{index_file}: _class_name {index.get('_class_name')!r} is not one of {PIPELINE_CLASSES}")
    for required in ("transformer", "vae", "scheduler"):
        if not (src / required).is_dir():
            raise FileNotFoundError(f"{src / required} not found ({index_file} lists {sorted(index)})")
    dst.mkdir(parents=True, exist_ok=True)
    done = {}
    convert_transformer(src / "transformer", dst / "transformer", dtype)
    done["transformer"] = str(src / "transformer")
    convert_vae(src / "vae", dst / "vae", dtype)
    done["vae"] = str(src / "vae")
    tok_dirs = [src / n for n in ("tokenizer", "processor") if (src / n).is_dir()]
    for d in tok_dirs:
        shutil.copytree(d, dst / d.name, dirs_exist_ok=True)
        done[d.name] = str(d)
    if skip_text:
        log.info("--skip-text: text encoder not converted")
    elif not (src / "text_encoder").is_dir():
        log.warning("%s has no text_encoder: skipped (pass prompt embeddings when editing)", src)
    else:
        _convert_text_encoder(src / "text_encoder", tok_dirs, dst / "text_encoder", dtype)
        done["text_encoder"] = str(src / "text_encoder")
    sched = src / "scheduler" / "scheduler_config.json"
    if not sched.exists():
        raise FileNotFoundError(f"{sched} not found: the Qwen-Image sigma schedule is read from it")
    (dst / "scheduler").mkdir(exist_ok=True)
    shutil.copy2(sched, dst / "scheduler" / "scheduler_config.json")
    done["scheduler"] = str(sched)
    (dst / "qwen_image_edit.json").write_text(json.dumps(
        {"source": str(src), "components": done, "pipeline_class": index.get("_class_name")}, indent=2))
    log.info("converted %s into %s: %s", src, dst, sorted(done))
    return dst


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("qwen-image-transformer", help="diffusers QwenImageTransformer2DModel folder")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="storage dtype (default float32)")
    p.set_defaults(func=lambda a: convert_transformer(a.src, a.dst, a.dtype))

    v = subparsers.add_parser("qwen-image-vae", help="diffusers AutoencoderKLQwenImage folder")
    v.add_argument("--src", required=True)
    v.add_argument("--dst", required=True)
    v.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="storage dtype (default float32)")
    v.set_defaults(func=lambda a: convert_vae(a.src, a.dst, a.dtype))

    e = subparsers.add_parser("qwen-image-edit", help="a whole diffusers QwenImageEditPlusPipeline folder")
    e.add_argument("--src", required=True, help="diffusers pipeline folder (save_pretrained layout)")
    e.add_argument("--dst", required=True)
    e.add_argument("--dtype", default=None, choices=("float32", "bfloat16"), help="storage dtype (default float32)")
    e.add_argument("--skip-text", action="store_true", help="do not convert the text encoder")
    e.set_defaults(func=lambda a: convert_edit_pipeline(a.src, a.dst, a.dtype, a.skip_text))
