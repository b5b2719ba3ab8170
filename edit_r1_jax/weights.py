"""Converted checkpoints: read PyTorch safetensors lazily, map keys declaratively, stream to disk, load sharded.

A converted model directory holds ``params.safetensors`` (our parameter paths, e.g.
``transformer_blocks.3.attn.to_q.kernel``) and ``config.json``. Conversion validates every key and shape
before it writes a byte, then writes tensor after tensor, so host memory peaks near the largest tensor rather
than the model. Loading builds each array with ``jax.make_array_from_callback``: every host reads only the
slices its devices hold.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from edit_r1_jax.models import scan

log = logging.getLogger(__name__)

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"


class ConversionError(ValueError):
    """A checkpoint does not match the model: the message lists every problem."""


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file, with a truncated or malformed one named in the error (not a bare JSONDecodeError)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: truncated or malformed JSON ({e})") from e


# --------------------------------------------------------------------------------------------------------
# Reading PyTorch-written safetensors without torch.


class SafetensorsSource:
    """Lazy view over one ``.safetensors`` file or a folder of them (index json optional)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        if self.path.is_file():
            files = [self.path]
        else:
            index = sorted(self.path.glob("*.safetensors.index.json"))
            if len(index) > 1:
                raise ConversionError(f"{self.path}: several index files {[p.name for p in index]}")
            if index:
                weight_map = read_json(index[0])["weight_map"]
                files = sorted({self.path / f for f in weight_map.values()})
                missing = [str(f) for f in files if not f.exists()]
                if missing:
                    raise ConversionError(f"{index[0]} names files that do not exist: {missing}")
            else:
                files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.path}: no .safetensors files")
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for f in files:
            for k in self._open(f).keys():
                if k in self._where:
                    raise ConversionError(f"key {k!r} appears in both {self._where[k]} and {f}")
                self._where[k] = f

    def _open(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="numpy")
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise ConversionError(f"cannot read {f}: {e}") from e
        return self._handles[f]

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def _slice(self, key: str):
        if key not in self._where:
            raise KeyError(f"{key!r} not in {self.path}")
        return self._open(self._where[key]).get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> np.dtype:
        return _DTYPES[self._slice(key).get_dtype()]

    def get(self, key: str) -> np.ndarray:
        return self._open(self._where[key]).get_tensor(key)


_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


# --------------------------------------------------------------------------------------------------------
# Declarative key maps.

Transform = Callable[[Any], Any]


def LINEAR(x):  # noqa: N802 - a named constant-like transform
    """torch Linear weight [out, in] -> our kernel [in, out]."""
    return x.T


def COPY(x):  # noqa: N802
    return x


def CONV2D(x):  # noqa: N802
    """torch Conv2d weight OIHW -> HWIO."""
    return x.transpose(2, 3, 1, 0)


def CONV3D(x):  # noqa: N802
    """torch Conv3d weight OIDHW -> DHWIO."""
    return x.transpose(2, 3, 4, 1, 0)


def split_rows(sizes: Sequence[int] | int, then: Transform = LINEAR) -> Transform:
    """Split source axis 0 into parts (``sizes``, or that many equal parts), then transform each."""

    def fn(x):
        parts = sizes
        if isinstance(parts, int):
            if x.shape[0] % parts:
                raise ValueError(f"axis 0 of size {x.shape[0]} does not split into {parts} equal parts")
            parts = [x.shape[0] // parts] * parts
        if sum(parts) != x.shape[0]:
            raise ValueError(f"split sizes {list(parts)} do not sum to axis 0 size {x.shape[0]}")
        out, start = [], 0
        for n in parts:
            out.append(then(x[start:start + n]))
            start += n
        return tuple(out)

    fn.__name__ = f"split_rows({sizes})"
    return fn


def swap_halves(then: Transform = COPY) -> Transform:
    """Swap the two halves of axis 0 (BFL stores final-norm (shift, scale), diffusers (scale, shift))."""

    def fn(x):
        h = x.shape[0] // 2
        return then(x.reshape((2, h) + x.shape[1:])[::-1].reshape(x.shape))

    fn.__name__ = "swap_halves"
    return fn


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    targets: tuple[str, ...]
    transform: Transform = LINEAR

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))


def path_str(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def flat_shapes(abstract_state) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat ``{dotted path: ShapeDtypeStruct}`` of an (abstract) nnx.State, in the per-layer checkpoint layout:
    a stacked ``transformer_blocks.<rest> [L, *s]`` (models/scan.py) gives ``transformer_blocks.{i}.<rest> [s]``,
    so converters write per-layer files whatever the in-memory layout."""
    out = {}
    for path, v in nnx.to_flat_state(abstract_state):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        keys = scan.layer_keys(path, v)
        if keys is None:
            out[path_str(path)] = jax.ShapeDtypeStruct(value.shape, value.dtype)
        else:
            out.update({k: jax.ShapeDtypeStruct(value.shape[1:], value.dtype) for k in keys})
    return out


@dataclasses.dataclass
class _Step:
    source_key: str
    transform: Transform
    targets: tuple[str, ...]


def plan(source: SafetensorsSource, rules: Sequence[Rule], targets: Mapping[str, jax.ShapeDtypeStruct],
         ignore: Sequence[str] = ()) -> list[_Step]:
    """Match every source key to targets and check shapes. Raises one ConversionError listing all problems."""
    compiled = [(re.compile(r.pattern), r) for r in rules]
    ignored = [re.compile(p) for p in ignore]
    unexpected, unknown_target, mismatched, duplicate = [], [], [], []
    steps: list[_Step] = []
    assigned: dict[str, str] = {}
    for key in source.keys():
        match = next(((m, r) for c, r in compiled if (m := c.fullmatch(key))), None)
        if match is None:
            if not any(p.fullmatch(key) for p in ignored):
                unexpected.append(f"{key} {list(source.shape(key))}")
            continue
        m, rule = match
        names = tuple(m.expand(t) for t in rule.targets)
        try:
            out = jax.eval_shape(rule.transform, jax.ShapeDtypeStruct(source.shape(key), np.float32))
        except Exception as e:  # noqa: BLE001 - reported with the key
            mismatched.append(f"{key} {list(source.shape(key))}: transform {rule.transform.__name__} fails: {e}")
            continue
        outs = out if isinstance(out, tuple) else (out,)
        if len(outs) != len(names):
            mismatched.append(f"{key}: transform gives {len(outs)} arrays for targets {list(names)}")
            continue
        ok = True
        for name, o in zip(names, outs):
            if name not in targets:
                unknown_target.append(f"{key} -> {name}")
                ok = False
            elif tuple(o.shape) != tuple(targets[name].shape):
                mismatched.append(f"{key} {list(source.shape(key))} -> {name}: got {list(o.shape)}, "
                                  f"model expects {list(targets[name].shape)}")
                ok = False
            elif name in assigned:
                duplicate.append(f"{name} from both {assigned[name]} and {key}")
                ok = False
            else:
                assigned[name] = key
        if ok:
            steps.append(_Step(key, rule.transform, names))
    missing = [f"{n} {list(s.shape)}" for n, s in targets.items() if n not in assigned]
    problems = []
    for title, items in (("missing (model parameters no source key provides)", missing),
                         ("unexpected (source keys no rule maps)", unexpected),
                         ("mapped to parameters the model does not have", unknown_target),
                         ("shape mismatch", mismatched), ("assigned twice", duplicate)):
        if items:
            problems.append(f"{title}, {len(items)}:\n  " + "\n  ".join(items))
    if problems:
        raise ConversionError(f"checkpoint {source.path} does not match the model:\n" + "\n".join(problems))
    return steps


# --------------------------------------------------------------------------------------------------------
# Streaming safetensors writer: header first (all shapes are known after planning), then tensor by tensor.


def write_streaming(path: str | os.PathLike, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                    arrays: Iterable[tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors arrive one at a time, in the order of ``specs``."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, dtype in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _CODES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".partial")
    expected = iter(specs)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, arr in arrays:
            spec_name, shape, dtype = next(expected)
            if name != spec_name or tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise RuntimeError(f"streaming writer: got {name} {arr.shape} {arr.dtype}, "
                                   f"expected {spec_name} {shape} {dtype}")
            f.write(np.ascontiguousarray(arr).tobytes())
    if next(expected, None) is not None:
        tmp.unlink()
        raise RuntimeError("streaming writer: fewer arrays than announced")
    os.replace(tmp, path)


_NONFINITE: contextvars.ContextVar[str] = contextvars.ContextVar("nonfinite_policy", default="error")


@contextlib.contextmanager
def nonfinite_policy(policy: str):
    """Within the block, :func:`convert` treats NaN/inf source weights as ``"error"`` (default) or ``"warn"``."""
    if policy not in ("error", "warn"):
        raise ValueError(f"nonfinite policy must be 'error' or 'warn', got {policy!r}")
    token = _NONFINITE.set(policy)
    try:
        yield
    finally:
        _NONFINITE.reset(token)


def convert(source: SafetensorsSource, rules: Sequence[Rule], abstract_state, dst_dir: str | os.PathLike,
            config: Mapping[str, Any], dtype: Any = None, ignore: Sequence[str] = ()) -> Path:
    """Validate ``source`` against the model, then stream it into ``dst_dir`` (params + config.json).

    ``dtype``: storage dtype of the converted tensors (default: the model's parameter dtype).
    ``ignore``: regexes of source keys deliberately dropped (e.g. buffers the model recomputes).
    Errors while streaming name the source key and its file; NaN/inf source values stop the conversion (or
    warn, see :func:`nonfinite_policy`).
    """
    targets = flat_shapes(abstract_state)
    steps = plan(source, rules, targets, ignore)
    order = [n for s in steps for n in s.targets]
    store = {n: np.dtype(dtype) if dtype is not None else np.dtype(targets[n].dtype) for n in order}
    specs = [(n, tuple(targets[n].shape), store[n]) for n in order]

    policy = _NONFINITE.get()
    nonfinite: list[str] = []

    def produce():
        for s in steps:
            where = f"{source.file_of(s.source_key)}: source key {s.source_key!r} (-> {', '.join(s.targets)})"
            try:
                x = source.get(s.source_key)
                outs = s.transform(x)
            except Exception as e:  # noqa: BLE001 - re-raised naming the source key and its file
                raise ConversionError(f"{where}: cannot read or transform: {type(e).__name__}: {e}") from e
            if np.issubdtype(x.dtype, np.inexact) or x.dtype == ml_dtypes.bfloat16:
                bad = int(x.size - np.count_nonzero(np.isfinite(x)))
                if bad:
                    msg = f"{where}: {bad} of {np.size(x)} values are NaN or inf"
                    if policy == "error":
                        raise ConversionError(msg + " (pass --allow-nonfinite to convert anyway)")
                    nonfinite.append(msg)
                    log.warning("%s", msg)
            outs = outs if isinstance(outs, tuple) else (outs,)
            for n, o in zip(s.targets, outs):
                yield n, np.asarray(o).astype(store[n])

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    write_streaming(dst / PARAMS_FILE, specs, produce(), metadata={"source": str(source.path)})
    (dst / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=_json_default))
    log.info("converted %d tensors from %s into %s", len(order), source.path, dst)
    return dst


def _json_default(o):
    """Configs hold dtypes (``jnp.float32``, ``np.dtype``) and nested dataclasses; everything else is JSON."""
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    try:
        return np.dtype(o).name
    except TypeError:
        raise TypeError(f"config value {o!r} is not JSON serialisable") from None


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {model_dir} a converted model directory?")
    return read_json(path)


# --------------------------------------------------------------------------------------------------------
# Loading onto a mesh.


def load_state(model_dir_or_file: str | os.PathLike, abstract_state, shardings=None, prefix: str = ""):
    """Load a converted checkpoint into an nnx.State shaped like ``abstract_state``.

    ``shardings``: pytree of NamedSharding matching ``abstract_state`` (``parallel.rules.state_shardings``);
    default: the first local device. Values are cast to the abstract state's dtypes. ``prefix`` selects a
    sub-tree of the file (keys ``prefix + path``). Stacked variables (models/scan.py) are read from the per-layer
    keys ``<head>.{i}.<rest>`` (the converters' layout) and stacked while streaming: each shard is built from the
    per-layer slices it covers, so host memory stays near one shard and every host reads only its own slices.
    A file that holds the stacked key itself (``<head>.<rest>`` [L, ...]) is read as is.
    """
    path = Path(model_dir_or_file)
    file = path / PARAMS_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    flat = nnx.to_flat_state(abstract_state)
    sflat = None if shardings is None else dict(nnx.to_flat_state(shardings))
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with safe_open(str(file), framework="numpy") as f:
        available = set(f.keys())
        missing, problems, leaves = [], [], []
        for p, v in flat:
            value = v.get_value() if isinstance(v, nnx.Variable) else v
            per_layer = scan.layer_keys(p, v)
            if per_layer is not None and prefix + path_str(p) in available:
                per_layer = None  # a file saved in the stacked layout itself (e.g. nnx.to_flat_state of a model)
            keys = [prefix + path_str(p)] if per_layer is None else [prefix + k for k in per_layer]
            want = tuple(value.shape) if per_layer is None else tuple(value.shape[1:])
            for key in keys:
                if key not in available:
                    missing.append(key)
                elif tuple(f.get_slice(key).get_shape()) != want:
                    problems.append(f"{key}: file has {f.get_slice(key).get_shape()}, model expects {want}")
            leaves.append((p, v, keys, per_layer is not None, value))
        if missing:
            problems.insert(0, f"missing: {sorted(missing)}")
        if problems:
            raise ConversionError(f"{file} does not match the model: " + "; ".join(problems))
        out = []
        for p, v, keys, stacked, value in leaves:
            sh = default if sflat is None else sflat[p]
            sh = sh.get_value() if isinstance(sh, nnx.Variable) else sh
            slices = [f.get_slice(k) for k in keys]
            if stacked:
                def read(idx, slices=slices, dt=value.dtype):
                    layers = range(len(slices))[idx[0]]
                    return np.stack([np.asarray(slices[i][idx[1:]]).astype(dt) for i in layers])
            else:
                def read(idx, sl=slices[0], dt=value.dtype):
                    return np.asarray(sl[idx]).astype(dt)
            arr = jax.make_array_from_callback(tuple(value.shape), sh, read)
            out.append((p, v.replace(arr) if isinstance(v, nnx.Variable) else arr))
    return nnx.from_flat_state(out)


def flat_per_layer(state) -> dict[str, Any]:
    """``{dotted key: array}`` of an nnx.State in the per-layer checkpoint layout (stacked layers unstacked),
    e.g. to save parameters with ``save_tensors`` that ``load_state`` reads back into the stacked layout."""
    return scan.unstack_flat(state)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None):
    """Write a small dict of arrays (host-gathered) as safetensors, streaming, atomically."""
    items = [(k, np.asarray(jax.device_get(v))) for k, v in tensors.items()]
    write_streaming(path, [(k, a.shape, a.dtype) for k, a in items], iter(items), metadata)


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
