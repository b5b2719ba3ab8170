"""Device meshes from config. Axis types are Auto so that sharding constraints work (see ENVIRONMENT.md)."""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from edit_r1_jax.parallel import rules

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")


def resolve_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the single -1 entry so the product equals ``num_devices``; check divisibility loudly."""
    shape = dict(shape)
    unknown = [k for k, v in shape.items() if v == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {unknown}")
    known = math.prod(v for v in shape.values() if v != -1)
    if known <= 0 or any(v == 0 or v < -1 for v in shape.values()):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {shape}")
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh {shape}: {num_devices} devices are not divisible by {known}")
        shape[unknown[0]] = num_devices // known
    if math.prod(shape.values()) != num_devices:
        raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices, {num_devices} available")
    return shape


class MeshError(ValueError):
    """The requested mesh cannot be laid out on the physical devices."""


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None,
              allow_replicated_fallback: bool | None = None) -> Mesh:
    """Mesh over ``devices`` (default: all) with axes data/fsdp/tensor in that order (tensor innermost).

    ``shape`` maps axis name -> size; -1 fills the remaining devices. Missing axes get size 1. ``shape`` may
    carry the config switch ``allow_replicated_fallback`` (config ``mesh.allow_replicated_fallback``, default
    False; the argument wins when given): without it, a layout ``create_device_mesh`` cannot build raises
    :class:`MeshError`, and so does a parameter its mesh axes do not divide (``rules.PlacementError``); with
    it, the mesh falls back to the listed device order and such parameters are replicated, both with a
    WARNING. The switch is applied to ``rules`` here, once at start-up.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    from_config = bool(shape.pop("allow_replicated_fallback", False))
    allow = from_config if allow_replicated_fallback is None else bool(allow_replicated_fallback)
    rules.set_allow_replicated_fallback(allow)
    for name in shape:
        if name not in AXES:
            raise ValueError(f"mesh: unknown axis {name!r}; axes are {AXES}")
    full = {a: shape.get(a, 1) for a in AXES}
    full = resolve_shape(full, len(devices))
    sizes = tuple(full[a] for a in AXES)
    try:
        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception as e:  # noqa: BLE001 - re-raised (or, when allowed, logged) naming the layout
        msg = (f"mesh {dict(zip(AXES, sizes))}: create_device_mesh cannot lay it out on {len(devices)} "
               f"{devices[0].platform} devices ({type(e).__name__}: {e})")
        if not allow:
            raise MeshError(msg + "; choose a shape that fits the device topology, or set "
                            "mesh.allow_replicated_fallback=True to use the device order as listed") from e
        log.warning("%s; using the device order as listed (mesh.allow_replicated_fallback=True)", msg)
        arr = np.asarray(devices, dtype=object).reshape(sizes)
    mesh = Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    log.info("mesh: %s over %d devices (%s)", dict(zip(AXES, sizes)), len(devices), devices[0].platform)
    return mesh

