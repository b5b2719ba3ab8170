"""models/attention.py: the blocked "flash" kernel and the splash (Pallas, interpret mode) path against
jax.nn.dot_product_attention (XLA), outputs and gradients; implementation selection and its log line."""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edit_r1_jax.models import attention as attn_mod
from edit_r1_jax.models.attention import attention, flash_attention, resolve_implementation

# float32: both sides are exact softmax attention; they differ only in summation order (blockwise max rescaling,
# split reductions over key blocks), observed <= 6e-7 of the largest value. 1e-5 relative to the largest
# reference value leaves room for that and still catches any wrong mask, scale or block bookkeeping (those give
# errors of order 1e-1).
F32_TOL = 1e-5
# bf16 inputs and outputs: each side rounds q/k/v products, probabilities (cast to bf16 before P@V, as jax does)
# and outputs to bf16 (8-bit mantissa, 2^-8 = 4e-3 relative) at different points; observed ~4e-3 of the max.
BF16_TOL = 2e-2


def _inputs(B, Lq, Lk, H, Hk, D, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, Lq, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, Lk, Hk, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, Lk, Hk, D), jnp.float32).astype(dtype)
    g = jax.random.normal(ks[3], (B, Lq, H, D), jnp.float32).astype(dtype)
    return q, k, v, g


def _out_and_grads(fn, q, k, v, g):
    def run(q, k, v, g):  # jitted: op-by-op dispatch of the vjp would dominate the test time
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))
    return jax.jit(run)(q, k, v, g)


def _assert_close(got, want, tol, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        scale = np.abs(b).max()
        err = np.abs(a - b).max()
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} * {scale:.3g}"


def _xla(mask):
    m = None if mask is None else jnp.asarray(mask)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=m)


def _causal_padding(B, L):
    """[B, 1, L, L] as the Qwen2.5-VL language model builds it: causal, left padding keys masked, padding
    queries attend to themselves."""
    lengths = np.array([L, L - 7, L - 20][:B])
    valid = np.arange(L)[None] >= (L - lengths)[:, None]
    mask = np.tril(np.ones((L, L), bool))[None] & valid[:, None, :]
    return jnp.asarray((mask | np.eye(L, dtype=bool)[None])[:, None])


def _segment_mask(cu, n):
    """Block-diagonal [n, n] mask of the Qwen2.5-VL vision window attention (segments cu[i]:cu[i+1])."""
    seg = np.searchsorted(cu, np.arange(n), side="right")
    return seg[:, None] == seg[None, :]


def _fully_masked_rows(B, H, Lq, Lk):
    m = np.array(jax.random.bernoulli(jax.random.PRNGKey(7), 0.6, (B, H, Lq, Lk)))
    m[:, :, 3] = False  # a fully masked query row
    m[:, 1, :, 5] = False  # and a key nobody in head 1 sees
    return m


CASES = {
    # name: (B, Lq, Lk, H, Hk, D, mask builder or None, block)
    "odd_lengths_batch_gqa": (2, 37, 53, 4, 2, 8, None, 16),
    "causal_padding_gqa": (3, 45, 45, 4, 2, 16, lambda: _causal_padding(3, 45), 16),
    "window_block_diagonal": (1, 50, 50, 2, 2, 16,
                              lambda: _segment_mask(np.array([0, 16, 20, 37, 50]), 50)[None, None], 16),
    "per_head_mask_fully_masked_rows": (2, 37, 53, 4, 2, 8, lambda: _fully_masked_rows(2, 4, 37, 53), 16),
    # [B, 1, 1, Lk], as the Qwen-Image DiT passes its text padding: kept as a mask over keys (query axis 1)
    "key_padding": (2, 37, 53, 4, 4, 8, lambda: (np.arange(53)[None] < np.array([53, 40])[:, None])[:, None, None],
                    16),
    # the same with GQA and a batch element whose every key is masked (all its rows fully masked: uniform, and no
    # gradient reaches q or k), through the key-bias path's any-key-kept factor (D = 16: a power-of-two scale, so
    # bf16 takes the key-bias path too)
    "key_padding_gqa_all_masked": (2, 37, 53, 4, 2, 16,
                                   lambda: (np.arange(53)[None] < np.array([30, 0])[:, None])[:, None, None], 16),
}


@pytest.mark.parametrize("head_loop", [True, False], ids=["head_loop", "vmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_flash_matches_xla_float32(case, head_loop):
    """Both ways of mapping the per-head kernel: one head at a time (the CPU default) and batched (accelerators)."""
    B, Lq, Lk, H, Hk, D, make_mask, block = CASES[case]
    mask = None if make_mask is None else make_mask()
    q, k, v, g = _inputs(B, Lq, Lk, H, Hk, D)
    m = None if mask is None else jnp.asarray(mask)
    got = _out_and_grads(lambda q, k, v: flash_attention(q, k, v, m, block_q=block, block_k=block,
                                                         head_loop=head_loop), q, k, v, g)
    _assert_close(got, _out_and_grads(_xla(mask), q, k, v, g), F32_TOL)


def test_flash_default_blocks_and_non_power_of_two_scale():
    """The default block sizes of both mappings (several blocks at these lengths only for the batched one; one
    ragged block for the loop), and a head size whose 1/sqrt(D) is not a power of two (bf16 then scales the
    float32 logits instead of q)."""
    q, k, v, g = _inputs(2, 300, 530, 6, 3, 24)
    want = _out_and_grads(_xla(None), q, k, v, g)
    for head_loop in (True, False):
        got = _out_and_grads(lambda q, k, v: flash_attention(q, k, v, head_loop=head_loop), q, k, v, g)
        _assert_close(got, want, F32_TOL)
    qb, kb, vb, gb = (x.astype(jnp.bfloat16) for x in (q, k, v, g))
    got = _out_and_grads(lambda q, k, v: flash_attention(q, k, v), qb, kb, vb, gb)
    _assert_close(got, _out_and_grads(_xla(None), qb, kb, vb, gb), BF16_TOL)


def test_flash_fully_masked_row_matches_xla_semantics():
    """A fully masked row attends uniformly to every key (jax's -0.7*finfo.max fill): output = mean of v."""
    B, Lq, Lk, H, Hk, D, make_mask, block = CASES["per_head_mask_fully_masked_rows"]
    q, k, v, _ = _inputs(B, Lq, Lk, H, Hk, D)
    out = jax.jit(lambda q, k, v, m: flash_attention(q, k, v, m, block_q=block, block_k=block))(
        q, k, v, jnp.asarray(make_mask()))
    np.testing.assert_allclose(np.asarray(out[:, 3]), np.repeat(np.asarray(v.mean(1)), H // Hk, axis=1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head_loop", [True, False], ids=["head_loop", "vmap"])
@pytest.mark.parametrize("case", ["causal_padding_gqa", "key_padding_gqa_all_masked"])
def test_flash_matches_xla_bf16(case, head_loop):
    B, Lq, Lk, H, Hk, D, make_mask, block = CASES[case]
    mask = make_mask()
    q, k, v, g = _inputs(B, Lq, Lk, H, Hk, D, dtype=jnp.bfloat16)
    got = _out_and_grads(lambda q, k, v: flash_attention(q, k, v, mask, block_q=block, block_k=block,
                                                         head_loop=head_loop), q, k, v, g)
    assert all(x.dtype == jnp.bfloat16 for x in got)
    _assert_close(got, _out_and_grads(_xla(mask), q, k, v, g), BF16_TOL)


def test_attention_entry_point_uses_flash_on_cpu_and_matches(caplog, monkeypatch):
    monkeypatch.setattr(attn_mod, "_LOGGED", set())
    q, k, v, g = _inputs(2, 45, 45, 4, 2, 16)
    mask = _causal_padding(2, 45)  # [B, 1, L, L], as the Qwen2.5-VL language model passes it
    with caplog.at_level(logging.INFO, logger="edit_r1_jax.attention"):
        got = _out_and_grads(lambda q, k, v: attention(q, k, v, mask=mask), q, k, v, g)
    assert "implementation=flash backend=cpu" in caplog.text
    assert "batched over heads (90 x 45 logits per head" in caplog.text  # 45 queries x 2 heads per kv head
    _assert_close(got, _out_and_grads(_xla(mask), q, k, v, g), F32_TOL)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edit_r1_jax.attention"):
        attention(q, k, v, mask=mask)
        attention(q, k, v, implementation="xla")
    assert "implementation=flash" not in caplog.text  # logged once only
    assert "implementation=xla backend=cpu" in caplog.text and "requested" in caplog.text


def test_flash_head_loop_choice(monkeypatch):
    """The default mapping: the head loop on one CPU device for attention large enough to gain from it; batched
    for small attention, under a multi-device mesh (the loop would make GSPMD gather a sharded batch or head
    axis) and on accelerators. Both mappings' numbers are tested above."""
    from jax.sharding import AbstractMesh, AxisType

    big = attn_mod.LOOP_MIN_LOGITS // 1024
    assert attn_mod.head_loop_choice(1024, big) == (True, "head by head")
    loop, why = attn_mod.head_loop_choice(1024, big - 1)
    assert not loop and f"1024 x {big - 1} logits per head" in why
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,))):
        assert attn_mod.head_loop_choice(1024, big)[0]
    with jax.sharding.use_abstract_mesh(AbstractMesh((4,), ("data",), axis_types=(AxisType.Auto,))):
        loop, why = attn_mod.head_loop_choice(1024, big)
        assert not loop and "a multi-device mesh is active" in why
        q, k, _, _ = _inputs(1, 1024, 1024, 2, 2, 8)
        assert "a multi-device mesh is active" in resolve_implementation(None, jnp.float32, q, k)[1]
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert not attn_mod.head_loop_choice(4096, 4096)[0]


def test_invalid_and_unavailable_implementations_raise():
    q, k, v, _ = _inputs(1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="unknown attention implementation 'flashy'"):
        attention(q, k, v, implementation="flashy")
    with pytest.raises(RuntimeError, match="'cudnn' requested but the default backend is 'cpu'"):
        attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="mask must be boolean"):
        attention(q, k, v, mask=jnp.ones((8, 8), jnp.int32))


def test_auto_selection_on_tpu_and_gpu(monkeypatch):
    """The decision table for the backends this machine lacks (the kernels themselves need the hardware)."""
    q, k, _, _ = _inputs(1, 16, 16, 4, 2, 8)
    static = np.tril(np.ones((16, 16), bool))[None, None]
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_implementation(None, jnp.bfloat16, q, k, None)[0] == "splash"
    assert resolve_implementation(None, jnp.bfloat16, q, k, static)[0] == "splash"
    traced = jax.jit(lambda m: jnp.asarray(resolve_implementation(None, jnp.bfloat16, q, k, m)[0] == "flash"))
    assert bool(traced(jnp.asarray(static)))  # a data-dependent mask goes to flash on TPU ...
    impl, reason = resolve_implementation(None, jnp.float32, q, k, static & False)
    assert impl == "flash" and "fully masked" in reason  # ... and so does one with fully masked rows
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_implementation(None, jnp.bfloat16, q, k, None)[0] == "cudnn"
    assert resolve_implementation(None, jnp.float32, q, k, None)[0] == "xla"


def test_splash_interpret_matches_xla():
    """The Pallas TPU splash kernel run in interpret mode on CPU (tiny: 2 q-blocks x 2 kv-blocks of 128, the
    off-diagonal block is empty so the block-sparse schedule skips it), GQA 2:1, lengths padded to 128."""
    B, L, H, Hk, D = 1, 200, 2, 1, 32
    mask = _segment_mask(np.array([0, 60, 128, 200]), L)[None, None]
    q, k, v, g = _inputs(B, L, L, H, Hk, D)
    got = _out_and_grads(lambda q, k, v: attention(q, k, v, mask=mask, implementation="splash", interpret=True),
                         q, k, v, g)
    _assert_close(got, _out_and_grads(_xla(mask), q, k, v, g), F32_TOL)
    # No mask, length a multiple of the block: the lazy FullMask path (one block, cheap in interpret mode).
    q, k, v, g = _inputs(1, 128, 128, 2, 2, 32, seed=1)
    got = _out_and_grads(lambda q, k, v: attention(q, k, v, implementation="splash", interpret=True), q, k, v, g)
    _assert_close(got, _out_and_grads(_xla(None), q, k, v, g), F32_TOL)


def test_splash_refuses_what_it_cannot_take():
    q, k, v, _ = _inputs(1, 16, 16, 2, 2, 8)
    with pytest.raises(ValueError, match="splash.*fully masked query rows"):
        attention(q, k, v, mask=np.zeros((16, 16), bool), implementation="splash", interpret=True)
    with pytest.raises(ValueError, match="splash.*traced"):
        jax.jit(lambda m: attention(q, k, v, mask=m, implementation="splash", interpret=True))(
            jnp.ones((1, 1, 16, 16), bool))
    with pytest.raises(ValueError, match="splash.*differs per batch element"):
        attention(jnp.concatenate([q, q]), jnp.concatenate([k, k]), jnp.concatenate([v, v]),
                  mask=np.ones((2, 1, 16, 16), bool), implementation="splash", interpret=True)


def test_key_only_mask_is_applied_in_the_logits_matmul():
    """A mask over keys only ([B, 1, 1, Lk], the Qwen-Image text padding) reaches the kernel as a key bias column
    (models/attention.py _with_key_bias): the logits matmuls contract D + KEY_BIAS_COLUMNS, and no select over a
    logit block is left; a query-dependent mask keeps the select (and D). float16 keeps the boolean mask."""
    B, L, H, D = 1, 24, 2, 8
    q, k, v, g = _inputs(B, L, L, H, H, D)
    keys = jnp.asarray(np.arange(L)[None, None, None] < 20)
    causal = jnp.asarray(np.tril(np.ones((L, L), bool))[None, None])

    def hlo(mask, dtype=jnp.float32):
        f = lambda q, k, v: flash_attention(q, k, v, mask, block_q=8, block_k=8)  # noqa: E731
        args = [x.astype(dtype) for x in (q, k, v)]
        return jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](g.astype(dtype))).lower(*args).as_text()

    def contractions(text):  # contracted sizes of the [8, 8]-block products: logits (qd,kd->qk) and dP = dO V^T
        return set(re.findall(r"\(tensor<(?:\d+x)*8x(\d+)x\w+>, tensor<(?:\d+x)*8x\1x\w+>\) -> "
                              r"tensor<(?:\d+x)*8x8xf32>", text))

    def logit_selects(text):
        return len(re.findall(r"stablehlo.select .*: tensor<(?:\d+x)*8x8xi1>, tensor<(?:\d+x)*8x8xf32>", text))

    biased, selected = hlo(keys), hlo(causal)
    assert contractions(biased) == {str(D), str(D + attn_mod.KEY_BIAS_COLUMNS)}, contractions(biased)
    assert logit_selects(biased) == 0
    assert contractions(selected) == {str(D)} and logit_selects(selected) > 0, contractions(selected)
    assert contractions(hlo(keys, jnp.float16)) == {str(D)}
