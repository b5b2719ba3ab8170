"""Qwen-Image-Edit(-2509): the Qwen-Image MMDiT over [noisy; reference] tokens, the Qwen-Image VAE, and Qwen2.5-VL
prompt embeddings that see the source image (spec G; diffusers ``QwenImageEditPlusPipeline``).

Converted folder (``python -m tools.convert_weights qwen-image-edit``): transformer/, vae/, text_encoder/ (our
Qwen2.5-VL, loadable on its own), tokenizer/, processor/, scheduler/scheduler_config.json, qwen_image_edit.json.
``cond``: ref [B, Nr, 64] (the source at the training resolution, packed), text [B, T, 3584] (last hidden states
of the "Picture 1:" template, prefix dropped, padded to ``text.max_length``), mask [B, T] (1 = real token).
Position ids: MSRoPE, generated image on frame 0, the reference on frame 1, text after the grid. No guidance
embedding; the schedule's dynamic shift and ``shift_terminal`` come from the scheduler config.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from edit_r1_jax.diffusion import qwen_image as qi
from edit_r1_jax.editors.base import Conditioner, Family, config_field, lora_config

MARKER = "qwen_image_edit.json"  # written by the qwen-image-edit converter


class QwenImageConditioner(Conditioner):
    """``QwenImagePromptEncoder`` (models/qwen_image/text.py) as the loop's conditioner."""

    names = ("text", "mask")
    uses_image = True

    def __init__(self, encoder):
        self.encoder = encoder

    def fingerprint(self) -> str:
        return self.encoder.fingerprint()

    def settings(self):
        return {"max_length": int(self.encoder.max_length)}

    def __call__(self, prompts, images=None):
        if images is None:
            raise ValueError("Qwen-Image-Edit prompt embeddings need the source images (the VLM sees them)")
        out = self.encoder(list(images), list(prompts))
        return {"text": np.asarray(out["text"], np.float32), "mask": np.asarray(out["mask"], np.int32)}


class QwenImageEdit(Family):
    name = "qwen_image_edit"
    convert_hint = "python -m tools.convert_weights qwen-image-edit --src PIPELINE_DIR --dst DIR"
    cond_names = QwenImageConditioner.names
    conditioner_uses_image = True

    def detect(self, model_dir: Path) -> bool:
        d = Path(model_dir)
        f = d / "transformer" / "config.json"
        return (d / MARKER).exists() or (f.exists() and "zero_cond_t" in json.loads(f.read_text()))

    def check_dir(self, model_dir, what="--model", *, text_encoders=True):
        from edit_r1_jax.folders import FolderError, check_converted, check_qwen_dir

        d = Path(model_dir)
        if not d.is_dir():
            raise FolderError(f"{what} {d}: folder not found (make one with: {self.convert_hint})")
        for part in ("transformer", "vae"):
            check_converted(d / part, f"{what} {d}: component", f"make one with: {self.convert_hint}")
        if text_encoders:
            check_qwen_dir(d / "text_encoder", f"{what} {d}: text encoder")
        f = d / "scheduler" / "scheduler_config.json"
        if not f.exists():
            raise FolderError(f"{what} {d}: missing scheduler/scheduler_config.json (make one with: "
                              f"{self.convert_hint})")
        return d

    def transformer_config(self, model_dir, **overrides):
        from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig
        from edit_r1_jax.weights import read_config

        return QwenImageConfig.from_diffusers(read_config(Path(model_dir) / "transformer"), **overrides)

    def load_transformer(self, model_dir, *, mesh=None, seed=0, **overrides):
        from edit_r1_jax.models.qwen_image import params

        return params.load_transformer(Path(model_dir) / "transformer", mesh=mesh, seed=seed, **overrides)

    def abstract_transformer(self, cfg):
        from flax import nnx

        from edit_r1_jax.models.qwen_image.modeling import QwenImageTransformer

        return nnx.eval_shape(lambda: QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))

    @staticmethod
    def velocity(model, z, sigma, cond, img_ids, txt_ids, guidance):
        from edit_r1_jax.models.qwen_image.modeling import qwen_image_velocity

        del guidance  # no guidance embedding (and no CFG in training, spec G)
        return qwen_image_velocity(model, z, cond["ref"], cond["text"], cond["mask"], sigma, img_ids, txt_ids)

    def vae_config(self, model_dir, **overrides):
        from edit_r1_jax.models.qwen_image.autoencoder import QwenImageVAEConfig
        from edit_r1_jax.weights import read_config

        return QwenImageVAEConfig.from_diffusers(read_config(Path(model_dir) / "vae"), **overrides)

    def abstract_vae(self, cfg):
        from edit_r1_jax.models.qwen_image.params import vae_abstract_state

        return vae_abstract_state(cfg)

    def _load_vae(self, vae_dir, dtype, shardings):
        from edit_r1_jax.models.qwen_image.params import load_vae

        return load_vae(vae_dir, dtype=dtype, shardings=shardings)

    def latent_channels(self, vae_cfg) -> int:
        return int(vae_cfg.z_dim)

    def position_ids(self, grid, text_length, cfg=None):
        h, w = grid
        layer3d = bool(getattr(cfg, "use_layer3d_rope", False))
        return qi.position_ids([(1, h, w), (1, h, w)], int(text_length), layer3d=layer3d)

    def text_length(self, text_cfg) -> int:
        return int(config_field(text_cfg, "max_length", 256))

    def scheduler_config(self, model_dir) -> dict:
        return qi.read_scheduler_config(model_dir)

    def sigmas(self, scheduler_config, num_steps, image_tokens):
        return qi.sigmas(int(num_steps), int(image_tokens), scheduler_config)

    def conditioner(self, model_dir, text_cfg, *, dtype=jnp.float32, mesh=None, shared=None):
        from edit_r1_jax.models.qwen_image.text import QwenImagePromptEncoder

        kw = {} if shared is None else {"model": shared}
        enc = QwenImagePromptEncoder.from_pretrained(model_dir, max_length=self.text_length(text_cfg), dtype=dtype,
                                                     mesh=mesh, **kw)
        return QwenImageConditioner(enc)

    def conditioner_fingerprint(self, model_dir, text_cfg, compute_dtype="float32"):
        from edit_r1_jax.models.qwen_image.text import prompt_encoder_fingerprint

        return prompt_encoder_fingerprint(model_dir, self.text_length(text_cfg), compute_dtype)

    # -- planner (edit_r1_jax/plan.py)
    plan_transformer_name = "Qwen-Image MMDiT"
    plan_vae_name = "Qwen-Image VAE"
    plan_text_encoder_name = "text encoder Qwen2.5-VL-7B"
    plan_text_encoder_reward = "7b"  # the same Qwen2.5-VL-7B checkpoint as the default MLLM reward

    def plan_transformer_config(self, config):
        from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig

        overrides = dict(config.model.get("dit", {}) or {})
        return QwenImageConfig(**overrides, dtype=jnp.dtype(config.model.dtype),
                               param_dtype=jnp.dtype(config.model.param_dtype), lora=lora_config(config))

    def plan_vae_config(self, dtype="float32"):
        from edit_r1_jax.models.qwen_image.autoencoder import QwenImageVAEConfig

        return QwenImageVAEConfig(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))

    def plan_vae_top_width(self, vae_cfg) -> int:
        # the last up block runs at full resolution with base_dim * dim_mult[0] channels; the upsampler into it
        # holds its [R/2 + 1, R/2 + 1, 4 * width] phase output next to its [R, R, width] result (within 4 x width)
        return int(vae_cfg.base_dim * vae_cfg.dim_mult[0])

    def plan_text_encoders(self, dtype="bfloat16"):
        from flax import nnx

        from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VL, Qwen2_5_VLConfig

        dt = jnp.dtype(dtype)  # Qwen2_5_VLConfig defaults are the 7B sizes (the Qwen-Image-Edit text encoder)
        vlm = nnx.eval_shape(lambda: Qwen2_5_VL(Qwen2_5_VLConfig(dtype=dt, param_dtype=dt), rngs=nnx.Rngs(0)))
        return (vlm,)

    plan_sample_note = "x0, ref latents, prompt embeddings, mask"

    def plan_cond_extra_bytes(self, tcfg, tokens):
        return tokens["text"] * 4  # int32 text mask

    def plan_activations(self, tcfg):
        """Dual-stream blocks. Per stream the block runs the FLUX double block's sequence (modulated affine-free
        LayerNorm, q/k/v with q/k RMSNorm, RoPE, joint attention, output projection, gated residual, 4x tanh-GELU
        MLP); the text keys are masked. Per token, calibrated on the layer scan (plan.py's module docstring):
        ``none`` saves 2 float32 LayerNorm intermediates x 2 norms (8 units) + 6 compute-dtype embed-width tensors
        (e = 14), h = 14 heads/MLP-width units (the RMSNorm and GELU run under jax.checkpoint and keep their inputs
        only), 4 LoRA-A outputs, float32 logits + probabilities; under the remat policies the matmul outputs are
        those of FLUX's double block (4 D + 10 D/t + 4 r, +1 D/t attention output and float32 scores for
        ``dots_saveable``). Outside: ~5.4 [L, D] per sample (image in/out projections, the final norm in
        float32), 1.5 [T, 3584] units (the text input RMSNorm's input), the key mask over ``[H, L, L]`` (bool +
        float32, ``none`` only) and float32 copies of the timestep embedder (D^2 + 256 D)."""
        from edit_r1_jax.editors.base import PlanActivations, PlanBlocks

        d = tcfg.inner_dim
        dual = {"none": (14, 14, 4, "probs"), "dots_saveable": (4, 11, 4, "scores"),
                "dots_with_no_batch_dims_saveable": (4, 10, 4, None), "full": (1, 0, 0, None)}
        return PlanActivations(
            dim=d, heads=tcfg.num_attention_heads, rank=tcfg.lora.rank if tcfg.lora else 0,
            blocks=(PlanBlocks("dual", "transformer_blocks", tcfg.num_layers, dual),),
            outside=5.4, outside_text=1.5, text_width=tcfg.joint_attention_dim, outside_attn={"none": 5},
            once=(d * d + 256 * d) * 4)


FAMILY = QwenImageEdit()
