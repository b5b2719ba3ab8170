"""End to end: a tiny random diffusers QwenImageEditPlusPipeline, saved in its real layout and converted with ONE
``qwen-image-edit`` call, edited by our generic ``Editor`` and by diffusers with the same source image, prompt
embeddings + mask, initial latents and Euler steps (no CFG: ``true_cfg_scale=1``, no negative prompt), without
and with a LoRA file written by our ``export-lora``.

Prompt embeddings are precomputed (random; the Qwen2.5-VL prompt encoder is tested on its own), given to us as
``cond={"text", "mask"}`` and to diffusers as ``prompt_embeds`` / ``prompt_embeds_mask``. Batch 2 with rows of
different real lengths and garbage in the padding; diffusers' pipeline takes batch 1 only, so it runs row by row.

Reference resolution: the pipeline resizes the VAE's reference image to an area of its module constant
``VAE_IMAGE_SIZE`` (1024^2); the paper's run (spec G: "VAE image area 512^2") and our Editor encode the source at
the training resolution. The tests set that constant to ``RESOLUTION**2`` (monkeypatch, undone after each test),
which is exactly the paper's setting at this size; everything else runs the pipeline's own code.

Tolerances (float32, highest matmul precision; measured on this CPU in brackets):
* reference latents: ATOL_LATENT = 1e-5 (one VAE encoder pass, summation-order noise) [1.9e-7 on values ~0.3];
* images: ATOL_IMG = 1e-4 on [0, 1] pixels, 0.03 of one 8-bit level, through VAE encode, STEPS DiT steps and VAE
  decode [5.1e-6; with the LoRA 9.0e-6]: float32 summation order in the high-gain random DiT, plus the sinusoidal
  timestep features, whose float32 frequencies differ from torch's by an ulp (tests/test_qwen_image_transformer.py,
  up to 3e-5 relative per call). A layout, position or masking bug gives ~6e-2 here (checked by breaking the
  reference's RoPE frame and by dropping the text mask);
* scan vs per-step loop, and other values in the masked padding: ATOL_LOOP = 1e-5 [both 0.0: the same ops, but
  compiled as one scan or one step at a time XLA may fuse differently].
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers import QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as diffusers_edit_plus

from edit_r1_jax import weights
from edit_r1_jax.data.images import to_model_range
from edit_r1_jax.pipeline import Editor
from qwen_image_tiny import RESOLUTION, Z_DIM, save_and_convert, tokenizer_dir
from tools.convert_weights.__main__ import main as convert_main

ATOL_LATENT = 1e-5
ATOL_IMG = 1e-4
ATOL_LOOP = 1e-5
STEPS = 3
TEXT_LEN, LENGTHS = 8, (8, 5)  # row 0 all real (diffusers then drops the mask), row 1 padded after 5 tokens
H_LAT = RESOLUTION // 8  # latent side; packed tokens (H_LAT/2)^2


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True)
def _vae_image_at_training_resolution(monkeypatch):
    """The pipeline's reference-image area = the training resolution's (spec G), see the module docstring."""
    monkeypatch.setattr(diffusers_edit_plus, "VAE_IMAGE_SIZE", RESOLUTION ** 2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return save_and_convert(tmp_path_factory.mktemp("qedit"), tokenizer_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def editor(converted):
    return Editor.from_pretrained(converted[2], load_text_encoders=False)


def _inputs(pipe, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(2, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    dim = pipe.transformer.config.joint_attention_dim
    embeds = rng.standard_normal((2, TEXT_LEN, dim)).astype(np.float32)
    mask = (np.arange(TEXT_LEN)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    embeds[mask == 0] = 100.0  # padding must not matter: a leak would show at once
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, Z_DIM, 1, H_LAT, H_LAT, generator=g)  # the pipeline's randn shape [B, C, F, H, W]
    packed = QwenImageEditPlusPipeline._pack_latents(noise, 2, Z_DIM, H_LAT, H_LAT)
    return pixels, embeds, mask, packed


def _diffusers(pipe, pixels, embeds, mask, packed):
    """The pipeline row by row (it takes batch 1), stacked."""
    return np.concatenate([
        pipe(image=Image.fromarray(pixels[i]), prompt_embeds=torch.from_numpy(embeds[i:i + 1]),
             prompt_embeds_mask=torch.from_numpy(mask[i:i + 1]), true_cfg_scale=1.0, height=RESOLUTION,
             width=RESOLUTION, num_inference_steps=STEPS, latents=packed[i:i + 1].clone(), output_type="np").images
        for i in range(len(pixels))])


def _ours(ed, pixels, embeds, mask, packed, **kw):
    return ed.edit(pixels, cond={"text": embeds, "mask": mask}, noise=packed.numpy(), num_steps=STEPS, **kw)


def test_reference_latents_match_diffusers(converted, editor):
    pipe = converted[0]
    pixels, *_ = _inputs(pipe)
    # the pipeline's own preprocessing (resize to the VAE image size, here a no-op, and [0,1] -> [-1,1])
    x = torch.cat([pipe.image_processor.preprocess(Image.fromarray(p), RESOLUTION, RESOLUTION) for p in pixels])
    ours_x = to_model_range(pixels)
    np.testing.assert_allclose(ours_x, x.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)  # [0.0]
    lat = pipe._encode_vae_image(x[:, :, None], generator=None)  # [B, C, 1, h, w], normalised by mean/std
    ref = pipe._pack_latents(lat, 2, Z_DIM, H_LAT, H_LAT).numpy()
    ours = np.asarray(editor.encode_reference(ours_x))
    assert ours.shape == ref.shape == (2, (H_LAT // 2) ** 2, 4 * Z_DIM)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_LATENT)
    assert np.abs(ref[0] - ref[1]).max() > 1e-2  # the latents depend on the image


def test_edit_matches_diffusers(converted, editor, monkeypatch):
    pipe = converted[0]
    pixels, embeds, mask, packed = _inputs(pipe)
    # record the reference latents the pipeline hands its transformer (its own prepare_latents runs unchanged)
    spy, prepare = [], pipe.prepare_latents

    def recording(*a, **kw):
        latents, image_latents = prepare(*a, **kw)
        spy.append(image_latents.numpy())
        return latents, image_latents

    monkeypatch.setattr(pipe, "prepare_latents", recording)
    ref = _diffusers(pipe, pixels, embeds, mask, packed)
    ours = _ours(editor, pixels, embeds, mask, packed)
    assert ours.shape == ref.shape == (2, RESOLUTION, RESOLUTION, 3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_IMG)
    # what the pipeline fed its transformer as reference tokens is what we encode (the constant took effect)
    np.testing.assert_allclose(np.concatenate(spy), np.asarray(editor.encode_reference(to_model_range(pixels))),
                               rtol=0, atol=ATOL_LATENT)
    # not a saturated or constant picture, and each row's text and reference matter
    assert 0.05 < ours.std() and np.mean((ours > 0) & (ours < 1)) > 0.5
    swapped = _ours(editor, pixels, embeds[::-1].copy(), mask[::-1].copy(), packed)
    assert np.abs(swapped - ours).max() > 1e-2
    other_src = _ours(editor, pixels[::-1].copy(), embeds, mask, packed)
    assert np.abs(other_src - ours).max() > 1e-2
    # the mask is honoured: other values in row 1's padding change nothing
    garbage = embeds.copy()
    garbage[mask == 0] = -7.0
    np.testing.assert_allclose(_ours(editor, pixels, garbage, mask, packed), ours, rtol=0, atol=ATOL_LOOP)
    # the per-step (CLI) loop equals the scan
    steps = []
    loop = _ours(editor, pixels, embeds, mask, packed, scan=False, callback=steps.append)
    assert steps == list(range(STEPS))
    np.testing.assert_allclose(loop, ours, rtol=0, atol=ATOL_LOOP)


def test_lora_file_matches_diffusers(converted, editor, tmp_path):
    """A random LoRA in our trainer's checkpoint layout, exported by ``export-lora`` (PEFT/diffusers layout), applied
    by our Editor(lora=FILE) and by the pipeline's load_lora_weights: the same edited images."""
    import jax

    from edit_r1_jax.models.lora import LoRAConfig, lora_to_flat
    from edit_r1_jax.models.qwen_image import params

    pipe, _, dst = converted
    rank, alpha = 4, 12.0  # scale 3: a wrong scale cannot hide
    _, _, _, lora = params.load_transformer(dst / "transformer", lora=LoRAConfig(rank=rank, alpha=alpha), seed=7)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    lora = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    weights.save_tensors(ckpt / "lora.safetensors", lora_to_flat(lora))
    (ckpt / "config.json").write_text(json.dumps({"lora": {"rank": rank, "alpha": alpha}}))
    exported = tmp_path / "export" / "pytorch_lora_weights.safetensors"
    assert convert_main(["export-lora", "--src", str(ckpt), "--dst", str(exported)]) == 0

    pixels, embeds, mask, packed = _inputs(pipe, seed=4)
    ours = _ours(Editor.from_pretrained(dst, lora=exported, load_text_encoders=False), pixels, embeds, mask, packed)
    base = _ours(editor, pixels, embeds, mask, packed)
    pipe.load_lora_weights(str(exported.parent), weight_name=exported.name, adapter_name="nft")
    try:
        assert pipe.transformer.peft_config["nft"].lora_alpha == alpha
        ref = _diffusers(pipe, pixels, embeds, mask, packed)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(ours - base).max() > 1e-2  # the LoRA changes the image...
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL_IMG)  # ...and both apply it the same way


def test_edit_cli_on_a_qwen_folder(converted, tmp_path):
    """``python -m edit_r1_jax.edit --model QWEN_DIR`` detects the family, encodes the instruction with the
    Qwen2.5-VL prompt encoder seeing the (cropped) source, and writes what the Editor computes from the encoder's
    own embeddings of that source: the CLI's wiring, on top of the encoder and edit parity tested above and in
    test_qwen_image_text.py."""
    from edit_r1_jax import edit as edit_cli
    from edit_r1_jax.data.images import load_image
    from edit_r1_jax.models.qwen_image.text import QwenImagePromptEncoder

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (80, 96, 3), np.uint8)).save(tmp_path / "in.png")  # cropped to a square
    out = tmp_path / "out.png"
    rc = edit_cli.main(["--model", str(converted[2]), "--image", str(tmp_path / "in.png"), "--instruction",
                        "make the sky red", "--out", str(out), "--steps", "2", "--resolution", str(RESOLUTION),
                        "--no-progress"])
    assert rc == 0
    got = np.asarray(Image.open(out))
    pixels = load_image(tmp_path / "in.png", RESOLUTION)
    cond = QwenImagePromptEncoder.from_pretrained(converted[2])([pixels], ["make the sky red"])
    ed = Editor.from_pretrained(converted[2], load_text_encoders=False)
    want = ed.edit(pixels[None], cond=cond, num_steps=2, seed=0)[0]
    want = np.rint(np.clip(want, 0, 1) * 255).astype(np.uint8)
    assert got.shape == (RESOLUTION, RESOLUTION, 3) and got.std() > 1.0
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # the same computation; uint8 rounding at most
