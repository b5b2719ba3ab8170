"""CLIP / T5 text encoders: parity with transformers (tiny random models converted by our CLI), relative
position buckets, the real CLIP BPE tokenizer through our text path, and the TextEncoders helper."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from edit_r1_jax.models.text import params as P
from edit_r1_jax.models.text.encoders import TextEncoders, check_prompts
from edit_r1_jax.models.text.t5 import relative_position_buckets
from tools.convert_weights.__main__ import main as convert_main



@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """No autograd in this module's reference calls (scoped: a global switch would leak into other tests)."""
    with torch.no_grad():
        yield

# float32 everywhere, highest matmul precision (conftest); errors are accumulation-order noise of a few
# ulps per layer on O(1) activations -> 1e-4 absolute leaves a wide margin while catching any real bug
# (a wrong transpose, bias or bucket gives O(1e-1) errors).
ATOL = 1e-4


def _tiny_clip(eos_token_id: int, vocab: int = 1000, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, eos_token_id=eos_token_id,
                         bos_token_id=min(49406, vocab - 2), pad_token_id=1, projection_dim=32)
    return CLIPTextModel(cfg).eval()


def _tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=500, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                   relative_attention_max_distance=128)
    return T5EncoderModel(cfg).eval()


@pytest.mark.parametrize("eos,prefix", [(2, False), (999, False), (999, True)])
def test_clip_parity(tmp_path, eos, prefix):
    ref = _tiny_clip(eos)
    ref.save_pretrained(tmp_path / "src")
    if prefix:  # hub CLIP files carry "text_model." (FLUX's text_encoder does)
        f = tmp_path / "src" / "model.safetensors"
        save_file({"text_model." + k: v for k, v in load_file(f).items()}, f)
    convert_main(["clip-text", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out")])
    ours = P.load_clip(tmp_path / "out")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 998, size=(3, 77))
    ids[:, 0] = 2 if eos == 2 else 998
    for row, end in enumerate([5, 40, 76]):  # EOS then padding with EOS (FLUX's CLIP pads with <|endoftext|>)
        ids[row, end:] = eos if eos != 2 else 2
        if eos == 2:  # legacy rule: argmax of ids -> make the EOS the largest id
            ids[row, end] = 999
    r = ref(torch.from_numpy(ids))
    hidden, pooled = ours(ids)
    np.testing.assert_allclose(np.asarray(hidden), r.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), r.pooler_output.numpy(), atol=ATOL, rtol=0)
    # pooled really is the EOS position (not e.g. the last token)
    assert not np.allclose(np.asarray(pooled)[0], np.asarray(hidden)[0, -1], atol=1e-3)


def test_t5_parity(tmp_path):
    ref = _tiny_t5()
    ref.save_pretrained(tmp_path / "src")
    convert_main(["t5-encoder", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out")])
    ours = P.load_t5(tmp_path / "out")
    ids = np.random.default_rng(1).integers(0, 500, size=(2, 128))  # 128 > max_exact: log buckets used
    r = ref(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), r, atol=ATOL, rtol=0)
    # with an attention mask too
    mask = np.ones((2, 128), np.int64)
    mask[1, 60:] = 0
    r = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids, mask)), r, atol=ATOL, rtol=0)


def test_t5_converter_reports_problems(tmp_path):
    ref = _tiny_t5()
    ref.save_pretrained(tmp_path / "src")
    f = tmp_path / "src" / "model.safetensors"
    sd = load_file(f)
    del sd["encoder.final_layer_norm.weight"]
    sd["encoder.extra.weight"] = torch.zeros(2)
    save_file(sd, f)
    from edit_r1_jax.weights import ConversionError

    with pytest.raises(ConversionError, match=r"final_layer_norm(.|\n)*encoder\.extra\.weight"):
        convert_main(["t5-encoder", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "params.safetensors").exists()


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for q, n, d in [(300, 32, 128), (77, 32, 16), (10, 8, 20)]:
        rel = torch.arange(q)[None, :] - torch.arange(q)[:, None]
        ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=n, max_distance=d)
        np.testing.assert_array_equal(relative_position_buckets(q, q, n, d), ref.numpy())


# --------------------------------------------------------------------------------- real CLIP tokenizer
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="session")
def clip_bpe_file(tmp_path_factory) -> Path:
    """bpe_simple_vocab_16e6.txt.gz extracted from the open-clip-torch wheel (PyPI), cached per user."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edit_r1_jax"
    target = cache / "bpe_simple_vocab_16e6.txt.gz"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                          "-d", str(wheels), "open-clip-torch"], capture_output=True, text=True, timeout=300)
    whl = sorted(wheels.glob("open_clip_torch-*.whl"))
    if res.returncode or not whl:
        pytest.skip(f"could not download open-clip-torch from the package index: {res.stderr[-500:]}")
    with zipfile.ZipFile(whl[0]) as z:
        name = next(n for n in z.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
        tmp = target.with_suffix(".partial")
        tmp.write_bytes(z.read(name))
        tmp.replace(target)
    return target


@pytest.fixture(scope="session")
def clip_tokenizer_dir(clip_bpe_file, tmp_path_factory) -> Path:
    """A transformers CLIPTokenizer folder built from the CLIP BPE merges (same construction as OpenAI's)."""
    from transformers import CLIPTokenizer

    merges = gzip.open(clip_bpe_file).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = _bytes_to_unicode()
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    d = tmp_path_factory.mktemp("clip_tok")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), pad_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("clip_tok_saved")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def t5_tokenizer_dir(tmp_path_factory) -> Path:
    """A small word-level tokenizer standing in for T5's sentencepiece model (pads with id 0, appends </s>=1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + "make the sky red turn cat into a dog add hat remove".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    d = tmp_path_factory.mktemp("t5_tok")
    fast.save_pretrained(d)
    return d


def test_real_clip_tokenizer_ids(tmp_path, caplog, clip_tokenizer_dir, t5_tokenizer_dir):
    from transformers import CLIPTokenizer, CLIPTextConfig, CLIPTextModel

    ref_tok = CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir))
    prompts = ["a photo of a cat", "Make the sky RED, and add a hat!!  ", "x " * 100]
    # well-known CLIP ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert ref_tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]

    # a converted CLIP with the real vocabulary size, tokenizer copied by the converter
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, eos_token_id=2))
    clip.save_pretrained(tmp_path / "clip")
    t5 = _tiny_t5()
    t5.save_pretrained(tmp_path / "t5")
    convert_main(["clip-text", "--src", str(tmp_path / "clip"), "--dst", str(tmp_path / "out/text_encoder"),
                  "--tokenizer", str(clip_tokenizer_dir)])
    convert_main(["t5-encoder", "--src", str(tmp_path / "t5"), "--dst", str(tmp_path / "out/text_encoder_2"),
                  "--tokenizer", str(t5_tokenizer_dir)])
    enc = TextEncoders.from_pretrained(tmp_path / "out", t5_length=16)
    ours = enc.tokenize_clip(prompts)
    ref = ref_tok(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ours.shape == (3, 77)
    np.testing.assert_array_equal(ours, np.asarray(ref))
    assert ours[2, -1] == 49407  # truncated rows still end with EOS

    import logging

    with caplog.at_level(logging.WARNING, logger="edit_r1_jax.models.text.encoders"):
        embeds, pooled = enc.encode(prompts)
    assert "CLIP: instruction 2 has 102 tokens, truncated to 77" in caplog.text  # "x " * 100 + BOS/EOS
    assert embeds.shape == (3, 16, 32) and pooled.shape == (3, 16)
    assert embeds.dtype == np.float32 and pooled.dtype == np.float32
    r_pooled = clip(torch.from_numpy(ours.astype(np.int64))).pooler_output.numpy()
    np.testing.assert_allclose(pooled, r_pooled, atol=ATOL, rtol=0)
    t5_ids = enc.tokenize_t5(prompts)
    assert t5_ids[0, :3].tolist() == [10, 2, 2] and 1 in t5_ids[1].tolist() and t5_ids[1, -1] == 0
    np.testing.assert_allclose(embeds, t5(torch.from_numpy(t5_ids.astype(np.int64))).last_hidden_state.numpy(),
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="instruction 1 is empty"):
        enc.encode(["ok", "   "])
    with pytest.raises(TypeError):
        check_prompts("a single string")
