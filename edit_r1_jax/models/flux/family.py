"""FLUX.1-Kontext (spec A): FLUX DiT over [noisy; reference] tokens, FLUX AutoencoderKL, T5 + CLIP text.

Converted folder (``python -m tools.convert_weights kontext``): transformer/, vae/, text_encoder/ (CLIP-L),
text_encoder_2/ (T5), scheduler/scheduler_config.json. ``cond``: ref [B, Nr, 64], text [B, T5, 4096] (T5 hidden
states), pooled [B, 768] (CLIP pooled). Position ids: generated tokens on index 0, reference on index 1, text 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from edit_r1_jax.diffusion import latents, schedule
from edit_r1_jax.editors.base import Conditioner, Family, config_field, lora_config


class ScheduleConfig(dict):
    """The scheduler fields the sigma schedule needs (defaults: FLUX's scheduler_config.json)."""

    DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)

    def __init__(self, d: dict | None = None):
        super().__init__(self.DEFAULTS)
        if d:
            self.update({k: d[k] for k in self.DEFAULTS if k in d and d[k] is not None})
            if d.get("use_dynamic_shifting") is False:
                raise ValueError("scheduler config has use_dynamic_shifting=false; FLUX uses the dynamic shift")
            if d.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(f"unsupported time_shift_type {d.get('time_shift_type')!r}")

    def sigmas(self, num_steps: int, image_seq_len: int) -> np.ndarray:
        return schedule.sigmas(num_steps, image_seq_len, self["base_image_seq_len"], self["max_image_seq_len"],
                               self["base_shift"], self["max_shift"])


class KontextConditioner(Conditioner):
    """T5 hidden states + CLIP pooled embedding of the instruction (the image plays no part)."""

    names = ("text", "pooled")
    uses_image = False

    def __init__(self, encoders, model_dir, t5_length: int, clip_length: int, compute_dtype: str = "float32"):
        self.encoders, self.model_dir = encoders, Path(model_dir)
        self.t5_length, self.clip_length, self.compute_dtype = int(t5_length), int(clip_length), compute_dtype

    def fingerprint(self) -> str:
        from edit_r1_jax.embed_text import encoder_fingerprint

        return encoder_fingerprint(self.model_dir, self.t5_length, self.clip_length, self.compute_dtype)

    def settings(self):
        return {"t5_length": self.t5_length, "clip_length": self.clip_length, "compute_dtype": self.compute_dtype}

    def __call__(self, prompts, images=None):
        e, p = self.encoders.encode(list(prompts))
        return {"text": np.asarray(e, np.float32), "pooled": np.asarray(p, np.float32)}


class Kontext(Family):
    name = "kontext"
    convert_hint = "python -m tools.convert_weights kontext --src PIPELINE_DIR --dst DIR"
    cond_names = KontextConditioner.names

    def detect(self, model_dir: Path) -> bool:
        """A FLUX transformer config, or the T5 encoder (only this family has one; a text-cache-only folder)."""
        f = Path(model_dir) / "transformer" / "config.json"
        if f.exists():
            return "num_single_layers" in json.loads(f.read_text())
        return (Path(model_dir) / "text_encoder_2" / "config.json").exists()

    def check_dir(self, model_dir, what="--model", *, text_encoders=True):
        from edit_r1_jax.folders import check_kontext_dir

        return check_kontext_dir(model_dir, what, text_encoders=text_encoders)

    def transformer_config(self, model_dir, **overrides):
        from edit_r1_jax.models.flux.modeling import FluxConfig
        from edit_r1_jax.weights import read_config

        return FluxConfig.from_diffusers(read_config(Path(model_dir) / "transformer"), **overrides)

    def load_transformer(self, model_dir, *, mesh=None, seed=0, **overrides):
        from edit_r1_jax.models.flux import params

        return params.load_transformer(Path(model_dir) / "transformer", mesh=mesh, seed=seed, **overrides)

    def abstract_transformer(self, cfg):
        from flax import nnx

        from edit_r1_jax.models.flux.modeling import FluxTransformer

        return nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))

    @staticmethod
    def velocity(model, z, sigma, cond, img_ids, txt_ids, guidance):
        from edit_r1_jax.models.flux.modeling import kontext_velocity

        return kontext_velocity(model, z, cond["ref"], cond["text"], cond["pooled"], sigma, img_ids, txt_ids,
                                guidance)

    def vae_config(self, model_dir, **overrides):
        from edit_r1_jax.models.flux import autoencoder_params
        from edit_r1_jax.weights import read_config

        return autoencoder_params.config_from_dict(read_config(Path(model_dir) / "vae"), **overrides)

    def abstract_vae(self, cfg):
        from edit_r1_jax.models.flux import autoencoder_params

        return autoencoder_params.abstract_state(cfg)

    def _load_vae(self, vae_dir, dtype, shardings):
        from edit_r1_jax.models.flux.autoencoder_params import load_vae

        return load_vae(vae_dir, dtype=dtype, shardings=shardings)

    def latent_channels(self, vae_cfg) -> int:
        return int(vae_cfg.latent_channels)

    def position_ids(self, grid, text_length, cfg=None):
        return latents.kontext_ids(*grid), latents.text_ids(int(text_length))

    def text_length(self, text_cfg) -> int:
        return int(config_field(text_cfg, "t5_length", 128))

    def scheduler_config(self, model_dir) -> dict:
        f = Path(model_dir) / "scheduler" / "scheduler_config.json"
        return ScheduleConfig(json.loads(f.read_text()) if f.exists() else None)

    def sigmas(self, scheduler_config, num_steps, image_tokens):
        return ScheduleConfig(dict(scheduler_config)).sigmas(int(num_steps), int(image_tokens))

    def guidance(self, cfg, value):
        return None if value is None or not cfg.guidance_embeds else float(value)

    def conditioner(self, model_dir, text_cfg, *, dtype=jnp.float32, mesh=None, shared=None):
        from edit_r1_jax.models.text.encoders import TextEncoders

        del mesh, shared  # T5-XXL + CLIP run on the default device (see the README's known limits)
        t5, clip = self.text_length(text_cfg), int(config_field(text_cfg, "clip_length", 77))
        enc = TextEncoders.from_pretrained(model_dir, t5_length=t5, clip_length=clip, dtype=dtype)
        return KontextConditioner(enc, model_dir, t5, clip, jnp.dtype(dtype).name)

    def conditioner_fingerprint(self, model_dir, text_cfg, compute_dtype="float32"):
        from edit_r1_jax.embed_text import encoder_fingerprint

        clip = int(config_field(text_cfg, "clip_length", 77))
        return encoder_fingerprint(model_dir, self.text_length(text_cfg), clip, compute_dtype)

    # -- planner (edit_r1_jax/plan.py)
    plan_transformer_name = "FLUX.1 transformer"
    plan_vae_name = "FLUX AutoencoderKL"
    plan_text_encoder_name = "text encoders T5-XXL + CLIP-L"

    def plan_transformer_config(self, config):
        from edit_r1_jax.models.flux.modeling import FluxConfig

        overrides = dict(config.model.get("dit", {}) or {})
        return FluxConfig(**overrides, dtype=jnp.dtype(config.model.dtype),
                          param_dtype=jnp.dtype(config.model.param_dtype), lora=lora_config(config))

    def plan_vae_config(self, dtype="float32"):
        from edit_r1_jax.models.flux.autoencoder import AutoencoderKLConfig

        return AutoencoderKLConfig(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))

    def plan_vae_top_width(self, vae_cfg) -> int:
        return int(vae_cfg.block_out_channels[0])

    def plan_text_encoders(self, dtype="bfloat16"):
        from flax import nnx

        from edit_r1_jax.models.text.clip import CLIPTextConfig, CLIPTextModel
        from edit_r1_jax.models.text.t5 import T5Config, T5EncoderModel

        dt = jnp.dtype(dtype)  # default configs = the FLUX encoders (T5-XXL encoder, CLIP-L text tower)
        t5 = nnx.eval_shape(lambda: T5EncoderModel(T5Config(dtype=dt, param_dtype=dt), rngs=nnx.Rngs(0)))
        clip = nnx.eval_shape(lambda: CLIPTextModel(CLIPTextConfig(dtype=dt, param_dtype=dt), rngs=nnx.Rngs(0)))
        return t5, clip

    plan_sample_note = "x0, ref latents, T5, pooled"

    def plan_cond_extra_bytes(self, tcfg, tokens):
        return tcfg.pooled_projection_dim * 4  # float32 CLIP pooled embedding

    def plan_activations(self, tcfg):
        """FLUX double and single blocks (derivation and calibration: plan.py's module docstring)."""
        from edit_r1_jax.editors.base import PlanActivations, PlanBlocks

        d = tcfg.inner_dim
        double = {"none": (18, 18, 0, "probs"), "dots_saveable": (4, 11, 4, "scores"),
                  "dots_with_no_batch_dims_saveable": (4, 10, 4, None), "full": (1, 0, 0, None)}
        single = {"none": (8, 21, 0, "probs"), "dots_saveable": (2, 11, 3, "scores"),
                  "dots_with_no_batch_dims_saveable": (2, 10, 3, None), "full": (1, 0, 0, None)}
        return PlanActivations(
            dim=d, heads=tcfg.num_attention_heads, rank=tcfg.lora.rank if tcfg.lora else 0,
            blocks=(PlanBlocks("double", "transformer_blocks", tcfg.num_layers, double),
                    PlanBlocks("single", "single_transformer_blocks", tcfg.num_single_layers, single)),
            outside=6,  # final norm in float32, embedders
            once=(3 * d * d + 1280 * d) * 4)  # float32 timestep/guidance/text embedder weights


FAMILY = Kontext()
