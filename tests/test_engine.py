"""engine.train_step's wiring (spec B.1, B.6, B.7): v_theta from theta (the only one differentiated), v_old from
theta_old, v_ref with the LoRA off (None), AdamW on theta, and the EMA moved towards the NEW theta with the
incremented step count.

The expected step is assembled here from the NFT loss (nft_loss.nft_step_loss, differentiated with jax.grad),
a fresh AdamW and the EMA formula of spec B.7 written out; theta, theta_old, EMA and the reference are four
different policies, so any swap among them changes the loss, the metrics or the result."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from edit_r1_jax import editors, engine
from edit_r1_jax.diffusion import latents, schedule
from edit_r1_jax.models import lora as lora_lib
from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer
from edit_r1_jax.nft import loss as nft_loss

RES, TEXT, DIM = 8, 4, 8  # 4x4 tokens of 12 features, 4 text tokens


def _perturbed(tree, seed, scale):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
    lcfg = lora_lib.LoRAConfig(rank=2, alpha=4.0)
    cfg = FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                     axes_dims_rope=(2, 2, 4), in_channels=12, joint_attention_dim=DIM, pooled_projection_dim=DIM,
                     guidance_embeds=False, lora=lcfg)
    graphdef, base, lora0 = lora_lib.split_policy(FluxTransformer(cfg, rngs=nnx.Rngs(0)))
    tokens = (RES // 2) ** 2
    policy = engine.Policy(graphdef, editors.get("kontext").velocity, latents.kontext_ids(RES // 2, RES // 2),
                           latents.text_ids(TEXT), None, (tokens, 12))
    # B = 0 at init: perturb every LoRA leaf so that theta, theta_old and the EMA differ from each other and
    # from the LoRA-off reference.
    theta, theta_old, ema = (_perturbed(lora0, s, 0.3) for s in (1, 2, 3))
    n = 4
    rng = np.random.default_rng(0)
    batch = dict(x0=jnp.asarray(rng.normal(size=(n, tokens, 12)), jnp.float32),
                 cond={"ref": jnp.asarray(rng.normal(size=(n, tokens, 12)), jnp.float32),
                       "text": jnp.asarray(rng.normal(size=(n, TEXT, DIM)), jnp.float32),
                       "pooled": jnp.asarray(rng.normal(size=(n, DIM)), jnp.float32)},
                 r=jnp.asarray([1.0, 0.0, 0.75, 0.2]), mask=jnp.ones(n),  # all valid: kl metrics share a mean
                 index=jnp.arange(10, 10 + n), sigmas=jnp.asarray(schedule.sigmas(3, tokens), jnp.float32))
    return policy, base, theta, theta_old, ema, batch


@functools.partial(jax.jit, static_argnames=("policy", "hp"))
def _expected(policy, base, params, old, ref, batch, key, hp):
    def velocity(lora, z, sigma, cond):
        return policy.velocity(base, lora, z, sigma, cond)

    data = {k: batch[k] for k in ("x0", "r", "mask", "index", "cond")}

    def loss(p):
        return nft_loss.nft_step_loss(velocity, p, old, ref, data, key, batch["sigmas"], hp)

    return jax.value_and_grad(loss, has_aux=True)(params)


def test_train_step_uses_theta_theta_old_and_lora_off(setup):
    policy, base, theta, theta_old, ema, batch = setup
    hp = nft_loss.NFTConfig(kl_weight=0.5, num_micro_batches=2)  # a KL weight large enough to see v_ref
    tx = optax.adamw(1e-2)  # no clipping: the update is AdamW's first step on the raw gradient
    key = jax.random.key(5)
    step0 = 7
    state = dict(theta=theta, theta_old=theta_old, ema=ema, opt=tx.init(theta), step=jnp.asarray(step0, jnp.int32),
                 key=key)
    copy = lambda t: jax.tree.map(jnp.array, t)  # noqa: E731 - train_step donates its state
    new, metrics = engine.train_step(policy, tx, hp, base, copy(state), batch)

    step_key = jax.random.fold_in(key, step0)  # the step's key: the run key folded with the step count
    (loss, want), grads = _expected(policy, base, theta, theta_old, None, batch, step_key, hp)
    tol = dict(rtol=1e-5, atol=1e-6)  # float32, same ops in another association order (scan vs grad of scan)
    np.testing.assert_allclose(metrics["loss"], loss, **tol)
    for name in ("policy_loss", "kl_div", "old_kl_div", "old_deviate", "x0_norm", "valid_pairs"):
        np.testing.assert_allclose(metrics[name], want[name], err_msg=name, **tol)
    np.testing.assert_allclose(metrics["grad_norm"], optax.global_norm(grads), rtol=1e-4)

    # The comparison has power: old_kl_div = mean (v_old - v_ref)^2 would be 0 if v_ref came from theta_old and
    # would equal kl_div = mean (v_theta - v_ref)^2 if theta and theta_old were swapped; both are far from it.
    assert float(want["old_kl_div"]) > 1e-4
    assert abs(float(want["old_kl_div"]) - float(want["kl_div"])) > 0.05 * float(want["kl_div"])

    # theta: one AdamW step on the gradient w.r.t. theta; theta_old untouched (it moves once per epoch).
    updates, _ = tx.update(grads, tx.init(theta), theta)
    theta_new = optax.apply_updates(theta, updates)
    for a, b in zip(jax.tree.leaves(new["theta"]), jax.tree.leaves(theta_new)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new["theta_old"]), jax.tree.leaves(theta_old)):
        np.testing.assert_array_equal(a, b)
    assert int(new["step"]) == step0 + 1
    # EMA (spec B.7): d_k = min((1 + k) / (10 + k), 0.9) with k the step after the increment, towards NEW theta.
    k = step0 + 1
    d = min((1 + k) / (10 + k), 0.9)
    for e, e0, t in zip(jax.tree.leaves(new["ema"]), jax.tree.leaves(ema), jax.tree.leaves(theta_new)):
        np.testing.assert_allclose(e, d * np.asarray(e0) + (1 - d) * np.asarray(t), rtol=1e-4, atol=1e-6)
