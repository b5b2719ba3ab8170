"""Solver steps and the scanned rollout against NumPy float64 transcriptions of spec A.5."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.diffusion import rollout as rollout_lib
from edit_r1_jax.diffusion import solvers
from devices import env as device_env

# Spec A.4, N=6 at 512^2 (4 decimals as printed in the spec).
SIGMAS6 = np.array([1.0, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0.0])
# float32 solver arithmetic vs float64 references on O(1) values: 1e-5 abs/rel is ~100 ulp of headroom.
TOL = dict(rtol=1e-5, atol=1e-5)


def _rand(seed, shape=(2, 8, 4)):
    return np.random.default_rng(seed).standard_normal(shape)


def np_flow(z, v, s, t, sigma1, eta, xi):
    dt = t - s
    sp = sigma1 if s == 1 else s
    std = eta * np.sqrt(s / (1 - sp))
    mean = z * (1 + std ** 2 / (2 * s) * dt) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt
    return mean + std * np.sqrt(-dt) * xi


def np_dance(z, v, s, t, eta, xi):
    dt = t - s
    x0 = z - s * v
    score = -(z - (1 - s) * x0) / s ** 2
    return z + dt * v - 0.5 * eta ** 2 * score * dt + eta * np.sqrt(s - t) * xi


def np_ddim(z, v, s, t, eta, xi):
    x0 = z - s * v
    eps = (z - (1 - s) * x0) / s
    std = eta * t
    d = np.sqrt(1 - t ** 2 * (1 - s) ** 2 / (s ** 2 * (1 - t) ** 2))
    rho = std * d
    return (1 - t) * x0 + np.sqrt(t ** 2 - rho ** 2) * eps + rho * xi


@pytest.mark.parametrize("i", [0, 1, 3, 5])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_flow_dance_ddim_single_step(i, eta):
    z, v, xi = _rand(0), _rand(1), _rand(2)
    s, t = SIGMAS6[i], SIGMAS6[i + 1]
    for name, ref in [("flow", np_flow(z, v, s, t, SIGMAS6[1], eta, xi)),
                      ("dance", np_dance(z, v, s, t, eta, xi)),
                      ("ddim", np_ddim(z, v, s, t, eta, xi))]:
        out, _ = solvers.step(name, jnp.asarray(z, jnp.float32), jnp.asarray(v, jnp.float32), jnp.int32(i),
                              jnp.asarray(SIGMAS6, jnp.float32), (), lambda: jnp.asarray(xi, jnp.float32), eta)
        np.testing.assert_allclose(np.asarray(out), ref, **TOL, err_msg=name)
        if eta == 0.0:  # every SDE collapses to Euler
            np.testing.assert_allclose(np.asarray(out), z + (t - s) * v, **TOL, err_msg=name)


def np_dpm_rollout(vel, z, sigmas, order):
    """Literal spec A.5 DPM-Solver++ loop in float64, with the reference's inf arithmetic (numpy allows it)."""
    n = len(sigmas) - 1
    alpha = lambda sg: 1 - sg
    with np.errstate(divide="ignore"):
        lam = lambda sg: np.log(alpha(sg) / sg)
        m_prev = None
        for i in range(n):
            s, t = sigmas[i], sigmas[i + 1]
            v = vel(z, s)
            m_cur = z - s * v
            eps_hat = (z - (1 - s) * m_cur) / s
            if i == 0 or i == n - 1:
                z_next = (1 - t) * m_cur + t * eps_hat
            else:
                h = lam(t) - lam(s)
                if order == 1:
                    z_next = (t / s) * z - alpha(t) * (np.exp(-h) - 1) * m_cur
                else:
                    h0 = lam(s) - lam(sigmas[i - 1])
                    r0 = h0 / h
                    d1 = (m_cur - m_prev) / r0  # r0 = inf at i = 1 -> d1 = 0
                    z_next = (t / s) * z - alpha(t) * (np.exp(-h) - 1) * m_cur \
                        - 0.5 * alpha(t) * (np.exp(-h) - 1) * d1
            m_prev = m_cur
            z = z_next
    return z


def _nonlinear_velocity(w):
    # A velocity that depends non-trivially on z and sigma, so that multistep corrections are exercised.
    def np_vel(z, s):
        return np.tanh(z @ w) * (1 + s) - 0.3 * z

    def jax_vel(params, z, sigma):
        return jnp.tanh(z @ params) * (1 + sigma[:, None, None]) - 0.3 * z

    return np_vel, jax_vel


@pytest.mark.parametrize("solver,order", [("dpm1", 1), ("dpm2", 2)])
def test_dpm_rollout_on_spec_table(solver, order):
    w = _rand(3, (4, 4)) * 0.5
    z0 = _rand(4)
    np_vel, jax_vel = _nonlinear_velocity(w)
    ref = np_dpm_rollout(np_vel, z0, SIGMAS6, order)
    out = jax.jit(lambda p, z: rollout_lib.rollout(jax_vel, p, z, SIGMAS6, solver))(
        jnp.asarray(w, jnp.float32), jnp.asarray(z0, jnp.float32))
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)  # 6 chained f32 steps


def test_dpm2_differs_from_dpm1_and_last_step_is_x0_hat():
    w = _rand(3, (4, 4)) * 0.5
    z0 = _rand(4)
    np_vel, jax_vel = _nonlinear_velocity(w)
    a = np_dpm_rollout(np_vel, z0, SIGMAS6, 1)
    b = np_dpm_rollout(np_vel, z0, SIGMAS6, 2)
    assert np.abs(a - b).max() > 1e-3  # the second-order correction is active on the table
    # The last step returns x0_hat exactly: z_N = z_{N-1} - sigma_{N-1} v.
    _, traj = rollout_lib.rollout(jax_vel, jnp.asarray(w, jnp.float32), jnp.asarray(z0, jnp.float32), SIGMAS6,
                                  "dpm2", return_trajectory=True)
    z_last = np.asarray(traj[-2], np.float64)
    v_last = np_vel(z_last, SIGMAS6[-2])
    np.testing.assert_allclose(np.asarray(traj[-1]), z_last - SIGMAS6[-2] * v_last, rtol=1e-5, atol=1e-5)


def test_dpm2_first_two_steps_are_euler():
    w = _rand(3, (4, 4)) * 0.5
    np_vel, jax_vel = _nonlinear_velocity(w)
    z0 = _rand(5)
    _, traj = rollout_lib.rollout(jax_vel, jnp.asarray(w, jnp.float32), jnp.asarray(z0, jnp.float32), SIGMAS6,
                                  "dpm2", return_trajectory=True)
    z = z0
    for i in range(2):
        z = z + (SIGMAS6[i + 1] - SIGMAS6[i]) * np_vel(z, SIGMAS6[i])
        np.testing.assert_allclose(np.asarray(traj[i + 1]), z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("solver", ["flow", "dance", "ddim"])
def test_stochastic_rollout_matches_loop(solver):
    w = _rand(3, (4, 4)) * 0.5
    np_vel, jax_vel = _nonlinear_velocity(w)
    z0 = _rand(6)
    key = jax.random.key(0)
    keys = rollout_lib.sample_keys(key, jnp.arange(2))
    out = rollout_lib.rollout(jax_vel, jnp.asarray(w, jnp.float32), jnp.asarray(z0, jnp.float32), SIGMAS6,
                              solver, eta=0.7, key=keys)
    ref_step = {"flow": lambda z, v, s, t, xi: np_flow(z, v, s, t, SIGMAS6[1], 0.7, xi),
                "dance": lambda z, v, s, t, xi: np_dance(z, v, s, t, 0.7, xi),
                "ddim": lambda z, v, s, t, xi: np_ddim(z, v, s, t, 0.7, xi)}[solver]
    z = z0
    for i in range(6):
        xi = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(keys[b], i), (8, 4))) for b in range(2)])
        z = ref_step(z, np_vel(z, SIGMAS6[i]), SIGMAS6[i], SIGMAS6[i + 1], xi)
    np.testing.assert_allclose(np.asarray(out), z, rtol=1e-4, atol=1e-4)


def test_dpm_rejects_eta():
    with pytest.raises(ValueError, match="requires eta == 0"):
        rollout_lib.rollout(lambda p, z, s: z, None, jnp.zeros((1, 2, 2)), SIGMAS6, "dpm2", eta=0.7)


_NOISE_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from edit_r1_jax.diffusion.rollout import initial_noise
    devs = jax.devices()
    mesh = Mesh(np.array(devs), ("data",))
    idx = jax.device_put(jnp.arange(16, dtype=jnp.int32) + 100, NamedSharding(mesh, P("data")))
    f = jax.jit(lambda i: initial_noise(jax.random.key(7), i, (4, 3)),
                out_shardings=NamedSharding(mesh, P("data")))
    out = np.asarray(f(idx))
    np.save(sys.argv[1], out)
    print(len(devs))
""")


def test_initial_noise_independent_of_device_count(tmp_path):
    outs = []
    for n in (1, 8):
        env = device_env(n)
        path = tmp_path / f"noise{n}.npy"
        res = subprocess.run([sys.executable, "-c", _NOISE_SCRIPT, str(path)], env=env, capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().splitlines()[-1] == str(n)
        outs.append(np.load(path))
    np.testing.assert_array_equal(outs[0], outs[1])
    # Per-sample: sample with global index 105 equals a single-sample draw.
    single = np.asarray(rollout_lib.initial_noise(jax.random.key(7), jnp.array([105]), (4, 3)))
    np.testing.assert_array_equal(single[0], outs[0][5])


def test_flow_rollout_at_eta0_is_euler():
    """The editors' Euler ODE is the ``flow`` rollout at eta 0: z <- z + (t - s) v(z, s), against a NumPy loop."""
    sig = np.array([1.0, 0.7, 0.3, 0.0])
    z0 = np.full((2, 3, 1), 2.0, np.float32)
    z = rollout_lib.rollout(lambda p, z, s: z * s[:, None, None] + p, 1.0, jnp.asarray(z0), sig, "flow", 0.0)
    expect = z0.astype(np.float64)
    for s, t in zip(sig[:-1], sig[1:]):
        expect = expect + (t - s) * (expect * s + 1.0)
    np.testing.assert_allclose(np.asarray(z), expect, rtol=1e-6)  # float32 arithmetic over 3 steps
