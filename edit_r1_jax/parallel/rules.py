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

# A parameter whose dimension does not divide its mesh axes raises (PlacementError) unless this is set, from
# config ``mesh.allow_replicated_fallback``: replicating a 12B model silently ends in a confusing OOM later.
_allow_replicated_fallback = False


class PlacementError(ValueError):
    """A parameter cannot be placed as its logical axes ask (the message names parameter, shape and axes)."""


def set_allow_replicated_fallback(allow: bool) -> None:
    global _allow_replicated_fallback
    _allow_replicated_fallback = bool(allow)


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
                   rules: Rules | None = None, name: str | None = None) -> PartitionSpec:
    """PartitionSpec for logical ``axes``.

    A mesh axis is used at most once (first dimension wins). When ``shape`` and ``mesh`` are given, mesh axes
    of size 1 are dropped. A dimension that the mesh axes do not divide:
    * of a parameter (``name`` given, as ``state_shardings`` does): raises :class:`PlacementError` naming the
      parameter, its shape and the axes, unless ``set_allow_replicated_fallback(True)`` (config
      ``mesh.allow_replicated_fallback``), which replicates it with a WARNING;
    * of an activation (``name`` None, ``constrain``): replicated along it, logged once at INFO (a batch of 1
      or an odd sequence length is a legitimate layout, not a misconfiguration).
    """
    rules = _rules if rules is None else rules
    used: set[str] = set()
    spec = []
    for d, axis_name in enumerate(axes):
        mesh_axes = tuple(a for a in _mesh_axes_for(axis_name, rules) if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape and mesh.shape[a] > 1)
            if shape is not None and mesh_axes:
                size = 1
                for a in mesh_axes:
                    size *= mesh.shape[a]
                if shape[d] % size:
                    what = (f"dim {d} of shape {tuple(shape)} (logical axis {axis_name!r}, logical axes "
                            f"{tuple(axes)}) is not divisible by mesh axes {mesh_axes} (size {size})")
                    if name is not None and not _allow_replicated_fallback:
                        raise PlacementError(
                            f"parameter {name!r}: {what}; choose a mesh whose axes divide it, or set "
                            f"mesh.allow_replicated_fallback=True to replicate it along that dimension")
                    if name is not None:
                        _log_once(f"parameter {name!r}: {what}; replicated along it "
                                  f"(mesh.allow_replicated_fallback=True)", logging.WARNING)
                    else:
                        _log_once(f"activation {what}; replicated along it")
                    mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes))
    return PartitionSpec(*spec)


_logged: set[str] = set()


def _log_once(msg: str, level: int = logging.INFO) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.log(level, msg)


def _var_axes(v: nnx.Variable) -> tuple | None:
    return v.get_metadata().get("logical_axes")


def state_shardings(state: Any, mesh, rules: Rules | None = None) -> Any:
    """NamedSharding pytree matching ``state`` (an nnx.State or a pytree of Variables).

    Raises :class:`PlacementError` for a parameter dimension its mesh axes do not divide (see
    ``partition_spec``)."""

    def one(path, v):
        if isinstance(v, nnx.Variable):
            axes = _var_axes(v)
            shape = v.get_value().shape
            name = ".".join(str(getattr(p, "key", p)) for p in path)
            spec = PartitionSpec() if axes is None else partition_spec(axes, shape, mesh, rules, name=name)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


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
