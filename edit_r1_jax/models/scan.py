"""Repeated layers as one stacked module run under ``jax.lax.scan`` (one compiled block instead of L).

Any model with L identical blocks uses two calls::

    from edit_r1_jax.models import scan

    # construction: one block built under nnx.vmap, every parameter gets a leading axis L
    self.transformer_blocks = scan.stack(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)

    # forward: carry = fn(block_i, carry, xs_i) for i in 0..L-1 (block_i: a Block holding layer i's arrays)
    x = scan.run(self.transformer_blocks, x, lambda blk, x, _: blk(x, cos, sin),
                 remat_policy=policy, use_scan=cfg.scan_layers)

``make_block`` must create every random parameter from the ``rngs`` it is given (not from a closure over an outer
``Rngs``) and must not depend on the layer index (all L blocks share one graph); a per-layer difference such as
"full or window attention" travels as ``xs`` (a pytree of arrays with leading axis L) read inside ``fn``.
Blocks must be pure in their parameters (no variable written in the forward: the per-layer view is discarded).

Key convention (checkpoints on disk keep the per-layer layout of the PyTorch reference):
    stacked parameter ``transformer_blocks.<rest>`` with shape ``[L, *s]`` and logical axes ``("layers", *axes)``
    <-> per-layer keys ``transformer_blocks.{i}.<rest>`` with shape ``s`` and logical axes ``axes``.
Each stacked variable carries the metadata ``stacked_depth = len(<rest>)`` (path entries below the stacked module)
so that any flat path can be mapped to its per-layer keys without knowing the model: ``layer_keys``,
``unstack_flat`` (state -> per-layer dict) and ``stack_flat`` (per-layer dict -> state). ``weights.flat_shapes``,
``weights.load_state`` (streaming: each host reads only its shards of each layer), ``lora.lora_to_flat`` /
``lora_from_flat`` and the planner go through them. The logical axis "layers" is replicated
(``parallel.rules``).

``use_scan=False`` runs the same stacked parameters in a python loop (one block inlined per layer): the reference
for tests (scan == loop) and for ``bench/compile.py`` (compile time before/after). Outside ``jax.jit`` (eager,
nothing traced) ``run`` always loops, logged once: eager code keeps its op-by-op numerics.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYERS = "layers"  # logical axis name of the stacked dimension (replicated: see parallel/rules.py)
DEPTH = "stacked_depth"  # variable metadata: number of path entries after the stacked module
log = logging.getLogger(__name__)

# Config name -> ``jax.checkpoint`` policy for ``run(..., remat_policy=...)`` (shared by the models' configs).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stack(make_block: Callable[[nnx.Rngs], nnx.Module], num: int, rngs: nnx.Rngs) -> nnx.Module | None:
    """``num`` blocks ``make_block(rngs_i)`` (independent random init) as one module with stacked variables.
    ``num == 0`` gives None (``run`` then returns the carry unchanged)."""
    if num < 0:
        raise ValueError(f"scan.stack: number of layers must be >= 0, got {num}")
    if num == 0:
        return None

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return make_block(r)

    blocks = create(rngs)
    for path, v in nnx.to_flat_state(nnx.state(blocks)):
        axes = v.get_metadata().get("logical_axes")
        if axes is None:
            axes = (None,) * (v.get_value().ndim - 1)
        v.set_metadata(logical_axes=(LAYERS,) + tuple(axes), **{DEPTH: len(path)})
    blocks.__class__ = _stacked_class(type(blocks))
    return blocks


class _StackedMixin:
    """Makes a stacked block indexable like the ``nnx.List`` it replaces: ``blocks[i]`` / ``for b in blocks`` give
    per-layer views (layer i's slices of the stacked arrays; reading them is fine, writing does not reach the
    stack), ``len(blocks)`` the number of layers. Calling the stacked module itself is not meaningful: use
    ``run``."""

    __slots__ = ()  # same instance layout as the block class, so __class__ can be swapped

    def __len__(self):
        return num_layers(self)

    def __getitem__(self, i: int):
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"layer {i} out of range for {n} stacked layers")
        graphdef, stacked, rest = nnx.split(self, lambda path, v: is_stacked(v), ...)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked), rest)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


_STACKED_CLASSES: dict[type, type] = {}


def _stacked_class(cls: type) -> type:
    # One subclass per block class, cached: graphdefs (jit static arguments) compare node types by identity.
    if issubclass(cls, _StackedMixin):
        return cls
    if cls not in _STACKED_CLASSES:
        _STACKED_CLASSES[cls] = type(f"Stacked{cls.__name__}", (cls, _StackedMixin),
                                      {"__module__": cls.__module__, "__slots__": ()})
    return _STACKED_CLASSES[cls]


def depth(v) -> int | None:
    """``stacked_depth`` of a stacked variable, None for an ordinary one."""
    if not isinstance(v, nnx.Variable):
        return None
    return v.get_metadata().get(DEPTH)


def is_stacked(v) -> bool:
    return depth(v) is not None


def num_layers(blocks: nnx.Module) -> int:
    for _, v in nnx.to_flat_state(nnx.state(blocks)):
        if is_stacked(v):
            return int(v.get_value().shape[0])
    raise ValueError(f"{type(blocks).__name__} has no stacked variables: build it with scan.stack")


# ---------------------------------------------------------------------------------------------------------
# Running.


def run(blocks: nnx.Module | None, carry: Any, fn: Callable[[nnx.Module, Any, Any], Any], *, xs: Any = None,
        remat_policy: Callable | None = None, use_scan: bool = True) -> Any:
    """``carry = fn(block_i, carry, xs_i)`` for every layer i of ``blocks`` (built by ``stack``); returns carry.

    ``xs``: pytree whose leaves have leading axis L (per-layer inputs, e.g. a flag), or None. ``remat_policy``:
    None = no rematerialisation, else a ``jax.checkpoint`` policy (``jax.checkpoint_policies.nothing_saveable``,
    ``dots_saveable``, ...); each layer is rematerialised on its own, as a per-block ``jax.checkpoint`` would.
    Works inside ``jax.grad`` / ``jax.jit``: the module is split into (graphdef, state) and merged per layer, so
    nothing is written back into ``blocks`` (``nnx.remat`` / ``nnx.scan`` write variables back into the
    enclosing module, which fails when that module was merged inside a ``jax.grad`` trace, as in ``lora.apply``;
    static flags such as a disabled LoRA branch travel in the graphdef).
    """
    if blocks is None:
        return carry
    graphdef, stacked, rest = nnx.split(blocks, lambda path, v: is_stacked(v), ...)
    length = num_layers(blocks)

    def step(carry, layer_state, x):
        return fn(nnx.merge(graphdef, layer_state, rest), carry, x)

    remat = remat_policy is not None
    if use_scan and not _traced((carry, stacked, xs)):
        # Outside jit (eager, op by op) a lax.scan would still compile its body as one program, changing the
        # op-by-op numerics eager callers rely on; scanning only pays off in a compiled program anyway.
        _log_once("scan.run outside jax.jit: layers run op by op in a python loop (scan applies under jit)")
        use_scan = False
    if use_scan and length == 1:
        use_scan = False  # a one-layer scan compiles the same block plus a loop around it: nothing to gain
    if use_scan:
        body = jax.checkpoint(step, policy=remat_policy, prevent_cse=False) if remat else step

        def scan_body(c, inp):
            return body(c, *inp), None

        carry, _ = jax.lax.scan(scan_body, carry, (stacked, xs), length=length)
        return carry
    body = jax.checkpoint(step, policy=remat_policy, prevent_cse=True) if remat else step
    for i in range(length):
        layer = jax.tree.map(lambda a, i=i: a[i], (stacked, xs))
        carry = body(carry, *layer)
    return carry


def _traced(tree) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


# ---------------------------------------------------------------------------------------------------------
# Key mapping stacked <-> per-layer.


def _key(path) -> str:
    return ".".join(str(p) for p in path)


def layer_keys(path, v) -> list[str] | None:
    """Per-layer keys of a stacked variable at ``path`` (tuple or dotted str); None if ``v`` is not stacked."""
    d = depth(v)
    if d is None:
        return None
    parts = tuple(path.split(".")) if isinstance(path, str) else tuple(path)
    n = int(v.get_value().shape[0])
    head, tail = parts[:len(parts) - d], parts[len(parts) - d:]
    return [_key(head + (str(i),) + tail) for i in range(n)]


def unstack_flat(state) -> dict[str, Any]:
    """``{per-layer dotted key: value}`` of an nnx.State (stacked arrays sliced per layer; a
    ``jax.ShapeDtypeStruct`` becomes the per-layer ShapeDtypeStruct). Ordinary variables keep their key."""
    out: dict[str, Any] = {}
    for path, v in nnx.to_flat_state(state):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        keys = layer_keys(path, v)
        if keys is None:
            out[_key(path)] = value
        elif isinstance(value, jax.ShapeDtypeStruct):
            for k in keys:
                out[k] = jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
        else:
            for i, k in enumerate(keys):
                out[k] = value[i]
    return out


def stack_flat(flat: Mapping[str, Any], template, *, what: str = "state", cast: Callable | None = None):
    """nnx.State shaped like ``template`` with values from the per-layer dict ``flat`` (inverse of
    ``unstack_flat``). Checks keys and shapes; the error names every missing / unexpected key and bad shape.
    ``cast(value, ref)`` converts each per-layer array (default ``jnp.asarray(value, ref.dtype)``)."""
    cast = cast or (lambda value, ref: jnp.asarray(value, ref.dtype))
    out, missing, bad, used = [], [], [], set()
    for path, v in nnx.to_flat_state(template):
        ref = v.get_value() if isinstance(v, nnx.Variable) else v
        keys = layer_keys(path, v)
        per_shape = tuple(ref.shape) if keys is None else tuple(ref.shape[1:])
        parts = []
        for k in (keys or [_key(path)]):
            if k not in flat:
                missing.append(k)
                continue
            used.add(k)
            if tuple(np.shape(flat[k])) != per_shape:
                bad.append(f"{k}: shape {tuple(np.shape(flat[k]))}, model expects {per_shape}")
                continue
            parts.append(cast(flat[k], ref))
        if len(parts) == len(keys or [0]):
            value = parts[0] if keys is None else jnp.stack(parts)
            out.append((path, v.replace(value) if isinstance(v, nnx.Variable) else value))
    extra = sorted(set(flat) - used)
    if missing or extra or bad:
        def cut(xs):
            return f"{xs[:8]}{'...' if len(xs) > 8 else ''} ({len(xs)})"
        raise ValueError(f"{what} mismatch: missing {cut(missing)}, unexpected {cut(extra)}, bad shapes {cut(bad)}")
    return nnx.from_flat_state(out)
