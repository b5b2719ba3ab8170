"""Qwen-Image-Edit-2509 prompt embeddings (``models/qwen_image/text.py``) against diffusers 0.42.1's own
``QwenImageEditPlusPipeline.encode_prompt`` on a tiny random Qwen2.5-VL text encoder with the real Qwen2.5
vocabulary, saved as a pipeline folder and converted with our ``qwen-image-edit`` CLI.

The reference is the pipeline's code path itself (template, image prompt, processor call, last hidden layer,
drop of 64 tokens, per-row split and zero padding), with two things supplied around it:
* its processor: transformers' ``Qwen2VLProcessor`` (its own ``__call__``) built from the saved tokenizer and
  the PIL image processor (``Qwen2VLImageProcessorPil``) with no video processor: the default image and video
  processors need torchvision (not installed), and a subclass skips only the class check of the absent video
  processor, whose lookup fails without torchvision;
* 3-D M-RoPE positions: the text encoder's forward is given ``mm_token_type_ids`` (1 at ``<|image_pad|>``),
  which the pipeline does not pass, so that transformers 5.24 builds the image tokens' 3-D positions as the
  released model was trained with (ENVIRONMENT.md); without it the pipeline's image tokens get 1-D positions.
The condition image the pipeline encodes is made with its own ``calculate_dimensions`` and ``image_processor``.

Tolerances: float32 end to end with the highest matmul precision; the two implementations sum in different
orders (fused qkv, attention masking), so hidden states of order 1 differ by ~1e-6: atol 2e-5 / rtol 1e-4 as
in test_qwen_parity.py. Batched vs one-at-a-time runs of our own code differ only by XLA's programs for
different padded shapes: atol 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_fixtures import randomize, tiny_hf_config
from qwen_image_tiny import build_pipeline, save_pipeline, tokenizer_dir

from edit_r1_jax.models.qwen_image import text as T
from devices import ROOT, env as device_env

ATOL, RTOL = 2e-5, 1e-4
PROMPTS = ["make the sky purple", "replace the red car in the lower left corner by a small wooden boat, keep the "
           "reflections on the water and the people on the pier"]


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from tools.convert_weights.__main__ import main as convert_main

    root = tmp_path_factory.mktemp("qwen_image_text")
    tok_dir = tokenizer_dir(tmp_path_factory)
    torch.manual_seed(0)
    te = randomize(Qwen2_5_VLForConditionalGeneration(tiny_hf_config(tie=True)).eval())
    pipe = build_pipeline(tok_dir, text_encoder=te)
    save_pipeline(pipe, root / "pipe")
    assert convert_main(["qwen-image-edit", "--src", str(root / "pipe"), "--dst", str(root / "out")]) == 0

    class NoVideoProcessor(Qwen2VLProcessor):
        # ProcessorMixin checks each part's class; the video processor's lookup needs torchvision. Only that
        # check is skipped (no video here): the processor's __call__ is transformers' own.
        def check_argument_for_proper_class(self, name, arg):
            if name == "video_processor" and arg is None:
                return None
            return super().check_argument_for_proper_class(name, arg)

    pipe.processor = NoVideoProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(root / "pipe" /
                                                                                                "processor"),
                                      tokenizer=pipe.tokenizer,  # the same files as processor/'s
                                      video_processor=None)
    forward, image_id = te.forward, te.config.image_token_id

    def forward_3d(*args, input_ids=None, **kw):
        return forward(*args, input_ids=input_ids, mm_token_type_ids=(input_ids == image_id).long(), **kw)

    te.forward = forward_3d
    enc = T.QwenImagePromptEncoder.from_pretrained(root / "out", max_length=256, batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (200, 300, 3), dtype=np.uint8),  # 3:2 -> a 480x320 condition image
              rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)]    # square, upscaled to 384x384
    return dict(pipe=pipe, enc=enc, images=images, out=root / "out")


def reference(pipe, image: np.ndarray, prompt: str) -> np.ndarray:
    """The pipeline's prompt embeddings [T, D] for one row, as its __call__ makes them."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (CONDITION_IMAGE_SIZE,
                                                                             calculate_dimensions)
    from PIL import Image

    img = Image.fromarray(image)
    w, h = calculate_dimensions(CONDITION_IMAGE_SIZE, img.size[0] / img.size[1])
    cond = pipe.image_processor.resize(img, h, w)
    emb, mask = pipe.encode_prompt(image=[cond], prompt=[prompt], device="cpu")
    assert mask is None or bool(mask.all())  # one row: no padding, the pipeline returns mask None
    return emb[0].float().numpy()


def test_constants_are_the_pipelines(setup):
    pipe = setup["pipe"]
    assert T.PROMPT_TEMPLATE == pipe.prompt_template_encode
    assert T.DROP_TOKENS == pipe.prompt_template_encode_start_idx
    # with the real Qwen2.5 vocabulary the 64 dropped tokens are exactly the system turn and "<|im_start|>user\n"
    prefix = T.PROMPT_TEMPLATE.split("{}")[0]
    assert len(setup["enc"].tokenizer.encode(prefix, add_special_tokens=False)) == 64


@pytest.mark.parametrize("hw", [(512, 512), (200, 300), (300, 200), (1080, 1920), (37, 1000), (640, 479)])
def test_condition_size_matches_calculate_dimensions(hw):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    h, w = hw
    cw, ch = calculate_dimensions(384 * 384, w / h)
    assert T.condition_size(h, w) == (ch, cw)


def test_pixels_match_the_processor(setup):
    """Our condition image + patches vs the pipeline's resize and transformers' PIL image processor."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
    from PIL import Image

    pipe, enc = setup["pipe"], setup["enc"]
    for image in setup["images"]:
        patches, grid = enc.condition_pixels(image)
        assert enc.prepare(image, "x")[1] == grid  # the grid planned from the size alone
        img = Image.fromarray(image)
        w, h = calculate_dimensions(384 * 384, img.size[0] / img.size[1])
        ref = pipe.processor.image_processor(images=[pipe.image_processor.resize(img, h, w)], return_tensors="np")
        assert [list(grid)] == ref["image_grid_thw"].tolist()
        # same PIL resizes and float32 arithmetic; only the normalisation's rounding order may differ
        np.testing.assert_allclose(patches, ref["pixel_values"], atol=1e-6, rtol=0)


def test_batch_matches_pipeline(setup):
    pipe, enc, images = setup["pipe"], setup["enc"], setup["images"]
    refs = [reference(pipe, im, p) for im, p in zip(images, PROMPTS)]
    setup["refs"] = refs
    lengths = [r.shape[0] for r in refs]
    assert lengths[0] != lengths[1] and max(lengths) < 256  # rows of different lengths, both padded
    out = enc(images, PROMPTS)
    setup["batch_out"] = out
    assert out["text"].shape == (2, 256, 32) and out["text"].dtype == np.float32
    assert out["mask"].dtype == np.int32
    for i, r in enumerate(refs):
        np.testing.assert_array_equal(out["mask"][i], (np.arange(256) < lengths[i]).astype(np.int32))
        np.testing.assert_allclose(out["text"][i, :lengths[i]], r, atol=ATOL, rtol=RTOL, err_msg=f"row {i}")
        assert not out["text"][i, lengths[i]:].any()  # zero padding, as the pipeline pads


def test_single_rows_and_micro_batches(setup):
    """One row alone, and three rows in micro-batches of 2 (a tqdm bar; the last batch repeats its row)."""
    pipe, enc, images = setup["pipe"], setup["enc"], setup["images"]
    out = setup.get("batch_out") or enc(images, PROMPTS)
    alone = enc(images[1:], PROMPTS[1:])
    np.testing.assert_array_equal(alone["mask"], out["mask"][1:])
    np.testing.assert_allclose(alone["text"], out["text"][1:], atol=1e-5, rtol=0)
    three = enc([images[1], images[0], images[1]], [PROMPTS[1], PROMPTS[0], PROMPTS[0]])
    np.testing.assert_array_equal(three["mask"][:2], out["mask"][::-1])
    np.testing.assert_allclose(three["text"][:2], out["text"][::-1], atol=1e-5, rtol=0)
    ref_last = reference(pipe, images[1], PROMPTS[0])
    assert three["mask"][2].sum() == len(ref_last)
    np.testing.assert_allclose(three["text"][2, :len(ref_last)], ref_last, atol=ATOL, rtol=RTOL)


def test_truncation_keeps_the_first_max_length_tokens(setup):
    pipe, images = setup["pipe"], setup["images"]
    enc = T.QwenImagePromptEncoder.from_pretrained(setup["out"], max_length=200)
    assert enc.fingerprint() != setup["enc"].fingerprint()  # max_length is part of the identity
    refs = setup.get("refs") or [reference(pipe, im, p) for im, p in zip(images, PROMPTS)]
    assert min(r.shape[0] for r in refs) > 200  # both rows are cut (196+ image tokens, then the text)
    out = enc(images, PROMPTS)
    assert out["text"].shape == (2, 200, 32) and out["mask"].all()
    for i, r in enumerate(refs):
        np.testing.assert_allclose(out["text"][i], r[:200], atol=ATOL, rtol=RTOL, err_msg=f"row {i}")


def test_fingerprint(setup, tmp_path):
    """Content, not place or time: the same files elsewhere give the same key; a changed tokenizer file, length
    or dtype another."""
    import shutil

    import jax.numpy as jnp

    out = setup["out"]
    fp = setup["enc"].fingerprint()
    assert len(fp) == 64
    te, proc = out / "text_encoder", out / "processor"
    assert T._fingerprint(te, proc, proc / "preprocessor_config.json", 256, jnp.float32) == fp
    assert T._fingerprint(te, proc, proc / "preprocessor_config.json", 256, jnp.bfloat16) != fp
    copy = shutil.copytree(proc, tmp_path / "processor")
    assert T._fingerprint(te, copy, copy / "preprocessor_config.json", 256, jnp.float32) == fp
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + " ")
    assert T._fingerprint(te, copy, copy / "preprocessor_config.json", 256, jnp.float32) != fp


def test_bad_inputs_name_the_row(setup):
    enc, (a, b) = setup["enc"], setup["images"]
    with pytest.raises(ValueError, match="row 1: empty prompt"):
        enc([a, b], ["ok", "  "])
    with pytest.raises(ValueError, match="row 0: image must be a uint8 HxWx3"):
        enc([a.astype(np.float32) / 255, b], PROMPTS)
    with pytest.raises(ValueError, match="row 1: image must be a uint8 HxWx3"):
        enc([a, b[..., 0]], PROMPTS)
    with pytest.raises(ValueError, match="row 1: image 1x1000 is too narrow"):
        enc([a, np.zeros((1, 1000, 3), np.uint8)], PROMPTS)
    with pytest.raises(ValueError, match="row 1: absolute aspect ratio must be smaller than 200"):
        enc([a, np.zeros((3, 1000, 3), np.uint8)], PROMPTS)  # a 32x7008 condition image: the processor refuses
    with pytest.raises(ValueError, match="row 0: image is empty"):
        enc([np.zeros((0, 10, 3), np.uint8)], PROMPTS[:1])
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        enc([a, b], PROMPTS[:1])


MESH_SCRIPT = r"""
import sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
from edit_r1_jax.models.qwen_image.text import QwenImagePromptEncoder
from edit_r1_jax.parallel.mesh import make_mesh

assert len(jax.devices()) == 8, jax.devices()
inp = np.load(sys.argv[1], allow_pickle=False)
enc = QwenImagePromptEncoder.from_pretrained(sys.argv[2], mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
q = enc.model.model.layers[0].self_attn.q_proj.kernel[...]
out = enc([inp["a"], inp["b"]], [str(p) for p in inp["prompts"]])
np.savez(sys.argv[3], text=out["text"], mask=out["mask"], q_shard=np.asarray(q.addressable_shards[0].data.shape),
         q_shape=np.asarray(q.shape))
"""


@pytest.mark.slow
def test_mesh_equals_single_device(setup, tmp_path):
    """The weights placed on a (data=2, fsdp=2, tensor=2) mesh of 8 host devices by their logical axes give the
    same embeddings (a subprocess: the device count is fixed before jax starts). Same float32 math with other
    reduction splits: atol 1e-5."""
    import subprocess
    import sys

    out = setup.get("batch_out") or setup["enc"](setup["images"], PROMPTS)
    np.savez(tmp_path / "in.npz", a=setup["images"][0], b=setup["images"][1], prompts=np.asarray(PROMPTS))
    env = device_env(8)
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "in.npz"), str(setup["out"]),
                           str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = np.load(tmp_path / "out.npz")
    # q_proj kernel [embed, heads]: embed over fsdp (2), heads over tensor (2): the weights really are sharded
    assert r["q_shard"].tolist() == [r["q_shape"][0] // 2, r["q_shape"][1] // 2]
    np.testing.assert_array_equal(r["mask"], out["mask"])
    np.testing.assert_allclose(r["text"], out["text"], atol=1e-5, rtol=0)
