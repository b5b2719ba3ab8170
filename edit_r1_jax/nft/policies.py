"""theta_old soft update (spec B.8) and the evaluation EMA (spec B.7), over arbitrary pytrees of arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["old_policy_decay", "soft_update", "update_old_policy", "ema_decay", "ema_update"]


def old_policy_decay(global_step, decay_type: int):
    """Decay d of ``theta_old <- d theta_old + (1 - d) theta`` after ``global_step`` optimizer steps.

    0: d = 0 (copy); 1: ``min(0.001 step, 0.5)`` (Edit-R1 default); 2: 0 for step < 75, then
    ``min(0.0075 (step - 75), 0.999)``. ``global_step`` may be traced; returns a float32 scalar.
    """
    step = jnp.asarray(global_step, jnp.float32)
    if decay_type == 0:
        return jnp.zeros((), jnp.float32)
    if decay_type == 1:
        return jnp.minimum(0.001 * step, 0.5)
    if decay_type == 2:
        return jnp.where(step < 75, 0.0, jnp.minimum(0.0075 * (step - 75), 0.999)).astype(jnp.float32)
    raise ValueError(f"decay_type must be 0, 1 or 2, got {decay_type!r}")


def _blend(old, new, decay):
    # old + (1 - d)(new - old) == d old + (1 - d) new, computed in float32, stored in old's dtype.
    def one(o, n):
        o32 = o.astype(jnp.float32)
        return (o32 + (1.0 - decay) * (n.astype(jnp.float32) - o32)).astype(o.dtype)
    return jax.tree.map(one, old, new)


@jax.jit
def soft_update(old, new, decay):
    """``decay * old + (1 - decay) * new`` leaf-wise (same pytree structure)."""
    return _blend(old, new, jnp.asarray(decay, jnp.float32))


def update_old_policy(old, params, global_step, decay_type: int):
    """Spec B.8 once per epoch after training: returns the new theta_old."""
    return soft_update(old, params, old_policy_decay(global_step, decay_type))


def ema_decay(step):
    """``d_k = min((1 + k) / (10 + k), 0.9)`` with k = global_step after the increment."""
    k = jnp.asarray(step, jnp.float32)
    return jnp.minimum((1.0 + k) / (10.0 + k), 0.9)


@jax.jit
def ema_update(ema, params, step):
    """``ema + (1 - d_k)(params - ema)`` after optimizer step k (spec B.7)."""
    return _blend(ema, params, ema_decay(step))
