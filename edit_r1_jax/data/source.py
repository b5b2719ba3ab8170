"""Editing dataset of spec F read through grain.

Layout::

    <root>/train_metadata.jsonl   one JSON object per line: {"prompt": str, "image": path relative to root,
    <root>/test_metadata.jsonl     "requirement": str (optional), ...extra keys ignored but kept as metadata}
    <root>/images/...

Everything is validated when the dataset is opened (fail loudly, with file and line): malformed JSON, a line that
is not an object, a missing/empty/non-string ``prompt`` or ``image``, an image file that does not exist, and
(``verify_images=True``, the default) an image PIL cannot decode or one smaller than 16x16 pixels, an image path
that leaves the root (``../``, absolute; unless ``allow_outside_root``) and repeated (prompt, image) rows (an
error, or a warning with ``on_duplicate="warn"``). Blank lines are skipped.

Each element of the grain ``MapDataset`` is a dict::

    {"row_id": int (0-based index among the valid rows = the stable group / ban key),
     "prompt": str, "requirement": str ("" if absent), "image": uint8 [R, R, 3] (center crop + LANCZOS),
     "metadata": dict (the whole JSON object), "image_path": str}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import grain
import numpy as np

from edit_r1_jax.data import images

__all__ = ["DatasetError", "Row", "read_metadata", "EditSource", "make_dataset", "stack_rows"]

SPLITS = ("train", "test")

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """Invalid dataset input; the message names the file and (where relevant) the 1-based line number."""


@dataclasses.dataclass(frozen=True)
class Row:
    row_id: int
    prompt: str
    image_path: str
    requirement: str
    metadata: dict
    line: int  # 1-based line number in the jsonl file


def _metadata_path(root, split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return os.path.join(os.fspath(root), f"{split}_metadata.jsonl")


def _verify_image(path, where):
    from PIL import Image
    try:
        with Image.open(path) as img:
            img.verify()  # structural check without a full decode
        with Image.open(path) as img:
            img.load()  # a full decode catches truncated data that verify() misses
            size = img.size
    except Exception as e:  # noqa: BLE001 - any PIL failure means the file is unusable
        raise DatasetError(f"{where}: image {path} cannot be decoded ({type(e).__name__}: {e})") from e
    if min(size) < images.MIN_SIDE:  # found now, not after every model is loaded
        raise DatasetError(f"{where}: image {path} is {size[0]}x{size[1]}; it must be at least "
                           f"{images.MIN_SIDE}x{images.MIN_SIDE} pixels (one latent patch)")


def _inside(root, rel: str) -> str | None:
    """The joined path if ``rel`` stays inside ``root`` lexically (no ``..`` escape, not absolute), else None.
    Lexical on purpose: a symlinked image folder inside the root is the dataset's own choice."""
    root_n = os.path.normpath(os.path.abspath(os.fspath(root)))
    joined = os.path.normpath(os.path.join(root_n, rel))
    if os.path.isabs(rel) or os.path.commonpath([root_n, joined]) != root_n:
        return None
    return joined


def jsonl_objects(path, required=(), error: type[Exception] = DatasetError):
    """``(line number, object)`` for every non-blank line of a jsonl file.

    Malformed JSON, a line that is not an object, and a missing or empty required string field raise ``error``
    naming ``file:line``. Used by the dataset, the text-embedding cache and the scorer alike.
    """
    if not os.path.isfile(path):
        raise error(f"file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for field in required:
                if field not in obj:
                    raise error(f"{where}: missing required field {field!r}")
                if not isinstance(obj[field], str) or not obj[field].strip():
                    raise error(f"{where}: field {field!r} must be a non-empty string, got {obj[field]!r}")
            req = obj.get("requirement", "")
            if req is not None and not isinstance(req, str):
                raise error(f"{where}: field 'requirement' must be a string, got {req!r}")
            out.append((lineno, obj))
    return out


def read_metadata(root, split: str = "train", verify_images: bool = True, allow_outside_root: bool = False,
                  on_duplicate: str = "error") -> list[Row]:
    """Parse and validate ``<root>/<split>_metadata.jsonl`` (see module docstring).

    ``allow_outside_root``: accept image paths that leave ``root`` (``../``, absolute paths); refused by default.
    ``on_duplicate``: "error" or "warn" for rows repeating an earlier (prompt, image) pair, named by line.
    """
    if on_duplicate not in ("error", "warn"):
        raise ValueError(f"on_duplicate must be 'error' or 'warn', got {on_duplicate!r}")
    path = _metadata_path(root, split)
    if not os.path.isfile(path):
        raise DatasetError(f"metadata file not found: {path}")
    rows = []
    first_line: dict[tuple[str, str], int] = {}
    duplicates = []
    for lineno, obj in jsonl_objects(path, ("prompt", "image")):
        where = f"{path}:{lineno}"
        img_path = _inside(root, obj["image"])
        if img_path is None:
            if not allow_outside_root:
                raise DatasetError(f"{where}: image path {obj['image']!r} leaves the dataset root {root} (set "
                                   f"data.allow_outside_root=True to allow it)")
            img_path = os.path.normpath(os.path.join(os.fspath(root), obj["image"]))
        if not os.path.isfile(img_path):
            raise DatasetError(f"{where}: image file not found: {img_path}")
        if verify_images:
            _verify_image(img_path, where)
        key = (obj["prompt"], img_path)
        if key in first_line:
            duplicates.append(f"line {lineno} repeats line {first_line[key]}")
        else:
            first_line[key] = lineno
        rows.append(Row(len(rows), obj["prompt"], img_path, obj.get("requirement") or "", obj, lineno))
    if not rows:
        raise DatasetError(f"{path}: no rows")
    if duplicates:
        msg = (f"{path}: {len(duplicates)} duplicate (prompt, image) rows: " + ", ".join(duplicates[:20])
               + (" ..." if len(duplicates) > 20 else ""))
        if on_duplicate == "error":
            raise DatasetError(msg + " (set data.on_duplicate='warn' to keep them)")
        log.warning("%s; kept (data.on_duplicate='warn')", msg)
    return rows


class EditSource:
    """Random-access source over validated rows; decodes and crops the image on access."""

    def __init__(self, rows: list[Row], resolution: int, metadata_path: str = ""):
        self._rows = rows
        self._resolution = resolution
        self._metadata_path = metadata_path

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        row = self._rows[int(index)]
        try:
            pixels = images.load_image(row.image_path, self._resolution)
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self._metadata_path}:{row.line}: cannot load image {row.image_path}: {e}") from e
        return {"row_id": row.row_id, "prompt": row.prompt, "requirement": row.requirement, "image": pixels,
                "metadata": dict(row.metadata), "image_path": row.image_path}

    def __repr__(self) -> str:
        return f"EditSource({self._metadata_path!r}, {len(self)} rows, resolution={self._resolution})"


def make_dataset(root, split: str = "train", resolution: int = 512, verify_images: bool = True,
                 allow_outside_root: bool = False, on_duplicate: str = "error"):
    """``(grain.MapDataset, rows)``: the validated dataset (no multiprocessing; elements as in the docstring)."""
    rows = read_metadata(root, split, verify_images, allow_outside_root, on_duplicate)
    source = EditSource(rows, resolution, _metadata_path(root, split))
    return grain.MapDataset.source(source), rows


def stack_rows(elements: list[dict]) -> dict:
    """Batch a list of elements: images stacked to ``[B, R, R, 3]``, other fields as lists / int arrays."""
    return {"row_id": np.array([e["row_id"] for e in elements], np.int64),
            "image": np.stack([e["image"] for e in elements]),
            "prompt": [e["prompt"] for e in elements],
            "requirement": [e["requirement"] for e in elements],
            "metadata": [e["metadata"] for e in elements]}
