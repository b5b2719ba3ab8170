"""Logical axis names -> mesh axes. The only place that decides how arrays are sharded.

Modules annotate parameters with logical names (``param(value, ("embed", "heads"))``) and activations with
``constrain(x, ("batch", "length", "act_embed"))``. The rules below map those names onto the mesh axes
("data", "fsdp", "tensor"). The same model code then runs on one device (no mesh: constraints are identity)
and on a pod.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, Any], ...]

# Parameters: FSDP shards the model width, tensor parallelism shards heads / MLP hidden / vocab.
# Activations: batch over data and fsdp (FSDP is data parallel for activations); heads and MLP hidden over
# tensor; the model width of activations stays whole so that FSDP only gathers weights.
DEFAULT_RULES: Rules = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("norm", None),
    ("lora_rank", None),
    ("layers", None),  # stacked layers (models/scan.py): every device holds every layer's shard
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)

_rules: Rules = DEFAULT_RULES


def set_rules(rules: Rules) -> None:
    """Replace the global rules (from config, once at start-up)."""
    global _rules
    _rules = tuple(tuple(r) for r in rules)


def get_rules() -> Rules:
    return _rules


def param(value: jax.Array, axes: Sequence[str | None], variable_type: type = nnx.Param) -> nnx.Variable:
    """A parameter carrying its logical axis names (one per dimension)."""
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match parameter of shape {value.shape}")
    return variable_type(value, logical_axes=axes)


def _mesh_axes_for(name: str | None, rules: Rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    raise KeyError(f"logical axis {name!r} has no sharding rule; known: {[r[0] for r in rules]}")


def partition_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None,
                   rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for logical ``axes``.

    A mesh axis is used at most once (first dimension wins). When ``shape`` and ``mesh`` are given, mesh axes
    of size 1 are dropped and a dimension that the mesh axes do not divide is replicated (logged once per
    shape, at INFO, since it is a deliberate layout decision rather than an error).
    """
    rules = _rules if rules is None else rules
    used: set[str] = set()
    spec = []
    for d, name in enumerate(axes):
        mesh_axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and mesh.shape[a] > 1)
            if shape is not None and mesh_axes:
                size = 1
                for a in mesh_axes:
                    size *= mesh.shape[a]
                if shape[d] % size:
                    _log_once(f"dim {d} of shape {tuple(shape)} ({name}) not divisible by mesh axes "
                              f"{mesh_axes} (size {size}); replicated along it")
                    mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return PartitionSpec(*spec)


_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def _var_axes(v: nnx.Variable) -> tuple | None:
    return v.get_metadata().get("logical_axes")


def state_shardings(state: Any, mesh, rules: Rules | None = None) -> Any:
    """NamedSharding pytree matching ``state`` (an nnx.State or a pytree of Variables)."""

    def one(v):
        if isinstance(v, nnx.Variable):
            axes = _var_axes(v)
            shape = v.get_value().shape
            spec = PartitionSpec() if axes is None else partition_spec(axes, shape, mesh, rules)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh, rules: Rules | None = None) -> None:
    """Place every variable of ``model`` on ``mesh`` according to its logical axes (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; identity when no mesh is active (single-device code)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not mesh.shape_tuple:
        return x
    spec = partition_spec(axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
