"""Checkpoint faults (issue 11) on real orbax step folders: truncated or empty files in the latest step give one
error naming the step, the file and the cause; an older step restores only on request; config comparison."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax import checkpoint as ckpt_lib


def _two_steps(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", max_to_keep=3)
    state = {"a": jnp.arange(16.0).reshape(4, 4), "b": jnp.ones(3)}
    ck.save(0, state, {"epoch": 0})
    ck.save(1, jax_tree_add(state, 1.0), {"epoch": 1})
    ck.close()
    return state


def jax_tree_add(t, x):
    return {k: v + x for k, v in t.items()}


# Every file orbax reads back in a restore (the per-process scratch database is merged at save and never read).
CASES = [("host/metadata", "empty"), ("host/metadata", "half"), ("state/_METADATA", "empty"),
         ("state/_METADATA", "half"), ("state/manifest.ocdbt", "empty"), ("state/manifest.ocdbt", "half"),
         ("state/d/*", "half"), ("state/array_metadatas/process_0", "empty"),
         ("state/array_metadatas/process_0", "half")]


@pytest.mark.parametrize("rel,how", CASES)
def test_corrupt_latest_step_is_named_and_older_step_restores_on_request(tmp_path, rel, how):
    state = _two_steps(tmp_path)
    step_dir = tmp_path / "ckpt" / ckpt_lib.step_name(1)
    files = sorted(step_dir.glob(rel))
    assert files, rel
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(0 if how == "empty" else f.stat().st_size // 2)
    ck = ckpt_lib.Checkpointer(tmp_path / "ckpt", max_to_keep=3)
    assert ck.latest_step() == 1
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ck.restore(ckpt_lib.abstract_like(state))
    msg = str(e.value)
    assert msg.startswith(f"checkpoint step 1 in {tmp_path / 'ckpt'} cannot be restored")
    assert str(files[0]) in msg, msg  # the file
    assert "Cause:" in msg and "restore_step=N (steps: [0])" in msg
    # No silent fallback above; asked for explicitly, the older intact step comes back exactly.
    restored, host = ck.restore(ckpt_lib.abstract_like(state), step=0)
    assert host == {"epoch": 0}
    for k in state:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    ck.close()


def test_missing_step_lists_the_steps(tmp_path):
    state = _two_steps(tmp_path)
    ck = ckpt_lib.Checkpointer(tmp_path / "ckpt")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step 7 not found .*steps there: \[0, 1\]"):
        ck.restore(ckpt_lib.abstract_like(state), step=7)
    ck.close()


def test_config_changes_split_blocking_from_safe():
    saved = ckpt_lib.flatten({"lora": {"rank": 4, "alpha": 8.0, "targets": ("to_q",)}, "num_epochs": 2,
                              "log": {"image_every": 1}, "sample": {"group_size": 4}})
    now = ckpt_lib.flatten({"lora": {"rank": 4, "alpha": 16.0, "targets": ["to_q"]}, "num_epochs": 5,
                            "log": {"image_every": 3}, "sample": {"group_size": 4}})
    blocking, safe = ckpt_lib.config_changes(saved, now)
    assert blocking == ["lora.alpha: checkpoint 8.0, now 16.0"]
    assert safe == ["log.image_every: checkpoint 1, now 3", "num_epochs: checkpoint 2, now 5"]
