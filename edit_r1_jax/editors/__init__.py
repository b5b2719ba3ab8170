"""Model families the training loop and the command-line tools are generic over.

A family (``base.Family``) says how to load its transformer and VAE from a converted folder, how to condition on
an image + instruction, the latent layout and position ids, the sigma schedule and its velocity call; the loop
(tasks.EditTask, engine, train, edit, embed_text, plan) only talks to that protocol.

Adding a family: one model folder ``edit_r1_jax/models/<name>/`` whose ``family.py`` defines a ``Family`` subclass
instance named ``FAMILY``, and one line in ``_MODULES`` below. The key is the config's ``task`` and what
``detect`` reports for a converted folder.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edit_r1_jax.editors.base import Conditioner, Family, decode_latents, encode_reference, lora_config

__all__ = ["Family", "Conditioner", "names", "get", "detect", "encode_reference", "decode_latents", "lora_config"]

_MODULES = {
    "kontext": "edit_r1_jax.models.flux.family",
    "qwen_image_edit": "edit_r1_jax.models.qwen_image.family",
}


def names() -> tuple[str, ...]:
    return tuple(_MODULES)


def get(name: str) -> Family:
    if name not in _MODULES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).FAMILY


def detect(model_dir: str | Path, what: str = "--model") -> Family:
    """The family of a converted folder, from what its converter wrote (see each family's ``detect``)."""
    from edit_r1_jax.folders import FolderError

    d = Path(model_dir)
    if not d.is_dir():
        raise FolderError(f"{what} {d}: folder not found")
    found = [n for n in _MODULES if get(n).detect(d)]
    if len(found) != 1:
        hints = "; ".join(f"{n}: {get(n).convert_hint}" for n in _MODULES)
        raise FolderError(f"{what} {d}: " + (f"looks like several model families ({', '.join(found)})" if found
                                             else "not a converted editor folder") + f" (make one with: {hints})")
    return get(found[0])
