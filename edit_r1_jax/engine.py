"""The jitted pieces of an epoch, over one frozen base DiT and small LoRA pytrees.

Three policies share the base weights (spec B.1): ``theta`` (trained), ``theta_old`` (samples rollouts and is
the NFT's old policy) and ``None`` (the reference, LoRA off). ``ema`` is a fourth LoRA pytree used for
evaluation and export. Every function here takes the base parameters as an argument (never a closure
constant) so that a 12B model is not baked into the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from edit_r1_jax.diffusion import rollout as rollout_lib
from edit_r1_jax.models import lora as lora_lib
from edit_r1_jax.nft import loss as nft_loss
from edit_r1_jax.nft import policies


@dataclasses.dataclass(frozen=True)
class Policy:
    """Static description of the DiT call: graph, the model family's velocity function, position ids and
    guidance. Hashable: a jit static arg.

    ``call(model, z, sigma, cond, img_ids, txt_ids, guidance) -> v`` is a module-level function of the model
    family (``edit_r1_jax.editors``): it knows which entries ``cond`` holds (Kontext: ref/text/pooled,
    Qwen-Image-Edit: ref/text/mask); nothing here does."""

    graphdef: Any
    call: Callable
    img_ids: Any  # np [N + Nr, 3]
    txt_ids: Any  # np [T, 3]
    guidance: float | None
    latent_shape: tuple[int, int]  # (N, C) of the generated tokens

    def __hash__(self):
        return hash((self.graphdef, self.call, self.guidance, self.latent_shape, self.img_ids.tobytes(),
                     self.txt_ids.tobytes()))

    def __eq__(self, other):
        return (isinstance(other, Policy) and self.graphdef == other.graphdef and self.call == other.call
                and self.guidance == other.guidance and self.latent_shape == other.latent_shape
                and np.array_equal(self.img_ids, other.img_ids) and np.array_equal(self.txt_ids, other.txt_ids))

    def velocity(self, base, lora, z, sigma, cond):
        """v(z, sigma | cond) under base + ``lora`` (None = reference), float32."""
        b = z.shape[0]
        guidance = None if self.guidance is None else jnp.full((b,), self.guidance, jnp.float32)
        v = lora_lib.apply(self.graphdef, base, lora, z, sigma, cond, jnp.asarray(self.img_ids),
                           jnp.asarray(self.txt_ids), guidance, fn=self.call)
        return v.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("policy", "solver", "eta"))
def sample(policy: Policy, base, lora, cond, key, global_index, sigmas, solver: str, eta: float):
    """One batch of rollouts: noise keyed by global sample index, one lax.scan over the solver steps."""
    z0 = rollout_lib.initial_noise(key, global_index, policy.latent_shape)
    step_keys = rollout_lib.sample_keys(jax.random.fold_in(key, 1), global_index)

    def velocity_fn(params, z, sigma):
        return policy.velocity(base, params[0], z, sigma, params[1])

    return rollout_lib.rollout(velocity_fn, (lora, cond), z0, sigmas, solver, eta, step_keys)


def make_optimizer(c) -> optax.GradientTransformation:
    """AdamW over the LoRA of theta with global-norm clipping (spec B.6)."""
    t = c.train
    return _adamw(float(t.max_grad_norm), float(t.learning_rate), float(t.adam_b1), float(t.adam_b2),
                  float(t.adam_eps), float(t.weight_decay))


@functools.lru_cache(maxsize=None)
def _adamw(max_grad_norm, lr, b1, b2, eps, weight_decay) -> optax.GradientTransformation:
    # Cached: the optimizer is a static argument of train_step, so equal settings must give the same object
    # for jit's cache to hit (resume in the same process, tests).
    return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                       optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))


def init_state(theta, tx: optax.GradientTransformation, key) -> dict[str, Any]:
    """Training state: theta_old and EMA start as exact copies of theta (spec B.1, B.7)."""
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 - distinct buffers, donated separately
    return dict(theta=theta, theta_old=copy(theta), ema=copy(theta), opt=tx.init(theta),
                step=jnp.zeros((), jnp.int32), key=key)


@functools.partial(jax.jit, static_argnames=("policy", "tx", "hp"), donate_argnames=("state",))
def train_step(policy: Policy, tx, hp: nft_loss.NFTConfig, base, state, batch):
    """One optimizer step over all micro-batches x training timesteps of ``batch`` (accumulated in jit).

    batch: x0 [n,N,C], cond (pytree [n,...]), r [n], mask [n], index [n] (global sample index),
    sigmas [S+1] rollout grid. The loss is normalised once over every valid (sample, timestep) pair of the step
    (spec H.4); v_old and v_ref come from theta_old and from LoRA off (None) on the same base.
    """
    key = jax.random.fold_in(state["key"], state["step"])

    def velocity(lora, z, sigma, cond):
        return policy.velocity(base, lora, z, sigma, cond)

    data = {k: batch[k] for k in ("x0", "r", "mask", "index", "cond")}
    (loss, metrics), grads = nft_loss.nft_step_value_and_grad(
        velocity, state["theta"], state["theta_old"], None, data, key, batch["sigmas"], hp)
    updates, opt = tx.update(grads, state["opt"], state["theta"])
    theta = optax.apply_updates(state["theta"], updates)
    step = state["step"] + 1
    ema = policies.ema_update(state["ema"], theta, step)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return dict(state, theta=theta, opt=opt, step=step, ema=ema), metrics


@functools.partial(jax.jit, static_argnames=("decay_type",), donate_argnames=("state",))
def sync_old_policy(state, decay_type: int):
    """theta_old <- d theta_old + (1 - d) theta, once per epoch after training (spec B.8)."""
    return dict(state, theta_old=policies.update_old_policy(state["theta_old"], state["theta"], state["step"],
                                                            decay_type))
