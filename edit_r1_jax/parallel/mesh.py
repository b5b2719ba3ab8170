"""Device meshes from config. Axis types are Auto so that sharding constraints work (see ENVIRONMENT.md)."""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

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


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """Mesh over ``devices`` (default: all) with axes data/fsdp/tensor in that order (tensor innermost).

    ``shape`` maps axis name -> size; -1 fills the remaining devices. Missing axes get size 1.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"data": -1})
    for name in shape:
        if name not in AXES:
            raise ValueError(f"mesh: unknown axis {name!r}; axes are {AXES}")
    full = {a: shape.get(a, 1) for a in AXES}
    full = resolve_shape(full, len(devices))
    sizes = tuple(full[a] for a in AXES)
    try:
        arr = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception as e:  # noqa: BLE001 - device topologies the helper does not know: say which order we use
        log.info("mesh: create_device_mesh unavailable for %s (%s); using device order as listed", sizes, e)
        arr = np.asarray(devices, dtype=object).reshape(sizes)
    mesh = Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    log.info("mesh: %s over %d devices (%s)", dict(zip(AXES, sizes)), len(devices), devices[0].platform)
    return mesh
