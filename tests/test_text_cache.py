"""``python -m edit_r1_jax.embed_text``: metadata validation, cache build, lookup, incremental update and
detection of a changed encoder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edit_r1_jax.embed_text import MetadataError, StaleCacheError, TextCache, main, read_metadata
from edit_r1_jax.models.text.encoders import TextEncoders
from kontext_tiny import T5_LENGTH, build_pipeline
from tools.convert_weights.__main__ import main as convert_main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text")
    pipe = build_pipeline(with_text=True)
    pipe.save_pretrained(tmp / "pipe")
    out = tmp / "model"
    convert_main(["clip-text", "--src", str(tmp / "pipe/text_encoder"), "--tokenizer", str(tmp / "pipe/tokenizer"),
                  "--dst", str(out / "text_encoder")])
    convert_main(["t5-encoder", "--src", str(tmp / "pipe/text_encoder_2"), "--tokenizer",
                  str(tmp / "pipe/tokenizer_2"), "--dst", str(out / "text_encoder_2")])
    return out


def _write(data, lines):
    data.mkdir(exist_ok=True)
    (data / "train_metadata.jsonl").write_text("\n".join(lines) + "\n")


def _item(prompt, image="images/a.png", **kw):
    return json.dumps({"prompt": prompt, "image": image, **kw})


@pytest.mark.parametrize("line,msg", [
    ("{not json", "malformed JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"image": "x.png"}', "missing required field 'prompt'"),
    ('{"prompt": 3, "image": "x.png"}', "field 'prompt' must be a non-empty string"),
    ('{"prompt": "  ", "image": "x.png"}', "field 'prompt' must be a non-empty string"),
])
def test_malformed_lines(tmp_path, line, msg):
    _write(tmp_path, [_item("make the sky red"), "", line])
    with pytest.raises(MetadataError, match=rf"train_metadata\.jsonl:3: {msg}"):
        read_metadata(tmp_path / "train_metadata.jsonl")


def test_build_lookup_update_and_stale(tmp_path, model_dir):
    data = tmp_path / "data"
    _write(data, [_item("make the sky red", requirement="r"), _item("turn the cat into a dog"),
                  _item("make the sky red", image="images/b.png")])
    args = ["--model", str(model_dir), "--data", str(data), "--t5-length", str(T5_LENGTH)]
    assert main(args) == 0
    cache = TextCache(data, "train", model_dir=model_dir)
    assert len(cache) == 2 and "make the sky red" in cache
    enc = TextEncoders.from_pretrained(model_dir, t5_length=T5_LENGTH)
    prompts = ["turn the cat into a dog", "make the sky red"]
    got = cache.lookup(prompts)
    assert set(got) == {"text", "pooled"}  # the Kontext family's conditioning entries
    e, p = got["text"], got["pooled"]
    re_, rp = enc.encode(prompts)
    assert e.shape == (2, T5_LENGTH, 32) and p.shape == (2, 16)
    np.testing.assert_array_equal(e, re_)  # float32 storage: bit-exact
    np.testing.assert_array_equal(p, rp)
    with pytest.raises(KeyError, match="not in text cache"):
        cache.lookup(["make the sky blue"])

    # a new instruction: only it is encoded, old rows are kept bit-exactly
    _write(data, [_item("make the sky red"), _item("turn the cat into a dog"), _item("add a hat")])
    assert main(args) == 0
    cache2 = TextCache(data, "train")
    assert len(cache2) == 3
    np.testing.assert_array_equal(cache2.lookup(prompts)["text"], e)
    np.testing.assert_array_equal(cache2.lookup(["add a hat"])["pooled"], enc.encode(["add a hat"])[1])

    # a copy of dataset + model (every file gets a new mtime, as a bucket sync to a worker does) stays valid
    import shutil

    data_copy, model_copy = tmp_path / "data_copy", tmp_path / "model_copy"
    shutil.copytree(data, data_copy, copy_function=shutil.copy)  # copy: contents only, fresh mtimes
    shutil.copytree(model_dir, model_copy, copy_function=shutil.copy)
    for f in list(data_copy.rglob("*")) + list(model_copy.rglob("*")):
        os.utime(f, ns=(0, 10**18))
    copied = TextCache(data_copy, "train", model_dir=model_copy)
    assert copied.fingerprint == cache2.fingerprint
    np.testing.assert_array_equal(copied.lookup(prompts)["text"], e)

    # a changed encoder (one weight of the copy changed, same size and header) is detected
    params = model_copy / "text_encoder" / "params.safetensors"
    raw = bytearray(params.read_bytes())
    raw[-3] ^= 0xFF  # inside the last tensor's data: the last sampled block covers the file's tail
    params.write_bytes(bytes(raw))
    with pytest.raises(StaleCacheError):
        TextCache(data_copy, "train", model_dir=model_copy)
    assert main(["--model", str(model_copy), "--data", str(data_copy), "--t5-length", str(T5_LENGTH)]) == 0
    assert TextCache(data_copy, "train", model_dir=model_copy).fingerprint != cache2.fingerprint
    # a changed instruction is a missing key, not a stale cache
    with pytest.raises(KeyError, match="not in text cache"):
        TextCache(data_copy, "train", model_dir=model_copy).lookup(["make the sky red!"])


def test_missing_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="embed_text"):
        TextCache(tmp_path, "test")
