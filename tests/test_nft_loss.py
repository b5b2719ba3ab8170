"""NFT loss: NumPy transcription of spec B.5, the theta = theta_old gradient identity, and the step driver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.nft import loss as nft

SIGMAS6 = np.array([1.0, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0.0])


def np_reference_loss(v, v_old, v_ref, x_t, x0, t, r, m, b, kl_w, a_max):
    """Spec B.5 written out in float64 (one micro-batch, one timestep column, masked mean)."""
    tt = t[:, None, None]
    vp = b * v + (1 - b) * v_old
    vn = (1 + b) * v_old - b * v
    x0p, x0n = x_t - tt * vp, x_t - tt * vn
    wp = np.maximum(np.abs(x0p - x0).mean(axis=(1, 2)), 1e-5)
    wn = np.maximum(np.abs(x0n - x0).mean(axis=(1, 2)), 1e-5)
    lp = ((x0p - x0) ** 2).mean(axis=(1, 2)) / wp
    ln = ((x0n - x0) ** 2).mean(axis=(1, 2)) / wn
    p = m * (r * lp + (1 - r) * ln) / b
    policy = a_max * p.sum() / m.sum() if m.sum() > 0 else 0.0
    kl = (m * ((v - v_ref) ** 2).mean(axis=(1, 2))).sum() / m.sum()
    return policy, kl, policy + kl_w * kl


def _rand(rng, *shape):
    return rng.standard_normal(shape)


@pytest.mark.parametrize("b", [1.0, 0.3])
def test_terms_match_numpy(b):
    rng = np.random.default_rng(0)
    B = 5
    x0, eps = _rand(rng, B, 6, 4), _rand(rng, B, 6, 4)
    t = rng.uniform(0.1, 1.0, B)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v, v_old, v_ref = _rand(rng, B, 6, 4), _rand(rng, B, 6, 4), _rand(rng, B, 6, 4)
    r = rng.uniform(0, 1, B)
    m = np.array([1, 0, 1, 1, 0.0])
    ref = np_reference_loss(v, v_old, v_ref, x_t, x0, t, r, m, b, 1e-4, 5.0)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    ps, ks, met = nft.nft_terms(f32(v), f32(v_old), f32(v_ref), f32(x_t), f32(x0), f32(t), f32(r), f32(m),
                                nft_beta=b, kl_weight=1e-4, adv_clip_max=5.0)
    count = float(met["count"])
    assert count == 3
    # float32 vs float64 on O(1) sums of 24-element means: 1e-5 relative.
    np.testing.assert_allclose(float(ps) / count, ref[0], rtol=1e-5)
    np.testing.assert_allclose(float(ks) / count, ref[1], rtol=1e-5)
    np.testing.assert_allclose(float(met["loss_sum"]) / count, ref[2], rtol=1e-5)
    np.testing.assert_allclose(float(met["old_deviate_max"]), ((v - v_old) ** 2).max(), rtol=1e-5)
    np.testing.assert_allclose(float(met["old_kl_sum"]) / B, ((v_old - v_ref) ** 2).mean(), rtol=1e-5)


def test_gradient_at_old_policy_is_weighted_flow_matching():
    """At theta = theta_old, d/dtheta of the NFT policy loss equals the gradient of the advantage-weighted FM
    regression sum_i m_i A_i t_i^2 / (w_i D) ||v*_i - v_i||^2 (spec B.5 note), independent of b."""
    rng = np.random.default_rng(1)
    B, L, C = 6, 5, 3
    W = jnp.asarray(rng.standard_normal((C, C)) * 0.5, jnp.float32)
    x0 = jnp.asarray(rng.standard_normal((B, L, C)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((B, L, C)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.2, 1.0, B), jnp.float32)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    adv = jnp.asarray([-5.0, -2.0, 0.5, 1.0, 3.0, 5.0], jnp.float32)
    r = adv / 10 + 0.5
    m = jnp.asarray([1, 1, 1, 0, 1, 1], jnp.float32)
    vel = lambda w: x_t @ w
    v_old = vel(W)
    v_ref = jnp.zeros_like(v_old)

    grads = []
    for b in (1.0, 0.25):
        def f(w):
            ps, _, _ = nft.nft_terms(vel(w), v_old, v_ref, x_t, x0, t, r, m, nft_beta=b, kl_weight=0.0,
                                     adv_clip_max=5.0)
            return ps
        grads.append(jax.grad(f)(W))

    wgt = jnp.mean(jnp.abs((x_t - t[:, None, None] * v_old) - x0), axis=(1, 2))
    D = L * C

    def fm(w):
        v_star = eps - x0
        per = jnp.sum((v_star - vel(w)) ** 2, axis=(1, 2))
        return jnp.sum(m * adv * t ** 2 / (wgt * D) * per)

    g_fm = jax.grad(fm)(W)
    assert float(jnp.abs(g_fm).max()) > 1e-2
    for g in grads:  # float32, ~1e-5 relative
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_fm), rtol=2e-4, atol=2e-5)


def _linear_velocity(params, x_t, t, cond):
    return x_t @ params["w"] + t[:, None, None] * params["b"] + cond[:, None, :]


def _step_setup(n=8, L=4, C=3, seed=2):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((C, C)) * 0.3, jnp.float32),
              "b": jnp.asarray(rng.standard_normal((C,)) * 0.3, jnp.float32)}
    old = jax.tree.map(lambda p: p + 0.05, params)
    ref = jax.tree.map(jnp.zeros_like, params)
    batch = {"x0": jnp.asarray(rng.standard_normal((n, L, C)), jnp.float32),
             "r": jnp.asarray(rng.uniform(0, 1, n), jnp.float32),
             "mask": jnp.asarray(np.array([1, 1, 0, 1, 1, 1, 0, 1.0])[:n], jnp.float32),
             "index": jnp.arange(n) + 40,
             "cond": jnp.asarray(rng.standard_normal((n, C)) * 0.1, jnp.float32)}
    return params, old, ref, batch


def test_step_loss_equals_explicit_sum_and_grads_agree():
    params, old, ref, batch = _step_setup()
    key = jax.random.key(3)
    cfg = nft.NFTConfig(num_micro_batches=2, kl_weight=0.1, nft_beta=0.7)
    loss, met = jax.jit(lambda p: nft.nft_step_loss(_linear_velocity, p, old, ref, batch, key, SIGMAS6, cfg))(
        params)
    # Independent recomputation: every (sample, slot) pair with the documented t / eps, one global normaliser.
    t_all = nft.train_timesteps(key, batch["index"], SIGMAS6, cfg)
    assert t_all.shape == (8, 5)
    for row in np.asarray(t_all):  # a permutation of the grid truncated to 5: distinct grid values
        assert len(set(row.tolist())) == 5 and set(row.tolist()) <= set(np.float32(SIGMAS6[:-1]).tolist())
    total = 0.0
    x0, idx = np.asarray(batch["x0"], np.float64), batch["index"]
    for j in range(5):
        t = np.asarray(t_all[:, j], np.float64)
        eps = np.asarray(nft.train_noise(key, idx, j, x0.shape[1:]), np.float64)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        vf = lambda p: np.asarray(_linear_velocity(p, jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32),
                                                   batch["cond"]), np.float64)
        m = np.asarray(batch["mask"], np.float64)
        pol, kl, _ = np_reference_loss(vf(params), vf(old), vf(ref), x_t, x0, t, np.asarray(batch["r"], np.float64),
                                       m, 0.7, 0.1, 5.0)
        total += (pol + 0.1 * kl) * m.sum()
    expected = total / (5 * 6)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(met["total_loss"]), expected, rtol=1e-5)
    assert float(met["valid_pairs"]) == 30

    g1 = jax.jit(jax.grad(lambda p: nft.nft_step_loss(_linear_velocity, p, old, ref, batch, key, SIGMAS6,
                                                      cfg)[0]))(params)
    (loss2, met2), g2 = jax.jit(lambda p: nft.nft_step_value_and_grad(_linear_velocity, p, old, ref, batch, key,
                                                                       SIGMAS6, cfg))(params)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.abs(np.asarray(a)).max() > 1e-4
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_step_loss_independent_of_micro_batching():
    params, old, ref, batch = _step_setup()
    key = jax.random.key(5)
    losses = [float(nft.nft_step_loss(_linear_velocity, params, old, ref, batch, key, SIGMAS6,
                                      nft.NFTConfig(num_micro_batches=k))[0]) for k in (1, 2, 4)]
    np.testing.assert_allclose(losses, losses[0], rtol=1e-6)


def test_uniform_mode_and_all_masked():
    params, old, ref, batch = _step_setup()
    cfg = nft.NFTConfig(timestep_mode="uniform", num_train_timesteps=3)
    t = np.asarray(nft.train_timesteps(jax.random.key(0), batch["index"], SIGMAS6, cfg))
    assert t.shape == (8, 3) and np.all((t >= 0) & (t < 1)) and len(np.unique(t)) == 24
    batch = dict(batch, mask=jnp.zeros(8))
    loss, met = nft.nft_step_loss(_linear_velocity, params, old, ref, batch, jax.random.key(0), SIGMAS6, cfg)
    assert float(loss) == 0.0 and np.isfinite(float(met["old_deviate"]))
    with pytest.raises(ValueError, match="T_train"):
        nft.train_timesteps(jax.random.key(0), batch["index"], SIGMAS6, nft.NFTConfig(timestep_fraction=0.1))
