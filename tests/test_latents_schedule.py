"""Pack/unpack vs diffusers' FluxKontextPipeline helpers, Kontext ids, and the spec A.4 sigma tables."""

import numpy as np
import pytest
import torch

from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

from edit_r1_jax.diffusion import latents as L
from edit_r1_jax.diffusion import schedule


def test_pack_matches_diffusers_and_roundtrips():
    rng = np.random.default_rng(0)
    nchw = rng.standard_normal((2, 16, 6, 10)).astype(np.float32)
    ref = FluxKontextPipeline._pack_latents(torch.from_numpy(nchw), 2, 16, 6, 10).numpy()
    ours = L.pack(nchw.transpose(0, 2, 3, 1))
    assert ours.shape == (2, 15, 64)
    np.testing.assert_array_equal(ours, ref)  # pure permutation: exact
    # explicit feature rule c*4 + dy*2 + dx at token (row=1, col=2)
    tok = 1 * 5 + 2
    for c, dy, dx in [(0, 0, 0), (3, 1, 0), (15, 1, 1), (7, 0, 1)]:
        assert ours[1, tok, c * 4 + dy * 2 + dx] == nchw[1, c, 2 + dy, 4 + dx]
    back = L.unpack(ours, 6, 10)
    np.testing.assert_array_equal(back, nchw.transpose(0, 2, 3, 1))
    ref_unpack = FluxKontextPipeline._unpack_latents(torch.from_numpy(ref), 6 * 8, 10 * 8, 8).numpy()
    np.testing.assert_array_equal(back.transpose(0, 3, 1, 2), ref_unpack)


def test_pack_works_on_jax_arrays():
    import jax.numpy as jnp

    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(np.asarray(L.pack(jnp.asarray(x))), L.pack(x))
    with pytest.raises(ValueError):
        L.pack(x[:, :3])
    with pytest.raises(ValueError):
        L.unpack(L.pack(x), 4, 6)


def test_ids_match_diffusers():
    ref = FluxKontextPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(L.image_ids(3, 5, 0), ref)
    ref_img = ref.copy()
    ref_img[:, 0] = 1
    k = L.kontext_ids(3, 5)
    assert k.shape == (30, 3) and k.dtype == np.float32
    np.testing.assert_array_equal(k, np.concatenate([ref, ref_img]))
    assert k[15 + 7].tolist() == [1.0, 1.0, 2.0]  # reference token 7 = row 1, col 2; spatial ids not offset
    np.testing.assert_array_equal(L.text_ids(128), np.zeros((128, 3), np.float32))


def test_sigma_tables_from_spec():
    # spec A.4 tables (rounded to 4 decimals there)
    s6 = schedule.sigmas(6, 1024)
    assert s6.shape == (7,) and s6.dtype == np.float64 and s6[-1] == 0.0
    np.testing.assert_allclose(s6, [1.0, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0], atol=6e-5)
    s15 = schedule.sigmas(15, 1024)
    np.testing.assert_allclose(
        s15, [1.0, .9634, .9243, .8825, .8378, .7897, .7380, .6821, .6216, .5559, .4842, .4057, .3195, .2241,
              .1183, 0], atol=6e-5)
    assert schedule.mu_for(1024) == pytest.approx(0.63)
    assert schedule.mu_for(1024) == pytest.approx(calculate_shift(1024, 256, 4096, 0.5, 1.15))
    np.testing.assert_allclose(schedule.timesteps(6, 1024), 1000 * s6[:6])
    with pytest.raises(ValueError):
        schedule.sigmas(0, 1024)


@pytest.mark.parametrize("n,seq", [(6, 1024), (15, 1024), (28, 4096), (4, 16)])
def test_sigmas_match_diffusers_scheduler(n, seq):
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq, 256, 4096, 0.5, 1.15))
    # diffusers keeps float32 tensors: 1e-6 covers float32 rounding of values in [0, 1]
    np.testing.assert_allclose(schedule.sigmas(n, seq), sched.sigmas.numpy(), atol=1e-6)
    np.testing.assert_allclose(schedule.timesteps(n, seq), sched.timesteps.numpy(), rtol=1e-6)
