"""Training faults (issue 11) on the tiny toy run: non-finite values stop before anything is saved, empty
epochs warn then stop, resume refuses a changed config and a corrupt step, restore_step continues exactly."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from edit_r1_jax import checkpoint as ckpt_lib
from edit_r1_jax import train
from edit_r1_jax.rewards import registry
from test_train import tiny_config

pytestmark = pytest.mark.slow


def _leaves(state):
    state = dict(state, key=jax.random.key_data(state["key"]))
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_resume_faults_and_restore_step(tmp_path):
    c = tiny_config(tmp_path)  # 2 epochs, a checkpoint after each
    straight = train.run(c)
    ckpt_dir = tmp_path / "checkpoints"
    assert ckpt_lib.Checkpointer(ckpt_dir).all_steps() == [1, 2]  # named by epochs done
    c.num_epochs = 3

    # A changed config is refused before any array is read, naming each field with both values.
    for field, value, expect in (("lora.alpha", 2.0, ["lora.alpha: checkpoint 32.0, now 2.0"]),
                                 ("lora.rank", 2, ["lora.rank: checkpoint 4, now 2"]),
                                 ("toy.num_train_rows", 24, ["toy.num_train_rows: checkpoint 16, now 24",
                                                             "dataset.num_train_rows: checkpoint 16, now 24"])):
        changed = ConfigDict(c.to_dict())
        group, name = field.split(".")
        changed[group][name] = value
        with pytest.raises(ckpt_lib.CheckpointError, match="allow_config_change=true") as e:
            train.run(changed)
        for s in expect:
            assert s in str(e.value), str(e.value)

    # A truncated file in the latest step: one error naming step, file and cause; nothing falls back.
    meta = ckpt_dir / ckpt_lib.step_name(2) / "state" / "_METADATA"
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        train.run(c)
    assert f"checkpoint step 2 in {ckpt_dir} cannot be restored: {meta}: truncated" in str(e.value)
    before = _files(ckpt_dir)

    # Restoring the older step explicitly, with a learning rate that overflows float32: the first update makes
    # theta non-finite; the run stops naming epoch, step and leaf, and no checkpoint file changes.
    bad = ConfigDict(c.to_dict())
    bad.checkpoint.update(restore_step=1, allow_config_change=True)
    bad.train.learning_rate = 1e39  # finite as a Python float, inf in float32
    with pytest.raises(train.NonFiniteError, match=r"epoch 1, optimizer step 2: LoRA parameter \S+\.lora_[ab] "
                                                   r"of theta is not finite"):
        train.run(bad)
    assert _files(ckpt_dir) == before

    # restore_step=1 with the original config (safe changes only) continues exactly: epoch 1 is redone and the
    # corrupt step 2 replaced; the result equals the uninterrupted run bitwise.
    again = ConfigDict(c.to_dict())
    again.num_epochs = 2
    again.log.image_every = 2  # safe to change: logged, allowed
    again.checkpoint.restore_step = 1
    resumed = train.run(again)
    for a, b in zip(_leaves(straight["state"]), _leaves(resumed["state"])):
        np.testing.assert_array_equal(a, b)
    assert ckpt_lib.Checkpointer(ckpt_dir).read_host(2)[1]["epoch"] == 1


def test_empty_epochs_warn_then_stop(tmp_path, caplog):
    if "test_all_masked" not in registry.default_registry.names():
        registry.default_registry.register("test_all_masked", lambda batch: np.full(len(batch["image"]), np.nan))
    c = tiny_config(tmp_path)
    c.num_epochs = 3
    c.train.max_empty_epochs = 2
    c.reward.weights = ConfigDict({"toy_edit": 1.0, "test_all_masked": 1.0})
    c.reward.on_error = "mask"
    with caplog.at_level(logging.WARNING, logger="edit_r1_jax.train"):
        with pytest.raises(train.EmptyEpochsError, match=r"epoch 1: 2 epochs in a row without a valid sample "
                                                         r"\(train.max_empty_epochs=2\); last one: 16 invalid"):
            train.run(c)
    assert "epoch 0: no valid sample (16 invalid rewards" in caplog.text and "optimizer step skipped" in caplog.text
    ck = ckpt_lib.Checkpointer(tmp_path / "checkpoints")
    assert ck.all_steps() == [1]  # the epoch-1 stop saved nothing (checkpoints are named by epochs done)
    assert ck.read_host(1)[1]["empty_epochs"] == 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epoch0 = next(x for x in lines if x.get("step") == 1 and "optimizer_step" in x)  # step = epochs done
    assert epoch0["optimizer_step"] == 0 and epoch0["train/skipped_empty_epoch"] == 1.0  # no optimizer step taken


def test_reward_error_names_epoch_split_and_dataset_row(tmp_path):
    from edit_r1_jax.data.groups import GroupSampler

    if "test_nan_at_3" not in registry.default_registry.names():
        def nan_at_3(batch):
            out = np.ones(len(batch["image"]))
            out[3] = np.nan
            return out

        registry.default_registry.register("test_nan_at_3", nan_at_3)
    c = tiny_config(tmp_path)
    c.reward.weights = ConfigDict({"toy_edit": 1.0, "test_nan_at_3": 1.0})
    s = c.sample
    row = GroupSampler(c.toy.num_train_rows, s.groups_per_batch, s.group_size, s.num_batches_per_epoch, c.seed,
                       0, 1).next_batch().row_ids[3]  # the first rollout call holds samples 0..3 of this draw
    with pytest.raises(registry.RewardError, match=rf"^epoch 0: dataset row {row} of the train split: reward "
                                                   rf"'test_nan_at_3' returned nan for sample 3"):
        train.run(c, max_epochs=1)
