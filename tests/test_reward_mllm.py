"""MLLMReward on a tiny random Qwen2.5-VL with the real Qwen2.5 vocabulary: equals the reference formula on
transformers' logits, batch independent, left/right padding agree, loud failures.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen_fixtures import CHAT_TEMPLATE, JUDGE_TEXT, convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

from edit_r1_jax.models.qwen2_5_vl import processor as P
from edit_r1_jax.rewards.mllm import MLLMReward, RewardError, expected_score



@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """No autograd in this module's reference calls (scoped: a global switch would leak into other tests)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_reward")
    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")
    ref = save_tiny_checkpoint(root / "hf", tok, seed=1)
    convert_cli(root / "hf", root / "jax")
    reward = MLLMReward(root / "jax", dtype=jnp.float32, pad_to_multiple=64)
    return ref, reward, root


# Every test uses sources of 60x90 (resized to 56x84) and edited images of 56x56 and batches of 1 or 2, so the
# module-level jit cache of the reward is shared between tests (compilation dominates the run time).
def _batch(seed, n):
    return _images(seed, n, 60, 90), _images(seed + 100, n, 56, 56)


def _images(seed, n, h, w):
    return np.random.default_rng(seed).random((n, h, w, 3)).astype(np.float32)


def _reference_scores(ref, tokenizer, sources, edited, instructions, requirements):
    """The reference server's computation with transformers: PIL image processor, chat template, expansion of
    <|image_pad|>, forward, logits of the first generated token at ids of "0".."5"."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil()
    tokenizer.chat_template = CHAT_TEMPLATE
    digit_ids = [tokenizer.convert_tokens_to_ids(str(k)) for k in range(6)]
    assert digit_ids == [15, 16, 17, 18, 19, 20]
    out = []
    for s, e, ins, req in zip(sources, edited, instructions, requirements):
        im = proc(images=[P.to_uint8(s), P.to_uint8(e)], return_tensors="pt")
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": JUDGE_TEXT.format(prompt=ins,
                                                                                        requirement=req)}]}]
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        for g in im["image_grid_thw"].tolist():
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (g[0] * g[1] * g[2] // 4), 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        logits = ref(input_ids=ids, pixel_values=im["pixel_values"], image_grid_thw=im["image_grid_thw"],
                     mm_token_type_ids=(ids == 151655).long()).logits[0, -1]
        out.append(logits[digit_ids].numpy())
    return np.asarray(expected_score(np.stack(out))[0])


def test_reward_equals_formula_on_transformers_logits(setup):
    ref, reward, _ = setup
    sources, edited = _batch(0, 2)
    instructions = ["make it red", "remove the cat from the sofa"]
    requirements = ["only the car", ""]
    scores, dist = reward.score(sources, edited, instructions, requirements)
    want = _reference_scores(ref, reward.tokenizer, sources, edited, instructions, requirements)
    assert scores.dtype == np.float32 and scores.shape == (2,) and dist.shape == (2, 6)
    np.testing.assert_allclose(dist.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(scores, (dist * np.arange(6)).sum(-1) / 5, atol=1e-6)
    # float32 end to end on a 2-layer model: 1e-5 on a score in [0, 1].
    np.testing.assert_allclose(scores, want, atol=1e-5)
    assert np.ptp(dist, axis=-1).min() > 1e-4  # the random model does not give a flat distribution


def test_batch_independence_and_padding_sides(setup):
    _, reward, root = setup
    sources, edited = _batch(2, 2)
    instructions = ["a", "replace the blue umbrella with a bright red one and add rain"]
    requirements = ["", "the person stays"]
    batch = reward(sources, edited, instructions, requirements)
    # The shortest prompt alone (no padding) vs inside the batch (left padded). Padding only adds exactly-zero
    # attention weights: agreement to float32 rounding.
    alone = reward(sources[:1], edited[:1], instructions[:1], requirements[:1])
    np.testing.assert_allclose(batch[:1], alone, atol=1e-6)
    right = MLLMReward(root / "jax", dtype=jnp.float32, padding_side="right", pad_to_multiple=64,
                       model=reward.model)
    np.testing.assert_allclose(right(sources, edited, instructions, requirements), batch, atol=1e-6)
    # list input with different sizes groups pairs by size and scores each exactly the same
    mixed = reward([sources[0], _images(9, 1, 40, 40)[0]], list(edited), instructions, requirements)
    np.testing.assert_allclose(mixed[:1], batch[:1], atol=1e-6)
    fn = reward.batch_fn()
    np.testing.assert_allclose(fn({"source_images": sources, "images": edited, "prompts": instructions,
                                   "requirements": requirements}), batch, atol=1e-6)
    assert abs(mixed[1] - batch[1]) > 1e-7


def test_jpeg_option_scores_the_jpeg_images(setup):
    _, reward, root = setup
    sources, edited = _batch(4, 2)
    jp = MLLMReward(root / "jax", dtype=jnp.float32, jpeg=True, pad_to_multiple=64, model=reward.model)
    got = jp(sources, edited, ["a", "b"])
    manual = [np.stack([P.jpeg_roundtrip(P.to_uint8(x)) for x in imgs]).astype(np.float32) / 255
              for imgs in (sources, edited)]
    np.testing.assert_allclose(got, reward(*manual, ["a", "b"]), atol=1e-6)
    as_u8 = [np.round(m * 255).astype(np.uint8) for m in manual]  # uint8 batches are accepted as such
    np.testing.assert_allclose(reward(*as_u8, ["a", "b"]), got, atol=1e-6)
    assert np.abs(got - reward(sources, edited, ["a", "b"])).max() > 1e-7


def test_failures_name_the_sample(setup):
    _, reward, _ = setup
    sources, edited = _batch(6, 2)
    edited[1, 3, 3, 0] = np.nan
    with pytest.raises(RewardError, match=r"samples \[1\]"):
        reward(sources, edited, ["a", "b"])
    with pytest.raises(RewardError, match="sample 1"):
        reward(sources, edited, ["a", "bad <|image_pad|>"])
    with pytest.raises(ValueError, match="batch sizes differ"):
        reward(sources, edited, ["a"])


def test_score_cli(setup, tmp_path, capsys):
    import json

    from PIL import Image

    from edit_r1_jax import score as cli

    _, reward, root = setup
    src, edt = _batch(8, 2)
    src, edt = (np.round(src * 255).astype(np.uint8), np.round(edt * 255).astype(np.uint8))
    for i in range(2):
        Image.fromarray(src[i]).save(tmp_path / f"s{i}.png")
        Image.fromarray(edt[i]).save(tmp_path / f"e{i}.png")
    lines = [{"source": "s0.png", "edited": "e0.png", "instruction": "make it blue"},
             {"source": "s1.png", "edited": "e1.png", "instruction": "undo", "requirement": "all of it"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    # batch size 1 keeps every call on the shapes the fixture's reward compiles below (shared jit cache)
    assert cli.main(["--model", str(root / "jax"), "--jsonl", str(tmp_path / "pairs.jsonl"),
                     "--dtype", "float32", "--batch-size", "1"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    want = [reward(src[[i]].astype(np.float32) / 255, edt[[i]].astype(np.float32) / 255, [ins], [req])[0]
            for i, ins, req in [(0, "make it blue", ""), (1, "undo", "all of it")]]
    np.testing.assert_allclose([o["score"] for o in out], want, atol=1e-5)
    assert sorted(out[0]["distribution"]) == ["0", "1", "2", "3", "4", "5"]
    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps({"source": "s0.png"}))
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: missing required field 'edited'"):
        cli.main(["--model", str(root / "jax"), "--jsonl", str(tmp_path / "bad.jsonl")])
    assert cli.main(["--model", str(root / "jax"), "--source", str(tmp_path / "s0.png"), "--edited",
                     str(tmp_path / "e0.png"), "--instruction", "make it blue", "--dtype", "float32"]) == 0
    single = json.loads(capsys.readouterr().out.strip())
    assert abs(single["score"] - out[0]["score"]) < 1e-5


def test_digit_ids_must_be_single_tokens():
    from edit_r1_jax.rewards.mllm import digit_token_ids

    class Split:  # a tokenizer that splits "3" into two tokens
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "3" else [ord(text)]

    with pytest.raises(ValueError, match="'3' is not a single token"):
        digit_token_ids(Split())


def test_images_matter_and_bf16_is_close(setup):
    _, reward, root = setup
    sources, edited = _batch(10, 2)
    a = reward(sources, edited, ["a", "a"])
    b = reward(sources, edited[::-1], ["a", "a"])
    assert np.abs(a - b).max() > 5e-4, (a, b)  # the judge looks at the edited images
    half = MLLMReward(root / "jax", dtype=jnp.bfloat16, pad_to_multiple=64)
    # bf16 parameters and activations (float32 norms, RoPE, softmax) on a random tiny model: 0.02 on a score.
    np.testing.assert_allclose(half(sources, edited, ["a", "a"]), a, atol=2e-2)


def test_micro_batches_and_length_buckets(setup):
    """reward.batch_size: 3 pairs in micro-batches of 2 (the last one padded with a repeat, dropped) score as one
    batch of 3; lengths are bucketed (at most 8 buckets per octave)."""
    from edit_r1_jax.rewards import registry
    from edit_r1_jax.rewards.mllm import bucket_length

    _, reward, root = setup
    sources, edited = _images(7, 3, 60, 90), _images(8, 3, 56, 56)
    ins = ["a", "make the sky a deep red", "b"]
    whole = reward(sources, edited, ins)
    micro = MLLMReward(root / "jax", dtype=jnp.float32, pad_to_multiple=64, model=reward.model, batch_size=2)
    # float32 at highest precision, padding rows masked: micro-batching changes nothing beyond rounding
    np.testing.assert_allclose(micro(sources, edited, ins), whole, atol=1e-6)
    assert [bucket_length(n) for n in (1, 64, 65, 300, 513, 1000, 1025)] == [64, 64, 128, 320, 576, 1024, 1152]
    assert len({bucket_length(n) for n in range(1025, 2049)}) == 8
    assert registry.RewardError is RewardError  # one error type for the whole package


def test_prompt_template_file_changes_the_token_ids(setup, tmp_path):
    """reward.prompt_template / score --prompt-template: a template file replaces the built-in text in the token
    ids the reward feeds the model. Expected ids: the Qwen2.5-VL chat layout spelled out here, tokenised by
    transformers (not by PromptBuilder), <|image_pad|> expanded to grid_t*grid_h*grid_w // 4."""
    from transformers import AutoTokenizer

    _, reward, root = setup
    f = tmp_path / "official.txt"
    f.write_text("Original and edited image. Does the edit follow '{prompt}' ({requirement})? Reply 0-5.")
    custom = MLLMReward(root / "jax", dtype=jnp.float32, model=reward.model, prompt_template=str(f))
    grids = [(1, 4, 6), (1, 4, 4)]
    ours = custom.prompts("make the sky red", "keep the dog", grids)
    judge = "Original and edited image. Does the edit follow 'make the sky red' (keep the dog)? Reply 0-5."
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            + "".join("<|vision_start|>" + "<|image_pad|>" * (g[0] * g[1] * g[2] // 4) + "<|vision_end|>"
                      for g in grids)
            + judge + "<|im_end|>\n<|im_start|>assistant\n")
    tok = AutoTokenizer.from_pretrained(str(root / "jax"))
    assert ours == tok(text, add_special_tokens=False)["input_ids"]
    assert ours != reward.prompts("make the sky red", "keep the dog", grids)  # the default differs
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        MLLMReward(root / "jax", dtype=jnp.float32, model=reward.model, prompt_template=str(tmp_path / "missing.txt"))


def test_score_cli_prompt_template_missing_file(setup, tmp_path):
    from edit_r1_jax import score as cli

    from PIL import Image

    _, _, root = setup
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / name)
    with pytest.raises(SystemExit, match="--prompt-template: .*missing.txt"):  # before the model is loaded
        cli.main(["--model", str(root / "jax"), "--source", str(tmp_path / "a.png"), "--edited",
                  str(tmp_path / "b.png"), "--instruction", "x", "--prompt-template", str(tmp_path / "missing.txt")])
