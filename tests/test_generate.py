"""Qwen2.5-VL KV-cache decoding against transformers' ``generate(do_sample=False)`` on a tiny random model:
token for token, and the logits of every step, text-only and with two images, batch 2 with different prompt
lengths (left padding), with an EOS that stops one row early.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_fixtures import convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

from edit_r1_jax.models.qwen2_5_vl import params as qparams
from edit_r1_jax.models.qwen2_5_vl.generate import SamplingConfig, generate, trim
from edit_r1_jax.models.qwen2_5_vl.model import embed_images, get_rope_index
from edit_r1_jax.models.qwen2_5_vl.processor import preprocess_host
from devices import ROOT, env as device_env

IMG, V_START, V_END, PAD = 151655, 151652, 151653, 151643
MAX_NEW = 8


@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_gen")
    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")
    ref = save_tiny_checkpoint(root / "hf", tok, seed=3)
    convert_cli(root / "hf", root / "jax")
    return ref, qparams.load_model(root / "jax")


def _left_pad(rows):
    L = max(map(len, rows))
    ids = np.full((len(rows), L), PAD, np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for r, s in enumerate(rows):
        ids[r, L - len(s):], mask[r, L - len(s):] = s, 1
    return ids, mask


def _prompts(with_images: bool, rng):
    """Two prompts of different lengths; with images each holds two images (source 56x84, edited 56x56)."""
    rows, images = [], []
    for b, n_text in enumerate((5, 11)):
        text = rng.integers(100, 5000, n_text).tolist()
        if with_images:
            seq = text[:2]
            for h, w in ((56, 84), (56, 56)):
                img = rng.integers(0, 256, (h + 4 * b, w, 3), dtype=np.uint8)
                patches, grid = preprocess_host(img)
                images.append((patches, grid))
                seq += [V_START] + [IMG] * (grid[0] * grid[1] * grid[2] // 4) + [V_END]
            seq += text[2:]
        else:
            seq = text
        rows.append(seq)
    return rows, images


def _reference(ref, ids, mask, images, eos, max_new=MAX_NEW):
    kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new,
              do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=PAD, output_logits=True,
              return_dict_in_generate=True, temperature=None, top_p=None, top_k=None)
    if images:
        kw.update(pixel_values=torch.tensor(np.concatenate([p for p, _ in images])),
                  image_grid_thw=torch.tensor([g for _, g in images]),
                  # transformers 5.24 builds 3-D M-RoPE positions only when mm_token_type_ids is passed
                  mm_token_type_ids=(torch.tensor(ids) == IMG).long())
    out = ref.generate(**kw)
    new = out.sequences[:, ids.shape[1]:].numpy()
    logits = torch.stack(out.logits, dim=1).float().numpy()  # [B, steps, V]
    return new, logits


def _ours(model, ids, mask, images, eos, max_new=MAX_NEW, temperature=0.0, seed=0):
    grids = [g for _, g in images]
    pos = get_rope_index(ids, mask, grids, image_token_id=IMG, spatial_merge_size=2)
    emb = embed_images(model, images) if images else None
    cfg = SamplingConfig(max_new_tokens=max_new, eos_token_ids=tuple(eos), pad_token_id=PAD,
                         temperature=temperature, return_logits=True)
    return generate(model, ids, mask, pos, emb, cfg=cfg, seed=seed)


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "two_images"])
def test_greedy_matches_transformers(models, with_images):
    ref, model = models
    rows, images = _prompts(with_images, np.random.default_rng(7 if with_images else 5))
    ids, mask = _left_pad(rows)
    assert mask[0].sum() < mask[1].sum()  # row 0 is left padded

    # First without a reachable EOS: all MAX_NEW steps.
    want, want_logits = _reference(ref, ids, mask, images, eos=[PAD + 1000])
    got = _ours(model, ids, mask, images, eos=[PAD + 1000])
    assert want.shape == (2, MAX_NEW)
    np.testing.assert_array_equal(got.tokens, want)
    np.testing.assert_array_equal(got.lengths, [MAX_NEW, MAX_NEW])
    # float32, HIGHEST matmuls, 2 tiny layers; logits are O(1-10): 1e-4 covers summation-order differences
    # between torch and XLA accumulated over 8 cached steps.
    np.testing.assert_allclose(got.logits, want_logits, atol=1e-4, rtol=1e-5)
    assert np.ptp(want_logits[:, 0], axis=-1).min() > 1.0  # the logits are not flat: the comparison bites

    # Now the token row 0 emits at step 2 is the EOS: row 0 stops there (then pads), row 1 runs on unless it
    # emits that token too; transformers does the same.
    eos = int(want[0, 2])
    want2, want_logits2 = _reference(ref, ids, mask, images, eos=[eos])
    got2 = _ours(model, ids, mask, images, eos=[eos])
    steps = want2.shape[1]
    np.testing.assert_array_equal(got2.tokens[:, :steps], want2)
    assert (got2.tokens[:, steps:] == PAD).all()
    assert got2.lengths[0] == 3 and got2.tokens[0, 3:].tolist() == [PAD] * (MAX_NEW - 3)
    np.testing.assert_allclose(got2.logits[:, :steps], want_logits2, atol=1e-4, rtol=1e-5)
    assert trim(got2.tokens, got2.lengths, [eos])[0] == want2[0, :2].tolist()


def test_rows_do_not_depend_on_their_neighbours(models):
    _, model = models
    rows, images = _prompts(True, np.random.default_rng(7))
    other, other_images = _prompts(True, np.random.default_rng(8))  # same shapes: the compiled program is reused
    a = _ours(model, *_left_pad(rows), images, eos=[])
    b = _ours(model, *_left_pad([rows[0], other[1]]), images[:2] + other_images[2:], eos=[])
    np.testing.assert_array_equal(a.tokens[0], b.tokens[0])
    # the padded row's attention only ever adds exactly-zero weights from the neighbour: float32 rounding
    np.testing.assert_allclose(a.logits[0], b.logits[0], atol=1e-5)
    assert (a.tokens[1] != b.tokens[1]).any()


def test_temperature_sampling(models):
    _, model = models
    rows, _ = _prompts(False, np.random.default_rng(5))
    ids, mask = _left_pad(rows)
    greedy = _ours(model, ids, mask, [], eos=[])
    a = _ours(model, ids, mask, [], eos=[], temperature=1.0, seed=1)
    b = _ours(model, ids, mask, [], eos=[], temperature=1.0, seed=1)
    c = _ours(model, ids, mask, [], eos=[], temperature=1.0, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # the seed decides
    assert (a.tokens != c.tokens).any() and (a.tokens != greedy.tokens).any()
    # a vanishing temperature is the argmax
    cold = _ours(model, ids, mask, [], eos=[], temperature=1e-6, seed=3)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)


def test_rejects_right_padding(models):
    _, model = models
    ids = np.asarray([[5, 6, 7], [5, 6, PAD]])
    mask = np.asarray([[1, 1, 1], [1, 1, 0]])
    pos = get_rope_index(ids, mask, [], image_token_id=IMG)
    with pytest.raises(ValueError, match="left padded"):
        generate(model, ids, mask, pos, cfg=SamplingConfig(max_new_tokens=2))


SHARDED = r"""
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from qwen_fixtures import save_tiny_checkpoint, convert_cli
from test_generate import _left_pad, _prompts, PAD, IMG
from edit_r1_jax.models.qwen2_5_vl import params as qparams
from edit_r1_jax.models.qwen2_5_vl.generate import SamplingConfig, generate
from edit_r1_jax.models.qwen2_5_vl.model import embed_images, get_rope_index
from edit_r1_jax.parallel.mesh import make_mesh

root = Path(sys.argv[1])
tok = Path(sys.argv[3])
save_tiny_checkpoint(root / "hf", tok, seed=3)
convert_cli(root / "hf", root / "jax")
rows, images = _prompts(True, np.random.default_rng(7))
ids, mask = _left_pad(rows)
pos = get_rope_index(ids, mask, [g for _, g in images], image_token_id=IMG)
cfg = SamplingConfig(max_new_tokens=6, eos_token_ids=(), pad_token_id=PAD, return_logits=True)
plain = qparams.load_model(root / "jax")
a = generate(plain, ids, mask, pos, embed_images(plain, images), cfg=cfg)
mesh = make_mesh({"data": 2, "tensor": 2})
sharded = qparams.load_model(root / "jax", mesh=mesh)
with jax.set_mesh(mesh):
    emb = embed_images(sharded, images)
b = generate(sharded, ids, mask, pos, emb, cfg=cfg, mesh=mesh)
q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
print(json.dumps({"tok_equal": bool((a.tokens == b.tokens).all()), "dlogits": float(np.abs(a.logits - b.logits).max()),
                  "q_shard": list(q.addressable_shards[0].data.shape), "q_shape": list(q.shape)}))
"""


def test_sharded_generation_equals_unsharded(tmp_path, tmp_path_factory):
    """Batch over data (2), heads/MLP over tensor (2) on 4 host CPU devices (subprocess: the device count must
    be set before jax starts)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")
    env = device_env(4)
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path), str(Path(__file__).parent), str(tok)],
                          env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["q_shard"] == [r["q_shape"][0], r["q_shape"][1] // 2], r  # the parameters really are sharded
    assert r["tok_equal"], r
    assert r["dlogits"] < 1e-4, r  # float32; sharded reductions sum in another order
