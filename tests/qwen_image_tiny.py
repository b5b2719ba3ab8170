"""A tiny random diffusers ``QwenImageEditPlusPipeline`` (transformer, VAE, Qwen2.5-VL text encoder with the real
Qwen2.5 tokenizer, the published scheduler config), saved in its real on-disk layout and converted with ONE
``qwen-image-edit`` call. Shared by test_qwen_image_schedule.py (the converter) and test_qwen_image_edit.py (the
edit end to end) and meant for the prompt-encoder tests.

Sizes are as small as the architectures allow while staying honest:
* the transformer's ``joint_attention_dim`` is the text encoder's hidden size, so the real encoder's last hidden
  states can feed it (one block, 2 heads of 16, RoPE axes 4+6+6 = 16);
* the VAE has 4 levels (factor 8, the real layout), one res block per level, no attention in the levels
  (``attn_scales=[]``: diffusers 0.42.1 cannot encode with one; the mid block's attention is always there);
* ``RESOLUTION`` 64 -> 8x8 latents -> 4x4 = 16 generated + 16 reference tokens; it is a multiple of 32 so that
  diffusers' ``calculate_dimensions`` (rounds to 32) keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

RESOLUTION = 64
Z_DIM = 4  # latent channels; packed tokens carry 4 * Z_DIM = 16 features
LATENTS_MEAN = [0.1, 0.2, 0.3, 0.4]
LATENTS_STD = [1.0, 2.0, 3.0, 4.0]

# The published Qwen-Image-Edit-2509 scheduler/scheduler_config.json (values as on the hub).
PUBLISHED_SCHEDULER = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}

TRANSFORMER = dict(patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=1, attention_head_dim=16,
                   num_attention_heads=2, axes_dims_rope=(4, 6, 6))  # + joint_attention_dim from the text encoder
VAE = dict(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
           latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)


def tokenizer_dir(tmp_path_factory) -> Path:
    """The real Qwen2.5 tokenizer, built once per test session (see qwen_fixtures.qwen_tokenizer_dir)."""
    from qwen_fixtures import qwen_tokenizer_dir

    return qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")


def build_pipeline(tok_dir: Path, seed: int = 0, text_encoder=None):
    """The tiny pipeline in eval mode. Parameters initialised to exactly 1 (norm scales) or 0 (biases) are moved off
    those values (a parity test must see them), the transformer's linear weights are rescaled (below); the rest
    keeps diffusers' / transformers' own initialisation. ``text_encoder``: a given Qwen2_5_VLForConditionalGeneration
    (used as is) instead of a fresh one."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from qwen_fixtures import tiny_hf_config

    torch.manual_seed(seed)
    given = text_encoder is not None
    if not given:
        text_encoder = Qwen2_5_VLForConditionalGeneration(tiny_hf_config()).eval()
    transformer = QwenImageTransformer2DModel(
        **TRANSFORMER, joint_attention_dim=text_encoder.config.text_config.hidden_size).eval()
    vae = AutoencoderKLQwenImage(**VAE).eval()
    with torch.no_grad():
        # Linear weights N(0, 4 / fan_in): torch's default (uniform, variance 1 / (3 fan_in)) shrinks the signal in
        # every layer, and then text and reference move a 3-step edit's pixels by only ~1e-2 / ~5e-4; gain 2 makes
        # them ~0.25 / ~0.04 (measured), so a conditioning bug cannot hide under the test tolerance.
        for p in transformer.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) * 2.0 / p.shape[1] ** 0.5)
        for p in [*transformer.parameters(), *vae.parameters(), *([] if given else text_encoder.parameters())]:
            if torch.all(p == 1):  # norm scales (RMSNorm weights, the VAE's gamma)
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif not torch.any(p):  # zero-initialised biases
                p.copy_(0.05 * torch.randn_like(p))
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(PUBLISHED_SCHEDULER),
                                     vae=vae, text_encoder=text_encoder,
                                     tokenizer=AutoTokenizer.from_pretrained(tok_dir), processor=None,
                                     transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, src: Path) -> Path:
    """``save_pretrained`` plus the processor folder. Qwen2VLProcessor needs torchvision to be built, so its folder
    is written by parts (tokenizer + image processor) and model_index.json names it as the hub's does."""
    from transformers import Qwen2VLImageProcessor

    pipe.save_pretrained(src)
    (src / "processor").mkdir()
    pipe.tokenizer.save_pretrained(src / "processor")
    Qwen2VLImageProcessor().save_pretrained(src / "processor")
    index = json.loads((src / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (src / "model_index.json").write_text(json.dumps(index))
    return src


def save_and_convert(tmp: Path, tok_dir: Path, seed: int = 0):
    """``(pipe, pipeline_dir, converted_dir)``: the pipeline saved under ``tmp/pipe``, converted to ``tmp/out``."""
    from tools.convert_weights.__main__ import main as convert_main

    pipe = build_pipeline(tok_dir, seed)
    src = save_pipeline(pipe, Path(tmp) / "pipe")
    dst = Path(tmp) / "out"
    assert convert_main(["qwen-image-edit", "--src", str(src), "--dst", str(dst)]) == 0
    return pipe, src, dst
