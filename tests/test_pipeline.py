"""End to end: a tiny random diffusers FluxKontextPipeline, saved with save_pretrained, converted with ONE
``kontext`` call, edited by our KontextEditor and by diffusers with the same image, prompts and initial noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers import FluxKontextPipeline

from edit_r1_jax.diffusion import latents as L
from edit_r1_jax.pipeline import KontextEditor
from kontext_tiny import RESOLUTION, T5_LENGTH, save_and_convert



@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """No autograd in this module's reference calls (scoped: a global switch would leak into other tests)."""
    with torch.no_grad():
        yield

# Whole chain in float32 (text encoders, VAE encode, 4 DiT steps, VAE decode) with highest matmul precision:
# observed differences ~1e-6; 1e-4 on [0, 1] pixels (= 0.03 of one 8-bit level) still fails on any real bug.
ATOL_IMG = 1e-4
STEPS = 4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kontext")
    pipe, out = save_and_convert(tmp)
    return pipe, out


@pytest.fixture(scope="module")
def editor(converted):
    return KontextEditor.from_pretrained(converted[1], t5_length=T5_LENGTH)


def _inputs(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(batch, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    g = torch.Generator().manual_seed(seed)
    h = RESOLUTION // 8
    noise = torch.randn(batch, 16, h, h, generator=g)
    packed = FluxKontextPipeline._pack_latents(noise, batch, 16, h, h)
    return pixels, packed


def _diffusers(pipe, pixels, packed, **kw):
    images = [Image.fromarray(p) for p in pixels]
    out = pipe(image=images if len(images) > 1 else images[0], height=RESOLUTION, width=RESOLUTION,
               max_area=RESOLUTION ** 2, _auto_resize=False, num_inference_steps=STEPS, guidance_scale=2.5,
               latents=packed.clone(), max_sequence_length=T5_LENGTH, output_type="np", **kw)
    return out.images


def test_converted_directory_layout(converted):
    out = converted[1]
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert (out / sub / "params.safetensors").exists() and (out / sub / "config.json").exists(), sub
    assert (out / "text_encoder" / "tokenizer" / "tokenizer.json").exists()
    assert (out / "text_encoder_2" / "tokenizer" / "tokenizer.json").exists()
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["use_dynamic_shifting"] is True
    assert set(json.loads((out / "kontext.json").read_text())["components"]) >= {"transformer", "vae"}


def test_reference_latents_match_diffusers(converted, editor):
    pipe = converted[0]
    pixels, _ = _inputs(2)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    ref = pipe._encode_vae_image(x, generator=None)
    ref = FluxKontextPipeline._pack_latents(ref, 2, 16, ref.shape[2], ref.shape[3]).numpy()
    from edit_r1_jax.data.images import to_model_range

    ours = np.asarray(editor.encode_reference(to_model_range(pixels)))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)  # one VAE encoder pass: summation-order noise


def test_edit_matches_diffusers_with_text(converted, editor):
    pipe = converted[0]
    prompts = ["make the sky red", "turn the cat into a dog"]
    pixels, packed = _inputs(2)
    ref = _diffusers(pipe, pixels, packed, prompt=prompts)
    ours = editor.edit(pixels, prompts, num_steps=STEPS, guidance=2.5, noise=packed.numpy())
    assert ours.shape == ref.shape == (2, RESOLUTION, RESOLUTION, 3)
    np.testing.assert_allclose(ours, ref, atol=ATOL_IMG, rtol=0)
    # the output depends on the prompt (so the text path is live) and differs from the input
    assert np.abs(ours[0] - ours[1]).max() > 1e-3
    # the per-step (CLI) loop equals the scan
    loop = editor.edit(pixels, prompts, num_steps=STEPS, guidance=2.5, noise=packed.numpy(), scan=False)
    np.testing.assert_allclose(loop, ours, atol=1e-5, rtol=0)


def test_edit_matches_diffusers_with_prompt_embeds(converted, editor):
    pipe = converted[0]
    pixels, packed = _inputs(1, seed=3)
    rng = np.random.default_rng(5)
    embeds = rng.standard_normal((1, T5_LENGTH, 32)).astype(np.float32)
    pooled = rng.standard_normal((1, 16)).astype(np.float32)
    ref = _diffusers(pipe, pixels, packed, prompt_embeds=torch.from_numpy(embeds),
                     pooled_prompt_embeds=torch.from_numpy(pooled))
    ours = editor.edit(pixels, prompt_embeds=embeds, pooled=pooled, num_steps=STEPS, guidance=2.5,
                       noise=packed.numpy())
    np.testing.assert_allclose(ours, ref, atol=ATOL_IMG, rtol=0)
    # other guidance -> other image (guidance embedding is live)
    other = editor.edit(pixels, prompt_embeds=embeds, pooled=pooled, num_steps=STEPS, guidance=5.0,
                        noise=packed.numpy())
    assert np.abs(other - ours).max() > 1e-4


def test_noise_and_ids_shapes(editor):
    h, w = editor.token_grid(RESOLUTION)
    assert (h, w) == (4, 4)
    n = editor.make_noise(3, h, w, seed=1)
    assert n.shape == (3, 16, 64) and abs(float(n.std()) - 1) < 0.2
    assert L.kontext_ids(h, w).shape == (32, 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        editor.token_grid(72)


def test_lora_file_matches_diffusers(converted, tmp_path):
    """A PEFT/diffusers LoRA file (as our exporter writes it) applied by us and by diffusers' load_lora_weights."""
    from edit_r1_jax.models.flux.params import lora_to_peft, peft_metadata
    from edit_r1_jax.pipeline import load_lora_file
    from edit_r1_jax.weights import save_tensors

    pipe, out = converted
    rng = np.random.default_rng(7)
    rank, alpha = 4, 8.0
    flat = {}
    for mod, (i, o) in {"transformer_blocks.0.attn.to_q": (32, 32), "transformer_blocks.0.attn.to_out.0": (32, 32),
                        "single_transformer_blocks.0.attn.to_k": (32, 32)}.items():
        flat[f"{mod}.lora_a"] = (rng.standard_normal((i, rank)) * 0.3).astype(np.float32)
        flat[f"{mod}.lora_b"] = (rng.standard_normal((rank, o)) * 0.3).astype(np.float32)
    f = tmp_path / "lora.safetensors"
    save_tensors(f, lora_to_peft(flat), metadata=peft_metadata(rank, alpha, ["to_q", "to_out.0", "to_k"]))
    loaded, cfg = load_lora_file(f)
    assert cfg.rank == rank and cfg.scale == alpha / rank and set(loaded) == set(flat)

    pixels, packed = _inputs(1, seed=11)
    embeds = rng.standard_normal((1, T5_LENGTH, 32)).astype(np.float32)
    pooled = rng.standard_normal((1, 16)).astype(np.float32)
    ed = KontextEditor.from_pretrained(out, lora=f, load_text_encoders=False)
    ours = ed.edit(pixels, prompt_embeds=embeds, pooled=pooled, num_steps=STEPS, noise=packed.numpy())
    base = _diffusers(pipe, pixels, packed, prompt_embeds=torch.from_numpy(embeds),
                      pooled_prompt_embeds=torch.from_numpy(pooled))
    pipe.load_lora_weights(str(f), adapter_name="t")
    try:
        ref = _diffusers(pipe, pixels, packed, prompt_embeds=torch.from_numpy(embeds),
                         pooled_prompt_embeds=torch.from_numpy(pooled))
    finally:
        pipe.unload_lora_weights()
    assert np.abs(ref - base).max() > 1e-3  # the LoRA changes the image...
    np.testing.assert_allclose(ours, ref, atol=ATOL_IMG, rtol=0)  # ...and we apply it the same way
