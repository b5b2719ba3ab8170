"""Old-policy soft update and EMA over pytrees."""

import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.nft import policies


def _tree(x):
    return {"a": jnp.full((3,), x, jnp.float32), "b": [jnp.full((2, 2), 2 * x, jnp.bfloat16)]}


@pytest.mark.parametrize("decay_type,step,expected", [
    (0, 10, 0.0), (1, 0, 0.0), (1, 7, 0.007), (1, 499, 0.499), (1, 10_000, 0.5),
    (2, 74, 0.0), (2, 75, 0.0), (2, 76, 0.0075), (2, 1000, 0.999)])
def test_decay_schedules(decay_type, step, expected):
    np.testing.assert_allclose(float(policies.old_policy_decay(step, decay_type)), expected, rtol=1e-6, atol=1e-9)


def test_bad_decay_type():
    with pytest.raises(ValueError, match="decay_type"):
        policies.old_policy_decay(1, 3)


def test_soft_update_pytree():
    out = policies.update_old_policy(_tree(1.0), _tree(3.0), 300, 1)  # d = 0.3
    np.testing.assert_allclose(np.asarray(out["a"]), 0.3 * 1 + 0.7 * 3, rtol=1e-6)
    assert out["b"][0].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["b"][0], np.float32), 0.3 * 2 + 0.7 * 6, rtol=1e-2)
    copy = policies.update_old_policy(_tree(1.0), _tree(3.0), 5, 0)
    np.testing.assert_array_equal(np.asarray(copy["a"]), 3.0)


def test_ema():
    assert float(policies.ema_decay(1)) == pytest.approx(2 / 11)
    assert float(policies.ema_decay(1000)) == pytest.approx(0.9)
    ema, p = _tree(0.0), _tree(1.0)
    for k in range(1, 4):
        ema = policies.ema_update(ema, p, k)
    d = [(1 + k) / (10 + k) for k in range(1, 4)]
    np.testing.assert_allclose(np.asarray(ema["a"]), 1 - d[0] * d[1] * d[2], rtol=1e-6)
