"""LoRA for Flax NNX models: a LoRA-aware ``Linear`` and a base/adapter split that shares base weights.

Model side
    ``LoRAConfig(rank=32, alpha=64.0, targets=(...), init_std=None)`` (PEFT ``LoraConfig`` semantics:
    ``scale = alpha / rank``, A ~ N(0, init_std^2) with ``init_std=None -> 1/rank`` = PEFT "gaussian", B = 0).
    A model builds its linears with ``Linear(in, out, ..., path="transformer_blocks.3.attn.to_q", lora=cfg)``;
    the layer gets ``lora_a [in, r]`` and ``lora_b [r, out]`` (``LoRAParam``, always float32) when
    ``lora_targeted(path, cfg)``: the dotted module path ends with one of ``cfg.targets`` on a ``.`` boundary
    (``"to_out.0"`` matches ``...attn.to_out.0``). ``y = x @ W + b + ((x @ A) @ B) * scale`` with the matmuls in the
    compute dtype (PEFT order of operations).

Functional side (what the trainer uses; all of it works inside ``jax.jit`` / ``jax.grad``)
    ``graphdef, base_state, lora_state = split_policy(model)``
        ``base_state``: every non-LoRA variable (nnx.State, ``nnx.Param``); ``lora_state``: only ``LoRAParam``s.
        The base weights exist once; any number of LoRA pytrees (theta, theta_old, EMA) share them.
    ``apply(graphdef, base_state, lora_state_or_None, *args, fn=None, **kwargs)``
        Rebuilds the module from the split (no copy of base arrays: ``nnx.merge`` wraps the given arrays) and
        returns ``fn(model, *args, **kwargs)`` (default ``model(*args, **kwargs)``). ``lora_state=None`` runs the
        base model only (the LoRA branch is skipped entirely, not multiplied by zero) = PEFT ``disable_adapter``.
        ``graphdef`` is static: close over it (``functools.partial``) or mark it static in ``jax.jit``.
        Gradients w.r.t. LoRA only: ``jax.grad(lambda l: loss(apply(g, base, l, ...)))(lora_state)``.
    ``merge_lora_state(model, lora_state)`` puts a LoRA pytree into a stateful model (``nnx.update``).
    ``lora_to_flat(lora_state) / lora_from_flat(flat, template)``: ``{dotted path: array}`` dict <-> State in the
        per-layer layout (stacked layers are unstacked / restacked, models/scan.py), used by the LoRA export and
        the PEFT exporter (``edit_r1_jax.models.flux.params``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from edit_r1_jax.models import scan
from edit_r1_jax.parallel import rules

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 32
    alpha: float = 64.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    init_std: float | None = None  # None -> 1/rank (PEFT init_lora_weights="gaussian")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    @property
    def std(self) -> float:
        return 1.0 / self.rank if self.init_std is None else float(self.init_std)

    @classmethod
    def from_dict(cls, d: dict | None) -> "LoRAConfig | None":
        if d is None:
            return None
        if isinstance(d, LoRAConfig):
            return d
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class LoRAParam(nnx.Variable):
    """LoRA adapter weights (kept apart from ``nnx.Param`` so the base/adapter split is a type filter)."""


def lora_targeted(path: str, cfg: LoRAConfig | None) -> bool:
    """``path`` ends with a target on a ``.`` boundary. In a stacked block (models/scan.py) the layer index is
    ``*`` (``transformer_blocks.*.attn.to_q``): an exact per-layer target such as ``transformer_blocks.0.attn.to_q``
    matches it, and then every layer of the stack carries the adapter (one graph for all layers)."""
    if cfg is None or not path:
        return False
    if "*" in path:
        pattern = re.compile(r"(?:.*\.)?" + re.escape(path).replace(r"\*", r"\d+"))
        if any(pattern.fullmatch(t) for t in cfg.targets):
            return True
    return any(path == t or path.endswith("." + t) for t in cfg.targets)


class Linear(nnx.Module):
    """Dense layer with kernel ``[in, out]`` (logical axes ``axes``), optional bias and optional LoRA."""

    def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str | None] = (None, None),
                 use_bias: bool = True, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 path: str = "", lora: LoRAConfig | None = None, rngs: nnx.Rngs,
                 kernel_init: Callable | None = None):
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = jnp.dtype(dtype)
        self.path = path
        axes = tuple(axes)
        init = kernel_init or nnx.initializers.lecun_normal()
        self.kernel = rules.param(init(rngs.params(), (in_features, out_features), jnp.dtype(param_dtype)), axes)
        self.bias = (rules.param(jnp.zeros((out_features,), jnp.dtype(param_dtype)), (axes[1],))
                     if use_bias else None)
        self.lora_enabled = lora_targeted(path, lora)
        if self.lora_enabled:
            self.lora_scale = lora.scale
            a = lora.std * jax.random.normal(rngs.params(), (in_features, lora.rank), jnp.float32)
            self.lora_a = rules.param(a, (axes[0], "lora_rank"), LoRAParam)
            self.lora_b = rules.param(jnp.zeros((lora.rank, out_features), jnp.float32), ("lora_rank", axes[1]),
                                      LoRAParam)
        else:
            self.lora_scale = 0.0
            self.lora_a = None
            self.lora_b = None

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        x = x.astype(dt)
        bias = None if self.bias is None else self.bias[...].astype(dt)
        if self.lora_enabled and self.lora_a is not None:
            return lora_linear(x, self.kernel[...].astype(dt), bias, self.lora_a[...].astype(dt),
                               self.lora_b[...].astype(dt), jnp.asarray(self.lora_scale, dt))
        y = jnp.dot(x, self.kernel[...].astype(dt))
        return y if bias is None else y + bias


def _lora_forward(x, kernel, bias, a, b, scale):
    h = jnp.dot(x, a)
    y = jnp.dot(x, kernel)
    if bias is not None:
        y = y + bias
    return y + jnp.dot(h, b) * scale, h


@jax.custom_vjp
def lora_linear(x, kernel, bias, a, b, scale):
    """``x @ kernel + bias + ((x @ a) @ b) * scale`` (PEFT order), x ``[..., in]``. The same values as autodiff
    of that expression, with the backward written out on 2-D ``[tokens, features]`` views: every product reads the
    large operand in its stored layout (autodiff, contracting the batch and token axes of 3-D arrays, left XLA:CPU
    copying each ``[tokens, out]`` gradient into a transposed layout for the LoRA weight gradients: ~5% of the FLUX
    DiT's forward+backward in bench/dit.py; tests/test_lora_linear.py checks the compiled program)."""
    return _lora_forward(x, kernel, bias, a, b, scale)[0]


def _lora_fwd(x, kernel, bias, a, b, scale):
    y, h = _lora_forward(x, kernel, bias, a, b, scale)
    return y, (x, kernel, bias, a, b, scale, h)


def _lora_bwd(res, dy):
    x, kernel, bias, a, b, scale, h = res
    x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dys = dy2 * scale  # cotangent of dot(h, b)
    g = jnp.dot(dys, b.T)  # cotangent of h [tokens, rank]
    dx = jnp.dot(dy2, kernel.T) + jnp.dot(g, a.T)
    da = jnp.dot(x2.T, g)
    db = jnp.dot(h2.T, dys)
    dkernel = jnp.dot(x2.T, dy2)  # dead code (removed under jit) when the base is frozen
    dbias = None if bias is None else jnp.sum(dy2, axis=0).astype(bias.dtype)
    dscale = jnp.sum(jnp.dot(h2, b) * dy2).astype(scale.dtype)
    return dx.reshape(x.shape), dkernel, dbias, da, db, dscale


lora_linear.defvjp(_lora_fwd, _lora_bwd)


# ---------------------------------------------------------------------------------------------------------
# Functional split / apply.

_LORA_TEMPLATES: dict[Any, Any] = {}


def linear_maker(cfg, rngs):
    """``mk(in, out, axes, path, dtype=None) -> Linear`` with ``cfg``'s compute/param dtypes and LoRA, drawing from
    ``rngs`` (a transformer builds its top-level layers with one, and each stacked block with its own)."""
    def mk(i, o, axes, path, dtype=None):
        return Linear(i, o, axes=axes, dtype=cfg.dtype if dtype is None else dtype, param_dtype=cfg.param_dtype,
                      path=path, lora=cfg.lora, rngs=rngs)
    return mk


def split_policy(model: nnx.Module):
    """``(graphdef, base_state, lora_state)``; registers the LoRA structure so ``apply(..., None)`` works."""
    graphdef, lora_state, base_state = nnx.split(model, LoRAParam, ...)
    _LORA_TEMPLATES[graphdef] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state)
    return graphdef, base_state, lora_state


def _placeholder(graphdef):
    try:
        return _LORA_TEMPLATES[graphdef]
    except KeyError:
        raise KeyError("apply(..., lora_state=None) needs a graphdef produced by split_policy()") from None


def merge(graphdef, base_state, lora_state) -> nnx.Module:
    """Module view of (base, lora); ``lora_state=None`` -> LoRA branches disabled."""
    if lora_state is None:
        # Zero-size stand-ins: the disabled LoRA branches never read them (and they are valid jax arrays, so
        # nnx.remat / jax.checkpoint inside the model accept them).
        # Stacked LoRA (models/scan.py) keeps its leading layer axis so that the layer scan can slice it.
        placeholder = jax.tree.map(
            lambda v: v.replace(jnp.zeros(v.get_value().shape[:1] + (0,) if scan.is_stacked(v) else (0,),
                                          v.get_value().dtype)),
            _placeholder(graphdef), is_leaf=lambda x: isinstance(x, nnx.Variable))
        model = nnx.merge(graphdef, base_state, placeholder)
        for _, m in model.iter_modules():
            if isinstance(m, Linear) and m.lora_enabled:
                m.lora_enabled = False
        return model
    return nnx.merge(graphdef, base_state, lora_state)


def apply(graphdef, base_state, lora_state, *args, fn: Callable | None = None, **kwargs):
    """Run ``fn(model, *args, **kwargs)`` (default ``model(*args, **kwargs)``) with base + given LoRA (or none)."""
    model = merge(graphdef, base_state, lora_state)
    if fn is None:
        return model(*args, **kwargs)
    return fn(model, *args, **kwargs)


def merge_lora_state(model: nnx.Module, lora_state) -> None:
    nnx.update(model, lora_state)


def lora_to_flat(lora_state) -> dict[str, jax.Array]:
    """``{dotted path: array}`` in the per-layer layout (a stacked ``transformer_blocks.attn.to_q.lora_a``
    [L, in, r] becomes ``transformer_blocks.{i}.attn.to_q.lora_a`` [in, r], see models/scan.py)."""
    return scan.unstack_flat(lora_state)


def lora_from_flat(flat: dict[str, Any], template):
    """State shaped like ``template`` (a lora_state) with values from the per-layer ``flat`` (float32, stacked
    where the template is); checks keys and shapes, the error names them."""
    return scan.stack_flat(flat, template, what="LoRA state",
                           cast=lambda value, ref: jnp.asarray(value, dtype=jnp.float32))


def load_policy_model(model_cls, cfg, model_dir, *, mesh=None, seed: int = 0):
    """A converted transformer as ``(graphdef, base_state, lora_state)`` ready for :func:`apply`.

    Base weights are read slice by slice onto ``mesh`` (sharded by their logical axes; default: first device); LoRA
    parameters are initialised (A gaussian, B zero) by a jitted init that creates them directly with their
    shardings (the unused base initialisers are dead code under jit). Without ``cfg.lora`` the LoRA state is empty.
    """
    from edit_r1_jax import weights

    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed)))
    graphdef, abstract_base, abstract_lora = split_policy(abstract)
    base_sh = None if mesh is None else rules.state_shardings(abstract_base, mesh)
    base = weights.load_state(model_dir, abstract_base, base_sh)

    def init_lora():
        return nnx.split(model_cls(cfg, rngs=nnx.Rngs(seed)), LoRAParam, ...)[1]

    if mesh is None:
        return graphdef, base, jax.jit(init_lora)()
    return graphdef, base, jax.jit(init_lora, out_shardings=rules.state_shardings(abstract_lora, mesh))()
