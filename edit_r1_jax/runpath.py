"""Run-directory paths: etils.epath everywhere, so a run directory is a local folder or a bucket URL alike.

Writers that need a local seekable file (safetensors) go through a local temporary file and a byte copy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from etils import epath


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def save_safetensors(path, tensors, metadata=None) -> None:
    """``weights.save_tensors`` to any epath location (written locally, then copied for a URL)."""
    from edit_r1_jax import weights

    path = epath.Path(path)
    if is_local(path):
        weights.save_tensors(path, tensors, metadata)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, path.name)
        weights.save_tensors(local, tensors, metadata)
        with open(local, "rb") as f:
            path.write_bytes(f.read())


@contextlib.contextmanager
def local_file(path):
    """A local file path holding ``path``'s bytes (safetensors reads local files only)."""
    path = epath.Path(path)
    if is_local(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, path.name)
        with open(local, "wb") as f:
            f.write(path.read_bytes())
        yield local
