"""Scaled dot-product attention shared by all edit_r1_jax models.

``attention(q, k, v, *, mask=None, implementation=None)`` takes ``q``/``k``/``v`` of shape ``[B, L, H, D]``
(``k``/``v`` may have fewer heads for GQA; query head ``h`` reads kv head ``h // (H // Hkv)``, as ``repeat_kv``) and
returns ``[B, Lq, H, D]`` in ``q.dtype``. ``mask`` is boolean, broadcastable to ``[B, H, Lq, Lk]``, True = attend.
Logits are accumulated and the softmax statistics are kept in float32 whatever the input dtype, on every path.

``implementation``:
    * ``None`` / ``"auto"``: GPU with bf16/fp16 inputs -> ``"cudnn"``; TPU -> ``"splash"`` when the mask is
      static (see below), else ``"flash"``; CPU and GPU with float32 -> ``"flash"`` on CPU (measured faster than
      XLA there, ``bench/attention.py``), ``"xla"`` on GPU float32 (not measured). Every choice is logged once with
      its reason.
    * ``"xla"``: ``jax.nn.dot_product_attention``'s XLA implementation (materialises the [B, H, Lq, Lk] logits).
    * ``"flash"``: :func:`flash_attention`, plain JAX, blocked over queries and keys with an online softmax and a
      custom VJP that recomputes the probabilities block by block (FlashAttention-2 backward; only the output and
      two float32 statistics per query row are saved). Runs on every backend. The kernel works on one kv head at
      a time with plain 2-D matmuls; on the CPU it is mapped over batch x heads in a loop (XLA:CPU runs a large
      2-D matmul on every core, a batched one much slower), elsewhere batched with ``vmap``. A mask over keys only
      (``[B, 1, 1, Lk]``, e.g. text padding) is applied as a bias column inside the logits matmul where q is
      pre-scaled (float32; bf16 with a power-of-two scale), other masks by a select on each logit block.
    * ``"cudnn"``: cuDNN fused attention (GPU, bf16/fp16 only); raises if unavailable (never a silent fallback).
    * ``"splash"``: the Pallas TPU *splash* attention kernel (``jax.experimental.pallas.ops.tpu.splash_attention``).
      It takes no mask, or a mask whose value is known at trace time (built from numpy/constants, e.g. the
      Qwen2.5-VL vision window masks) and that is the same for every batch element and has no fully masked row;
      splash turns it into a block-sparse schedule. A traced (data-dependent) mask, such as the language model's
      padding mask, is refused with a ValueError (auto mode sends it to ``"flash"`` and logs why).
      Pass ``interpret=True`` to run the kernel in Pallas interpret mode (CPU tests).

Fully masked query rows: every path here returns what ``jax.nn.dot_product_attention`` returns, i.e. the masked
logits are replaced by ``-0.7 * float32_max`` so such a row attends uniformly to all keys (its output is the mean
of ``v``; its gradient reaches ``v`` only). splash refuses static masks with such rows.

Which implementation runs is logged once per (implementation, backend, dtype) via the python logger
``edit_r1_jax.attention`` (INFO).
"""

from __future__ import annotations

import logging
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

logger = logging.getLogger("edit_r1_jax.attention")

_LOGGED: set = set()
_LOCK = threading.Lock()
_VALID = (None, "auto", "xla", "flash", "cudnn", "splash")
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The value jax.nn.dot_product_attention writes into masked float32 logits (jax/_src/nn/functions.py
# _get_large_negative); using the same one makes fully masked rows agree with it.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def _log_once(impl: str, backend: str, dtype, reason: str) -> None:
    key = (impl, backend, str(dtype), reason)
    with _LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    logger.info("attention implementation=%s backend=%s dtype=%s (%s)", impl, backend, dtype, reason)


# ------------------------------------------------------------------------------------------------ flash (plain JAX)


def _loop(n, body, init):
    """``body(i, carry)`` for i < n: inline when there is a single block, else a ``fori_loop`` (one compiled body
    whatever the length, so the program stays small under 57 DiT blocks)."""
    if n == 1:
        return body(0, init)
    return lax.fori_loop(0, n, body, init)


def _blk(x, i, size, axis):
    if isinstance(i, int):
        return lax.slice_in_dim(x, i * size, (i + 1) * size, axis=axis)
    return lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _put(buf, x, i, size, axis):
    return lax.dynamic_update_slice_in_dim(buf, x, i * size, axis=axis)


def _scores(qi, kj, maskb, j, bk, lk, lkp, scale, biased=False):
    """float32 logits of one [rows, bk] block (rows = query heads sharing the kv head x block queries);
    user-masked -> _MASKED (as jax), padded keys -> -inf (never count). ``biased``: q and k carry the key bias
    column (_with_key_bias), which already did both."""
    s = jnp.einsum("qd,kd->qk", qi, kj, preferred_element_type=jnp.float32)
    if scale != 1.0:
        s = s * scale
    if maskb is not None:
        s = jnp.where(maskb, s, _MASKED)
    if lkp != lk and not biased:
        col = lax.broadcasted_iota(jnp.int32, s.shape, 1) + j * bk
        s = jnp.where(col < lk, s, -jnp.inf)
    return s


def _rows(x, i, bq):
    """Query block i of a per-head array [G, Lqp, ...] as rows [G * bq, ...] (G query heads share one kv head)."""
    x = _blk(x, i, bq, 1)
    return x.reshape(x.shape[0] * bq, *x.shape[2:])


def _mask_rows(mask, i, j, bq, bk, g):
    """Mask block (i, j) of a per-head mask [Gm, Lqp or 1, Lkp] (Gm 1 or G; a query axis of 1 is a mask over keys
    only, e.g. padding) as rows [G * bq, bk]."""
    if mask is None:
        return None
    mb = _blk(mask if mask.shape[1] == 1 else _blk(mask, i, bq, 1), j, bk, 2)
    return jnp.broadcast_to(mb, (g, bq, bk)).reshape(g * bq, bk)


# A mask over keys only (the Qwen-Image text padding: [B, 1, 1, Lk]) is applied inside the logits matmul: q gets a
# column of ones and k a column holding the key's bias (0 = attend, _MASKED = masked, -inf = padding), padded with
# zeros to a multiple of 8 columns, so QK^T yields the masked logits directly. On XLA:CPU the select over every
# [rows, bk] logit block was a pass of its own (the block feeds both the row max and the exp): attention forward
# 4 heads x 128 over 2176 keys 0.127 s masked against 0.103 s unmasked; the extra 8 columns cost ~6% of the logits
# matmul only. The values are those of the select: q.k + 0 = q.k for a kept key, and q.k + _MASKED rounds to
# _MASKED (|q.k| is far below half an ulp of 2.4e38), so a fully masked row is still uniform.
KEY_BIAS_COLUMNS = 8


def _with_key_bias(q, k, bias):
    """q [G, Lqp, D] and k [Lkp, D] of one kv head with the bias column (bias [Lkp] float32) appended."""
    G, Lqp, _ = q.shape
    pad = KEY_BIAS_COLUMNS - 1
    qa = jnp.concatenate([q, jnp.ones((G, Lqp, 1), q.dtype), jnp.zeros((G, Lqp, pad), q.dtype)], -1)
    ka = jnp.concatenate([k, bias[:, None].astype(k.dtype), jnp.zeros((k.shape[0], pad), k.dtype)], -1)
    return qa, ka


def _key_bias(mask):
    """A key-only mask [Gm, 1, Lkp] of one kv head as the bias [Lkp]; None for any other mask."""
    if mask is None or mask.dtype == jnp.bool_:
        return None
    return mask[0, 0]


def _head_fwd(q, k, v, mask, scale, bq, bk, lk):
    """One kv head: q [G, Lqp, D], k/v [Lkp, D], mask None or bool [Gm, Lqp, Lkp].
    Returns out [G, Lqp, D] (q.dtype), row max m and row sum l ([G, Lqp], float32)."""
    G, Lqp, D = q.shape
    Lkp = k.shape[0]
    nq, nk = Lqp // bq, Lkp // bk
    bias = _key_bias(mask)
    qs, ks = (q, k) if bias is None else _with_key_bias(q, k, bias)
    mask = None if bias is not None else mask

    def q_body(i, carry):
        out, ms, ls = carry
        qi = _rows(qs, i, bq)

        def k_body(j, c):
            m, l, acc = c
            s = _scores(qi, _blk(ks, j, bk, 0), _mask_rows(mask, i, j, bq, bk, G), j, bk, lk, Lkp, scale,
                        bias is not None)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)  # m starts at -inf; block 0 always holds a real key, so m_new is finite
            p = jnp.exp(s - m_new[:, None])
            pv = jnp.einsum("qk,kd->qd", p.astype(v.dtype), _blk(v, j, bk, 0), preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[:, None] * acc + pv

        rows = G * bq
        m, l, acc = _loop(nk, k_body, (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
                                       jnp.zeros((rows, D), jnp.float32)))
        o = (acc / l[:, None]).astype(q.dtype).reshape(G, bq, D)
        m, l = m.reshape(G, bq), l.reshape(G, bq)
        if nq == 1:
            return o, m, l
        return _put(out, o, i, bq, 1), _put(ms, m, i, bq, 1), _put(ls, l, i, bq, 1)

    return _loop(nq, q_body, (jnp.zeros(q.shape, q.dtype), jnp.zeros((G, Lqp), jnp.float32),
                              jnp.zeros((G, Lqp), jnp.float32)))


def _head_bwd(q, k, v, mask, o, m, l, do, scale, bq, bk, lk):
    """FlashAttention-2 backward for one kv head (shapes as _head_fwd): outer loop over key blocks (dk, dv of the
    block accumulate in the carry), inner over query blocks (dq accumulates in place). Returns float32
    dq [G, Lqp, D], dk, dv [Lkp, D].

    With E = exp(s - m) recomputed per block, P = E / l. The row factor 1/l is moved onto dO and delta once per
    head ([L, D] work) instead of onto every probability block ([L, L]): dV = P^T dO = E^T (dO / l) and
    dS = P * (dP - delta) = E * ((dO / l) V^T - delta / l). (Not logsumexp either: in a fully masked row
    m = -2.4e38 and m + log(Lk) rounds back to m, which would lose the 1/Lk of the uniform row.)"""
    G, Lqp, D = q.shape
    Lkp = k.shape[0]
    nq, nk = Lqp // bq, Lkp // bk
    bias = _key_bias(mask)
    qs, ks = (q, k) if bias is None else _with_key_bias(q, k, bias)
    mask = None if bias is not None else mask
    # With the key bias a masked logit gets e = exp(_MASKED - m) = 0, hence dS = 0, unless every key of the head is
    # masked (every row fully masked, e = 1): then no logit has a gradient, as below for the boolean mask.
    any_kept = None if bias is None else (jnp.max(bias) == 0.0).astype(jnp.float32)
    inv_l = 1.0 / l
    do32 = do.astype(jnp.float32)
    delta = jnp.sum(do32 * o.astype(jnp.float32), -1) * inv_l  # rowsum(dO * O) / l = rowsum(P * dP) / l
    do = (do32 * inv_l[..., None]).astype(do.dtype)

    # dK and dV contract the query rows: computed transposed, dK^T = Q^T dS and dV^T = (dO/l)^T E, from Q^T and
    # (dO/l)^T transposed once per head ([D, L]), so both are plain [D, rows] x [rows, bk] matmuls (as dK = dS^T Q
    # they ran in XLA:CPU's Eigen dot beside the other three; FLUX bench/dit.py forward+backward 2.19 -> 2.13 s).
    qt = jnp.transpose(q, (2, 0, 1))  # [D, G, Lqp]
    dot_ = jnp.transpose(do, (2, 0, 1))

    # XLA:CPU has no bf16 x bf16 -> f32 kernel for this form: there the half-precision operands are widened to
    # float32 first (exact: the products and the float32 accumulation are the same numbers).
    widen = jnp.dtype(q.dtype) in _HALF and jax.default_backend() == "cpu"

    def t_rows(x, i):  # [D, G, Lqp] -> [D, G * bq] (query block i of every head in the group)
        x = _blk(x, i, bq, 2).reshape(D, G * bq)
        return x.astype(jnp.float32) if widen else x

    def t_dot(a, b):  # [D, rows] x [rows, bk] -> [D, bk], float32
        b = b.astype(jnp.float32) if widen else b
        return jnp.einsum("dq,qk->dk", a, b, preferred_element_type=jnp.float32)

    def k_body(j, carry):
        dq, dkt, dvt = carry
        kj, vj, ksj = _blk(k, j, bk, 0), _blk(v, j, bk, 0), _blk(ks, j, bk, 0)

        def q_body(i, c):
            dq, dktj, dvtj = c
            qsi, doi = _rows(qs, i, bq), _rows(do, i, bq)
            mb = _mask_rows(mask, i, j, bq, bk, G)
            s = _scores(qsi, ksj, mb, j, bk, lk, Lkp, scale, bias is not None)
            e = jnp.exp(s - _rows(m, i, bq)[:, None])
            dvtj = dvtj + t_dot(t_rows(dot_, i), e.astype(do.dtype))
            dp = jnp.einsum("qd,kd->qk", doi, vj, preferred_element_type=jnp.float32)
            ds = e * (dp - _rows(delta, i, bq)[:, None])
            if mb is not None:  # masked logits are constants: no gradient (matters only in fully masked rows)
                ds = jnp.where(mb, ds, 0.0)
            if any_kept is not None:
                ds = ds * any_kept
            ds = (ds * scale).astype(q.dtype)
            dqi = jnp.einsum("qk,kd->qd", ds, kj, preferred_element_type=jnp.float32).reshape(G, bq, D)
            dktj = dktj + t_dot(t_rows(qt, i), ds)
            dq = dq + dqi if nq == 1 else _put(dq, _blk(dq, i, bq, 1) + dqi, i, bq, 1)
            return dq, dktj, dvtj

        zero = jnp.zeros((D, bk), jnp.float32)
        dq, dktj, dvtj = _loop(nq, q_body, (dq, zero, zero))
        if nk == 1:
            return dq, dktj, dvtj
        return dq, _put(dkt, dktj, j, bk, 1), _put(dvt, dvtj, j, bk, 1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros((D, Lkp), jnp.float32), jnp.zeros((D, Lkp), jnp.float32))
    dq, dkt, dvt = _loop(nk, k_body, init)
    return dq, dkt.T, dvt.T


def _map_axis(f, loop, xs, mask):
    """f(x, mask_x) over axis 0 of every array in xs, and of mask where its axis 0 is longer than 1 (a length-1
    axis is shared by every step). ``loop``: one step at a time (lax.map), else batched (jax.vmap)."""
    if mask is None or mask.shape[0] == 1:
        shared = None if mask is None else mask[0]
        g = lambda x: f(x, shared)  # noqa: E731
        return lax.map(g, xs) if loop else jax.vmap(g)(xs)
    return lax.map(lambda a: f(*a), (xs, mask)) if loop else jax.vmap(f)(xs, mask)


def _per_head(f, loop, xs, mask):
    """f(xs_bh, mask_bh) for every (batch, kv head): xs have leading [B, Hk]; mask None or [Bm, Hm, Gm, Lqp, Lkp]
    with Bm in (1, B), Hm in (1, Hk)."""
    return _map_axis(lambda xb, mb: _map_axis(lambda x, m: f(*x, m), loop, xb, mb), loop, xs, mask)


def _block_size(length: int, block: int, multiple: int = 8) -> tuple[int, int]:
    """(block, padded length): as few blocks as ``block`` allows, sized evenly so padding stays small."""
    n = -(-length // block)
    b = -(-(-(-length // n)) // multiple) * multiple
    return b, n * b


# Block sizes (block_q x block_k), per way of mapping the kernel over heads. Head by head ("loop", the CPU
# default): 1088x2176. First tuned on a 2-core XLA:CPU machine (8 heads x 64 over 2176 tokens and 24 x 128 over 4608)
# beside 256x512, 384/512x1152, 512x768, 512/1088x2176, 1088x1088, 768x1536 and 1152x576, where 640x1152 was fastest
# or tied and smaller blocks fell below the size at which XLA runs a matmul on both cores. Re-tuned on 2026-12-02
# on a 2-core Sapphire Rapids build machine (XLA:CPU's YNNPACK dot path, ~270 GFLOP/s matmul peak), all in one
# process per case, after the backward took its transposed form: 4 x 128 over 2176 tokens, forward / forward+backward
# 640x1152 0.060 / 0.193 s, 1088x1088 0.056 / 0.192, 320x2176 0.059 / 0.198, 640x2176 0.056 / 0.186, 2176x2176
# 0.060 / 0.218, 1088x2176 0.053-0.054 / 0.181 s; 24 x 128 over 4608: 640x1152 1.76 / 4.78 s, 1088x2176 1.42 /
# 4.63 s. Batched over heads ("vmap"): 256x512 was fastest on the first CPU before the head loop; on accelerators
# this path is only the fallback (module docstring). Re-tune with bench/attention.py --blocks.
LOOP_BLOCKS = (1088, 2176)
BATCHED_BLOCKS = (256, 512)


# Below this many logits per (batch, kv head) (query rows x keys) the loop's per-step cost outweighs the larger
# matmuls: measured on XLA:CPU (2 cores), batched won at 136 tokens (the toy DiT; 2.3x faster forward), tied at
# 300, and the loop won from 600 tokens up (1.6x forward+backward at 600, 1.8x at 2176).
LOOP_MIN_LOGITS = 512 * 512


def head_loop_choice(q_rows: int, k_len: int) -> tuple[bool, str]:
    """(loop?, why) for flash_attention's default mapping over heads, given the query rows per kv head
    (query length x query heads per kv head) and the key length. The loop runs on the CPU backend, for
    attention of at least LOOP_MIN_LOGITS logits per head, unless a mesh of more than one device is active
    (``jax.set_mesh``): the loop slices the batch and head axes one index at a time, and GSPMD would gather a
    sharded batch or head axis onto every device to do that (checked: the compiled program all-gathers q, k
    and v); batched, they stay sharded."""
    if jax.default_backend() != "cpu":
        return False, "batched over heads"
    mesh = jax.sharding.get_abstract_mesh()
    if not (mesh is None or mesh.empty or mesh.size <= 1):
        return False, "batched over heads (a multi-device mesh is active: the head loop would gather sharded axes)"
    if q_rows * k_len < LOOP_MIN_LOGITS:
        return False, f"batched over heads ({q_rows} x {k_len} logits per head: below the head loop's size)"
    return True, "head by head"


def flash_attention(q, k, v, mask=None, *, block_q: int | None = None, block_k: int | None = None,
                    head_loop: bool | None = None):
    """Blocked attention in plain JAX (see the module docstring). q/k/v ``[B, L, H, D]``, mask bool broadcastable to
    ``[B, H, Lq, Lk]``. Lengths need not divide the blocks: inputs are padded and padded keys never count.

    The kernel is written for one kv head (its G query heads stacked as rows, so every product is a plain 2-D
    matmul). ``head_loop`` maps it over batch x kv heads one head at a time (``lax.map``) instead of batched
    (``jax.vmap``, batched matmuls over all heads at once). ``None`` = loop on the CPU, where XLA runs a large
    2-D matmul on all cores but a batched one slower (bench/attention.py), batched elsewhere (accelerators, and
    small attention or a multi-device mesh: see head_loop_choice). ``block_q`` / ``block_k`` default to LOOP_BLOCKS or
    BATCHED_BLOCKS accordingly, the default ``block_q`` divided by G (a block holds G query heads' rows)."""
    B, Lq, H, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    loop = head_loop_choice(Lq * G, Lk)[0] if head_loop is None else bool(head_loop)
    default_q, default_k = LOOP_BLOCKS if loop else BATCHED_BLOCKS
    bq, Lqp = _block_size(Lq, block_q or max(default_q // G, 8))
    bk, Lkp = _block_size(Lk, block_k or default_k)
    scale = 1.0 / math.sqrt(D)
    # q is scaled once ([L, D]) instead of every logit block ([L, L]: one pass less per block, ~7% of the forward
    # on the CPU), where that costs no precision the reference keeps: float32, or a power-of-two scale (exact).
    # Otherwise (bf16 with D = 128) the float32 logits are scaled, as jax.nn.dot_product_attention does.
    pre = jnp.dtype(q.dtype) == jnp.float32 or math.log2(scale).is_integer()
    logit_scale = 1.0 if pre else scale

    def heads_major(x, lp):  # [B, L, h, D] -> [B, h, Lp, D]: contiguous per-head blocks
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, lp - x.shape[2]), (0, 0))) if lp != x.shape[2] else x

    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        Bm, Hm, Lm = mask.shape[0], mask.shape[1], mask.shape[2]
        lm, lmp = (1, 1) if Lm == 1 else (Lq, Lqp)  # a key-only mask keeps its query axis of 1 (never broadcast)
        mask = jnp.broadcast_to(mask, (Bm, Hm, lm, Lk))
        mask = mask.reshape(Bm, Hk, G, lm, Lk) if Hm == H else mask.reshape(Bm, 1, 1, lm, Lk)
        if (lm == 1 and mask.shape[2] == 1 and pre
                and jnp.dtype(q.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))):
            # Over keys only, the same for every query head of a kv head: a key bias (see _with_key_bias). Only where
            # q is pre-scaled: logits scaled after the matmul would be (q.k + _MASKED) * scale, and with the scaling
            # contracted into the exp's subtraction (an FMA) a fully masked row's equal logits no longer cancel
            # (exp of half an ulp of 8e37). float16 cannot hold _MASKED. Both keep the boolean mask.
            mask = jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)
            if Lkp != Lk:
                mask = jnp.pad(mask, ((0, 0),) * 4 + ((0, Lkp - Lk),), constant_values=-jnp.inf)
        elif (lmp, Lkp) != (lm, Lk):
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, lmp - lm), (0, Lkp - Lk)))

    def fwd(q, k, v, mask):
        qh = heads_major(q * jnp.asarray(scale, q.dtype) if pre else q, Lqp).reshape(B, Hk, G, Lqp, D)
        kh, vh = heads_major(k, Lkp), heads_major(v, Lkp)
        o, m, l = _per_head(lambda q, k, v, mk: _head_fwd(q, k, v, mk, logit_scale, bq, bk, Lk), loop, (qh, kh, vh),
                            mask)
        out = jnp.swapaxes(o.reshape(B, H, Lqp, D)[:, :, :Lq], 1, 2)
        return out, (qh, kh, vh, mask, o, m, l)

    def bwd(res, g):
        qh, kh, vh, mask, o, m, l = res
        do = heads_major(g, Lqp).reshape(B, Hk, G, Lqp, D)
        dq, dk, dv = _per_head(
            lambda q, k, v, o, m, l, do, mk: _head_bwd(q, k, v, mk, o, m, l, do, logit_scale, bq, bk, Lk),
            loop, (qh, kh, vh, o, m, l, do), mask)
        dq = dq * scale if pre else dq  # the kernel's dq is d/d(scaled q)
        dq = jnp.swapaxes(dq.reshape(B, H, Lqp, D)[:, :, :Lq], 1, 2).astype(q.dtype)
        dk = jnp.swapaxes(dk[:, :, :Lk], 1, 2).astype(k.dtype)
        dv = jnp.swapaxes(dv[:, :, :Lk], 1, 2).astype(v.dtype)
        return dq, dk, dv, None

    @jax.custom_vjp
    def core(q, k, v, mask):
        return fwd(q, k, v, mask)[0]

    core.defvjp(fwd, bwd)
    return core(q, k, v, mask)


# ------------------------------------------------------------------------------------------------ splash (TPU Pallas)


def _static_mask(mask):
    """The mask as numpy if its value is known at trace time, else None."""
    if mask is None:
        return None
    try:
        return np.asarray(mask)
    except jax.errors.TracerArrayConversionError:
        return None


def _splash_problem(q, k, mask) -> str | None:
    """Why splash cannot take these inputs (None if it can)."""
    if q.shape[2] % k.shape[2]:
        return f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads"
    if mask is None:
        return None
    m = _static_mask(mask)
    if m is None:
        return "the mask is traced (data-dependent); splash needs a mask known at trace time"
    if m.shape[0] != 1:
        return f"the mask differs per batch element (shape {m.shape}); splash takes one mask for the batch"
    full = np.broadcast_to(m, (1, m.shape[1], q.shape[1], k.shape[1]))
    if not full.any(-1).all():
        return "the mask has fully masked query rows"
    return None


def _splash_attention(q, k, v, mask, *, interpret: bool, block: int = 128):
    """q/k/v [B, L, H, D] through the splash MHA kernel (vmapped over the batch). Lengths are padded to the
    128-lane block; padded keys are masked out, padded queries attend to key 0 and are dropped."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, Lq, H, D = q.shape
    Lk, Hk = k.shape[1], k.shape[2]
    Lqp, Lkp = -(-Lq // block) * block, -(-Lk // block) * block
    if mask is None and (Lqp, Lkp) == (Lq, Lk):
        head_masks = [sa.FullMask((Lq, Lk))] * H  # lazy: no dense [Lq, Lk] array
    else:
        m = np.ones((1, Lq, Lk), bool) if mask is None else _static_mask(mask)[0]
        m = np.broadcast_to(m, (m.shape[0], Lq, Lk))
        padded = np.zeros((m.shape[0], Lqp, Lkp), bool)
        padded[:, :Lq, :Lk] = m
        padded[:, Lq:, 0] = True
        # One mask object per distinct head mask (splash deduplicates them): a head-shared mask stays one array.
        per = [sa.NumpyMask(padded[h]) for h in range(padded.shape[0])]
        head_masks = per * H if len(per) == 1 else per
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sa.make_splash_mha(sa.MultiHeadMask(head_masks), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)

    def prep(x, lp):  # [B, L, h, D] -> [B, h, Lp, D]
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, lp - x.shape[2]), (0, 0)))

    qh = prep(q * jnp.asarray(1.0 / math.sqrt(D), q.dtype), Lqp)  # splash does not scale the logits
    out = jax.vmap(kernel)(qh, prep(k, Lkp), prep(v, Lkp))
    return jnp.swapaxes(out[:, :, :Lq], 1, 2)


# ------------------------------------------------------------------------------------------------ selection


def resolve_implementation(implementation: str | None, dtype, q=None, k=None, mask=None) -> tuple[str, str]:
    """Returns (implementation, reason) that ``attention`` will use. ``q``/``k``/``mask`` are needed to judge
    whether splash can take the inputs (TPU, or when splash is requested)."""
    if implementation not in _VALID:
        raise ValueError(f"unknown attention implementation {implementation!r}; expected one of {_VALID}")
    backend = jax.default_backend()
    half = jnp.dtype(dtype) in _HALF
    if implementation == "cudnn":
        if backend != "gpu":
            raise RuntimeError(f"attention implementation 'cudnn' requested but the default backend is {backend!r}")
        if not half:
            raise RuntimeError(f"attention implementation 'cudnn' requires bf16/fp16 inputs, got {jnp.dtype(dtype)}")
        return "cudnn", "requested"
    if implementation == "splash":
        problem = _splash_problem(q, k, mask) if q is not None else None
        if problem:
            raise ValueError(f"attention implementation 'splash' cannot take these inputs: {problem}")
        return "splash", "requested"
    if implementation in ("xla", "flash"):
        return implementation, "requested"
    # auto
    if backend == "gpu":
        if half:
            return "cudnn", "auto: GPU with half-precision inputs"
        return "xla", f"auto: GPU, dtype {jnp.dtype(dtype)} is not supported by cuDNN flash attention"
    if backend == "tpu":
        problem = _splash_problem(q, k, mask) if q is not None else None
        if problem:
            return "flash", f"auto: TPU but splash cannot take the inputs ({problem}); blocked plain-JAX attention"
        return "splash", "auto: TPU, Pallas splash attention"
    how = "" if q is None else ", " + head_loop_choice(q.shape[1] * (q.shape[2] // k.shape[2]), k.shape[1])[1]
    return "flash", f"auto: backend {backend}, blocked plain-JAX attention{how} (faster than XLA's there)"


def attention(q, k, v, *, mask=None, implementation: str | None = None, interpret: bool = False):
    """Multi-head attention on ``[B, L, H, D]`` tensors; ``mask`` is a boolean array broadcastable to
    ``[B, H, Lq, Lk]`` (True = attend). Scale is ``1/sqrt(D)``. ``interpret`` runs splash in Pallas interpret
    mode (CPU tests only)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, L, H, D] inputs, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: incompatible q{q.shape} k{k.shape} v{v.shape} (kv heads must divide q heads)")
    if mask is not None:
        mask = jnp.asarray(mask) if _static_mask(mask) is None else np.asarray(mask)
        if mask.dtype != bool:
            raise ValueError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
        if mask.ndim > 4:
            raise ValueError(f"attention mask must broadcast to [B, H, Lq, Lk], got shape {mask.shape}")
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if mask.shape[1] not in (1, q.shape[2]):
            raise ValueError(f"attention mask heads {mask.shape[1]} must be 1 or {q.shape[2]}")
    impl, reason = resolve_implementation(implementation, q.dtype, q, k, mask)
    _log_once(impl, jax.default_backend(), q.dtype, reason)
    if impl == "flash":
        out = flash_attention(q, k, v, None if mask is None else jnp.asarray(mask))
    elif impl == "splash":
        out = _splash_attention(q, k, v, mask, interpret=interpret)
    else:
        jmask = None if mask is None else jnp.asarray(mask)
        try:
            out = jax.nn.dot_product_attention(q, k, v, mask=jmask, implementation=impl)
        except Exception as e:  # never fall back silently
            if impl == "cudnn":
                raise RuntimeError(f"cuDNN attention failed for q{q.shape} {q.dtype}: {e}") from e
            raise
    return out.astype(q.dtype)
