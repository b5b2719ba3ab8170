"""The trainer end to end on a tiny toy config: it runs, resumes bitwise, names its outputs by one counter,
leaves a finished run alone, and stops on a bad reward."""

import json

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import toy
from edit_r1_jax import compile_cache, train, weights
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


def _flat(lora):
    return {"/".join(map(str, p)): np.asarray(v) for p, v in
            jax.tree_util.tree_flatten_with_path(jax.device_get(lora))[0]}


def _files(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_resume_is_bitwise_exact(tmp_path):
    ca = tiny_config(tmp_path / "a")
    ca.eval.every = 2  # held-out evaluation at 0 and 2 epochs done (it reads the EMA only: training unchanged)
    c = tiny_config(tmp_path / "b")
    for x in (ca, c):  # two optimizer steps per epoch: the optimizer step and the epoch counter differ
        x.train.steps_per_epoch = 2
    straight = train.run(ca)
    first = train.run(c, max_epochs=1)
    assert int(first["state"]["step"]) == 2
    resumed = train.run(c)  # picks up the epoch-0 checkpoint, sampler state and all
    assert int(resumed["state"]["step"]) == 4
    for a, b in zip(_leaves(straight["state"]), _leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    # The run actually trained: theta moved away from the initial B = 0 ...
    theta1, old1 = _flat(first["state"]["theta"]), _flat(first["state"]["theta_old"])
    theta2, old2 = _flat(straight["state"]["theta"]), _flat(straight["state"]["theta_old"])
    assert any(np.abs(v).max() > 0 for k, v in theta2.items() if "lora_b" in k)
    # ... and theta_old followed it once per epoch by spec B.8 (decay_type 1): theta_old <- d theta_old +
    # (1 - d) theta with d = min(0.001 * step, 0.5) after `step` optimizer steps (two per epoch here).
    # Epoch 1 from theta_old = initial theta, whose B is zero: theta_old's B = (1 - 0.002) theta's B.
    # Epoch 2 from epoch 1's theta_old (the resumed run equals the straight one bitwise, so `first` is the
    # straight run after one epoch). float32 blend: 1 ulp-level differences.
    for k in theta1:
        if "lora_b" in k:
            np.testing.assert_allclose(old1[k], (1 - 0.002) * theta1[k], rtol=1e-6, atol=1e-9, err_msg=k)
        np.testing.assert_allclose(old2[k], 0.004 * old1[k] + (1 - 0.004) * theta2[k], rtol=1e-6, atol=1e-9,
                                   err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in old1.items() if "lora_b" in k)
    assert not all(np.array_equal(old2[k], theta2[k]) for k in theta2)  # a blend, not a copy

    # One counter (epochs done) names the checkpoints, LoRA exports, metrics steps and grids, zero-padded alike.
    a = tmp_path / "a"
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["epoch_000001", "epoch_000002"]
    assert sorted(p.name for p in (a / "lora").iterdir()) == ["epoch_000001", "epoch_000002"]
    assert sorted(p.name for p in (a / "samples").iterdir()) == [
        "eval_000000.png", "eval_000002.png", "train_000001.png", "train_000002.png"]
    lines = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "reward_mean" in x] == [1, 2]
    assert [x["optimizer_step"] for x in lines if "reward_mean" in x] == [2, 4]
    assert [x["step"] for x in lines if "eval/reward_mean" in x] == [0, 2]
    assert sorted(straight["eval"]) == [0, 2]
    assert straight["checkpoint"] == str((a / "checkpoints" / "epoch_000002").absolute())
    assert straight["lora"] == str(a / "lora" / "epoch_000002")
    table = train.format_summary(straight)
    assert "epoch 0" in table and "epoch 2" in table and "success_rate" in table
    assert straight["checkpoint"] in table and straight["lora"] in table and "tensorboard --logdir" in table

    # A finished run started again says so in one line and writes nothing.
    before = _files(tmp_path / "b")
    again = train.run(c)
    message = train.format_summary(again)
    assert "already finished" in message and "2/2 epochs" in message and "\n" not in message
    assert _files(tmp_path / "b") == before
    metrics = straight["last"]
    for name in ("reward_mean", "train/policy_loss", "train/kl_div", "train/old_deviate", "train/x0_norm",
                 "train/grad_norm", "zero_std_ratio", "banned_rows", "time/rollout", "images_per_s"):
        assert name in metrics and np.isfinite(metrics[name]), name
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
    c.compile_cache_dir = str(tmp_path / "xla")
    asked = []  # the field reaches the cache set-up (tests/test_compile_cache.py checks the set-up itself)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compile_cache, "use", lambda setting: asked.append(setting))
        out = train.run(c, max_epochs=1)
    assert out["last"]["invalid_rewards"] == 4  # sample 3 of each of the 4 rollout calls (16 samples, 4 per call)
    assert asked == [str(tmp_path / "xla")]


# Wall times of whole `python -m edit_r1_jax.train` runs in fresh clones on the build machine (2 idle cores,
# README "Quick start"): the per-unit figures in train.MEASURED must add up to them.
# Fresh clone and venv of eba7cc6, 2026-12-04: "" with the compile cache empty, "long" with it off.
WHOLE_RUNS_S = {"": 113.0, "long": 297.0}


@pytest.mark.parametrize("variant", sorted(WHOLE_RUNS_S))
def test_start_up_estimate_adds_up_to_measured_runs(variant):
    c = toy.get_config(variant)
    measured = train.MEASURED[("toy", "cpu")]
    got = train.expected_seconds(c, c.num_epochs, measured, warm=True)
    assert abs(got - WHOLE_RUNS_S[variant]) <= 0.1 * WHOLE_RUNS_S[variant], (variant, got)


def test_toy_variants_compose_and_unknown_ones_are_named():
    quick, long, control = toy.get_config(), toy.get_config("long"), toy.get_config("long,lr0")
    assert long.num_epochs > quick.num_epochs and long.warmup.steps > quick.warmup.steps
    assert control.train.learning_rate == 0.0 < long.train.learning_rate
    assert control.num_epochs == long.num_epochs and control.warmup.steps == long.warmup.steps
    assert len({quick.run_dir, long.run_dir, control.run_dir}) == 3  # no run resumes another's checkpoints
    with pytest.raises(ValueError, match="unknown variant 'fast'; known: long, lr0"):
        toy.get_config("long,fast")
