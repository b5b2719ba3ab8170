"""Qwen-Image-Edit trained by the same NFT loop: the tiny converted QwenImageEditPlusPipeline, its Qwen2.5-VL prompt
embeddings in the text cache (keyed by instruction and image), the tiny Qwen2.5-VL reward, one epoch of the real
trainer on configs/qwen_image_edit_mllm.py with tiny sizes."""

import numpy as np
import pytest

from configs import qwen_image_edit_mllm
from edit_dataset import check_one_epoch, tiny_paper_run, write_dataset
from edit_r1_jax import editors, train
from edit_r1_jax.embed_text import TextCache, build_cache
from edit_r1_jax.models.lora import lora_to_flat
from qwen_fixtures import convert_cli, save_tiny_checkpoint
from qwen_image_tiny import RESOLUTION, save_and_convert, tokenizer_dir

pytestmark = pytest.mark.slow

MAX_LENGTH = 256  # the paper's length: the 384^2 condition image alone is ~190 tokens of the tiny VLM


def test_qwen_image_edit_epoch(tmp_path, tmp_path_factory):
    tok = tokenizer_dir(tmp_path_factory)
    _, _, model_dir = save_and_convert(tmp_path, tok)
    assert editors.detect(model_dir).name == "qwen_image_edit"
    data = write_dataset(tmp_path / "data")
    for split in ("train", "test"):
        build_cache(model_dir, data, split, max_length=MAX_LENGTH, resolution=RESOLUTION)
    # the cache holds what the family's encoder computes on the fly for the same rows (data.text_cache=False)
    from edit_r1_jax.data import source as data_source

    family = editors.get("qwen_image_edit")
    cond = family.conditioner(model_dir, {"max_length": MAX_LENGTH})
    ds, _ = data_source.make_dataset(data, "train", RESOLUTION)
    items = [ds[i] for i in range(len(ds))]
    prompts, images = [it["prompt"] for it in items], np.stack([it["image"] for it in items])
    cached = TextCache(data, "train", model_dir, text_cfg={"max_length": MAX_LENGTH}).lookup(prompts, images)
    fresh = cond(prompts, images)
    assert cached["text"].shape == (len(items), MAX_LENGTH, cached["text"].shape[-1])
    np.testing.assert_array_equal(cached["mask"], fresh["mask"])
    np.testing.assert_array_equal(cached["text"], fresh["text"])  # float32 storage: bit-exact
    assert 0 < cached["mask"].sum(1).min() and cached["mask"].sum(1).max() < MAX_LENGTH  # real tokens, then padding

    # when the reward model is the folder's own text encoder, the encoder reuses the reward's loaded weights
    import jax.numpy as jnp

    from edit_r1_jax.rewards.mllm import MLLMReward
    from edit_r1_jax.tasks import _shared_encoder

    same = MLLMReward(model_dir / "text_encoder", dtype=jnp.float32)
    shared = _shared_encoder(same, model_dir)
    assert shared is same.model
    reused = family.conditioner(model_dir, {"max_length": MAX_LENGTH}, shared=shared)
    assert reused.encoder.model is same.model and reused.fingerprint() == cond.fingerprint()
    np.testing.assert_array_equal(reused(prompts, images)["text"], fresh["text"])

    save_tiny_checkpoint(tmp_path / "qwen_hf", tok)
    qwen = convert_cli(tmp_path / "qwen_hf", tmp_path / "qwen")
    assert _shared_encoder(MLLMReward(qwen, dtype=jnp.float32), model_dir) is None  # another checkpoint: two copies
    c = qwen_image_edit_mllm.get_config()
    tiny_paper_run(c, tmp_path / "run", model_dir, data, RESOLUTION, qwen)
    c.text.max_length = MAX_LENGTH
    report = train.dry_run(c)  # the start-up checks on this family: folder, cache fingerprint, rows
    assert report["task"] == "qwen_image_edit" and report["train_rows"] == 4 and report["model"]["num_layers"] == 1
    out = train.run(c)
    check_one_epoch(out, tmp_path / "run")
    # B starts at zero: after the optimizer step the adapters moved (theta), and theta_old followed (spec B.8)
    b_leaves = lambda t: [np.asarray(x) for k, x in lora_to_flat(t).items() if k.endswith(".lora_b")]  # noqa: E731
    assert len(b_leaves(out["state"]["theta"])) == 8  # the 8 attention projections of the one tiny block
    assert max(np.abs(b).max() for b in b_leaves(out["state"]["theta"])) > 0
    assert max(np.abs(b).max() for b in b_leaves(out["state"]["theta_old"])) > 0

