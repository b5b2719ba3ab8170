"""The paper's path end to end on tiny random models: converted Kontext pipeline + text cache + Qwen2.5-VL
reward, one epoch of the real trainer (configs/kontext_mllm.py with tiny sizes)."""

import numpy as np
import pytest

from configs import kontext_mllm
from edit_r1_jax import train
from edit_r1_jax.embed_text import build_cache
from edit_dataset import write_dataset
from kontext_tiny import RESOLUTION, T5_LENGTH, save_and_convert
from qwen_fixtures import convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

pytestmark = pytest.mark.slow


def test_kontext_mllm_epoch(tmp_path, tmp_path_factory):
    _, model_dir = save_and_convert(tmp_path)
    data = tmp_path / "data"
    write_dataset(data)
    for split in ("train", "test"):
        build_cache(model_dir, data, split, t5_length=T5_LENGTH)
    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp())
    save_tiny_checkpoint(tmp_path / "qwen_hf", tok)
    qwen = convert_cli(tmp_path / "qwen_hf", tmp_path / "qwen")

    c = kontext_mllm.get_config("ban_prompt")
    c.run_dir = str(tmp_path / "run")
    c.model.update(dir=str(model_dir), dtype="float32", param_dtype="float32", remat_policy="none")
    c.data.update(root=str(data), resolution=RESOLUTION)
    c.text.t5_length = T5_LENGTH
    c.reward.mllm_dir = str(qwen)
    c.lora.rank = 4
    c.sample.update(num_steps=3, group_size=2, groups_per_batch=2, num_batches_per_epoch=1, rollout_batch_size=4)
    c.train.micro_batch_size = 2
    c.eval.update(every=1, num_steps=2, num_samples=2, batch_size=2)
    c.log.update(tensorboard=False, progress=False, image_every=1)
    c.num_epochs = 1
    out = train.run(c)
    m = out["last"]
    assert 0.0 <= m["reward/mllm"] <= 1.0
    assert np.isfinite(m["train/policy_loss"]) and np.isfinite(m["train/grad_norm"])
    assert m["train/grad_norm"] > 0  # the LoRA got a gradient through the whole Kontext path
    assert 0.0 <= out["eval"][0]["eval/reward_mean"] <= 1.0
    assert list((tmp_path / "run" / "samples").glob("eval_*.png"))
