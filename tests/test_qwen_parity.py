"""Parity of our Flax Qwen2.5-VL with transformers' Qwen2_5_VLForConditionalGeneration (tiny random configs,
saved with save_pretrained in the hub layout, converted with our CLI), float32, highest matmul precision.

Tolerances: float32 end to end; the two implementations sum in different orders (fused qkv matmul, mask vs
split attention), so differences are ~1e-6 relative. We use atol 2e-5 / rtol 1e-4 on outputs of order 1.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open

from qwen_fixtures import convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

from edit_r1_jax.models.qwen2_5_vl import params
from edit_r1_jax.models.qwen2_5_vl.model import embed_images, get_rope_index



@pytest.fixture(autouse=True, scope="module")
def _no_grad():
    """No autograd in this module's reference calls (scoped: a global switch would leak into other tests)."""
    with torch.no_grad():
        yield
ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")
    ref = save_tiny_checkpoint(root / "hf", tok, seed=0, vocab_size=400, image_token_id=390,
                               video_token_id=391, vision_start_token_id=392, vision_end_token_id=393)
    convert_cli(root / "hf", root / "jax")
    return ref, params.load_model(root / "jax")


def _patches(rng, grid):
    t, h, w = grid
    return rng.standard_normal((t * h * w, 3 * 2 * 14 * 14)).astype(np.float32)


def test_vision_tower(ckpt):
    ref, ours = ckpt
    rng = np.random.default_rng(0)
    # 12x8 patches = 6x4 merged tokens, windows of 2x2 merged tokens; 10x6 gives ragged edge windows.
    for grid in [(1, 12, 8), (1, 10, 6), (2, 4, 4)]:
        pv = _patches(rng, grid)
        want = ref.model.visual(torch.from_numpy(pv), torch.tensor([grid])).pooler_output.numpy()
        got = np.asarray(ours.encode_images(jnp.asarray(pv)[None], grid)[0])
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=str(grid))


def test_text_only_logits(ckpt):
    ref, ours = ckpt
    ids = np.random.default_rng(1).integers(0, 380, (2, 11))
    want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    pos = np.broadcast_to(np.arange(11), (3, 2, 11))
    got = np.asarray(ours(jnp.asarray(ids), jnp.ones((2, 11), jnp.int32), jnp.asarray(pos)))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


def test_full_logits_two_images_of_different_sizes(ckpt):
    ref, ours = ckpt
    rng = np.random.default_rng(2)
    grids = [(1, 8, 12), (1, 6, 4)]
    pvs = [_patches(rng, g) for g in grids]
    n_tok = [g[0] * g[1] * g[2] // 4 for g in grids]
    ids = ([5, 6, 392] + [390] * n_tok[0] + [393, 7, 392] + [390] * n_tok[1] + [393] +
           list(rng.integers(0, 380, 9)))
    ids = np.asarray([ids])
    mm = (ids == 390).astype(np.int64)
    want = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(np.concatenate(pvs)),
               image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.from_numpy(mm)).logits.numpy()
    pos = get_rope_index(ids, None, grids, image_token_id=390)
    # The same position ids as transformers computes.
    ref_pos, _ = ref.model.get_rope_index(torch.from_numpy(ids), torch.from_numpy(mm), torch.tensor(grids))
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    emb = embed_images(ours, [(jnp.asarray(p), g) for p, g in zip(pvs, grids)])
    got = np.asarray(ours(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), jnp.asarray(pos), emb))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    last = np.asarray(ours(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), jnp.asarray(pos), emb,
                           last_only=True))
    np.testing.assert_allclose(last, want[:, -1], atol=ATOL, rtol=RTOL)


def test_tied_embeddings(tmp_path):
    ref = save_tiny_checkpoint(tmp_path / "hf", None, seed=3, tie=True, vocab_size=300, image_token_id=290)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
        has_head = "lm_head.weight" in f.keys()
    (tmp_path / "hf" / "vocab.json").write_text("{}")  # converter requires tokenizer files; unused here
    convert_cli(tmp_path / "hf", tmp_path / "jax")
    ours = params.load_model(tmp_path / "jax")
    assert ours.lm_head is None, f"tied checkpoint (lm_head in file: {has_head}) must use the embedding"
    ids = np.arange(7)[None] + 3
    want = ref(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids), jnp.ones((1, 7), jnp.int32), jnp.asarray(np.broadcast_to(
        np.arange(7), (3, 1, 7)))))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)
    # --dtype bfloat16 stores bf16 tensors; loaded into a float32 model they differ only by that rounding
    # (relative 2^-9 per weight): 2e-2 absolute on logits of order 1.
    convert_cli(tmp_path / "hf", tmp_path / "jax_bf16", "--dtype", "bfloat16")
    with safe_open(str(tmp_path / "jax_bf16" / "params.safetensors"), "np") as f:
        assert str(f.get_slice("model.norm.weight").get_dtype()) == "BF16"
    half = params.load_model(tmp_path / "jax_bf16")
    got16 = np.asarray(half(jnp.asarray(ids), jnp.ones((1, 7), jnp.int32), jnp.asarray(np.broadcast_to(
        np.arange(7), (3, 1, 7)))))
    np.testing.assert_allclose(got16, want, atol=2e-2)
    assert np.abs(got16 - want).max() > 1e-6  # the bf16 rounding is really there


def test_config_from_flat_hub_layout():
    """The Qwen2.5-VL-7B-Instruct config.json (transformers 4 flat layout, rope_scaling type mrope)."""
    from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VLConfig

    hub = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
           "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_hidden_layers": 28,
           "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 152064,
           "tie_word_embeddings": False, "image_token_id": 151655, "video_token_id": 151656,
           "vision_start_token_id": 151652, "vision_end_token_id": 151653, "use_sliding_window": False,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
           "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                             "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                             "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                             "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                             "temporal_patch_size": 2}}
    cfg = Qwen2_5_VLConfig.from_hf(hub)
    assert cfg.text_config.mrope_section == (16, 24, 24) and cfg.text_config.rope_theta == 1e6
    assert cfg.text_config.head_dim == 128 and cfg.vision_config.head_dim == 80
    assert cfg.vision_config.fullatt_block_indexes == (7, 15, 23, 31)
    assert Qwen2_5_VLConfig.from_dict(cfg.to_dict()) == cfg
