"""The trainer end to end on a tiny toy config: it runs, resumes bitwise, and stops on a bad reward."""

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import toy
from edit_r1_jax import train, weights
from edit_r1_jax.models import lora as lora_lib
from edit_r1_jax.rewards import registry

pytestmark = pytest.mark.slow


def tiny_config(run_dir) -> ConfigDict:
    c = toy.get_config()
    c.run_dir = str(run_dir)
    c.num_epochs = 2
    c.model.dit = ConfigDict(dict(num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, axes_dims_rope=(4, 6, 6)))
    c.lora.rank = 4
    c.toy.num_train_rows = 16
    c.toy.num_test_rows = 8
    c.sample.num_steps = 3
    c.sample.group_size = 4
    c.sample.groups_per_batch = 2
    c.sample.num_batches_per_epoch = 2
    c.sample.rollout_batch_size = 4  # two rollout calls per sampling batch
    c.train.micro_batch_size = 8
    c.train.steps_per_epoch = 1
    c.eval.update(every=0, num_steps=3, num_samples=8, batch_size=8)
    c.checkpoint.every = 1
    c.log.update(image_every=1, tensorboard=False, progress=False)
    c.warmup.update(steps=3, batch_size=8)
    return c


def _leaves(state):
    state = dict(state, key=jax.random.key_data(state["key"]))
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_resume_is_bitwise_exact(tmp_path):
    straight = train.run(tiny_config(tmp_path / "a"))
    c = tiny_config(tmp_path / "b")
    first = train.run(c, max_epochs=1)
    assert int(first["state"]["step"]) == 1
    resumed = train.run(c)  # picks up the epoch-0 checkpoint, sampler state and all
    assert int(resumed["state"]["step"]) == 2
    for a, b in zip(_leaves(straight["state"]), _leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    # The run actually trained: theta moved away from the initial B = 0 and theta_old followed.
    flat = {"/".join(map(str, p)): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(jax.device_get(straight["state"]["theta"]))[0]}
    assert any(np.abs(v).max() > 0 for k, v in flat.items() if "lora_b" in k)
    metrics = straight["last"]
    for name in ("reward_mean", "train/policy_loss", "train/kl_div", "train/old_deviate", "train/x0_norm",
                 "train/grad_norm", "zero_std_ratio", "banned_rows", "time/rollout", "images_per_s"):
        assert name in metrics and np.isfinite(metrics[name]), name
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") >= 2
    assert list((tmp_path / "a" / "samples").glob("train_*.png"))
    # The EMA LoRA is exported at each checkpoint and converts to the PEFT/diffusers layout.
    from tools.convert_weights.__main__ import main as convert

    exported = sorted((tmp_path / "a" / "lora").iterdir())[-1]
    assert convert(["export-lora", "--src", str(exported), "--dst", str(tmp_path / "peft.safetensors")]) == 0
    peft = weights.read_tensors(tmp_path / "peft.safetensors")
    ema_b = {k: v for k, v in lora_lib.lora_to_flat(jax.device_get(straight["state"]["ema"])).items()
             if k.endswith("lora_b")}
    key = next(iter(ema_b))
    np.testing.assert_array_equal(peft[f"transformer.{key[:-len('.lora_b')]}.lora_B.weight"], np.asarray(ema_b[key]).T)


def test_nan_reward_stops_the_run_naming_the_sample(tmp_path):
    def half_nan(batch):
        out = np.ones(len(batch["image"]))
        out[3] = np.nan
        return out

    registry.default_registry.register("test_half_nan", half_nan)
    c = tiny_config(tmp_path)
    c.reward.weights = ConfigDict({"toy_edit": 1.0, "test_half_nan": 1.0})
    with pytest.raises(registry.RewardError, match="sample 3"):
        train.run(c, max_epochs=1)
    # With on_error="mask" the sample is dropped from the loss and counted instead.
    c.reward.on_error = "mask"
    c.run_dir = str(tmp_path / "masked")
    out = train.run(c, max_epochs=1)
    assert out["last"]["invalid_rewards"] == 4  # sample 3 of each of the 4 rollout calls (16 samples, 4 per call)
