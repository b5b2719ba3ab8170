"""Benchmark rows from the layouts the benchmarks publish (downloaded beforehand; nothing is fetched here).

GEdit-Bench (``stepfun-ai/GEdit-Bench`` on the hub): rows with ``key``, ``task_type`` (one of the 11 groups),
``instruction``, ``instruction_language`` ("en" / "cn"), ``input_image`` and ``Intersection_exist`` (the
"intersection" subset: rows whose instruction exists in both languages; GEdit reports both the full set and
the intersection). Two layouts are read:

* the hub's parquet shards (any ``*.parquet`` under DIR, e.g. ``data/train-*.parquet``; images are stored as
  ``{"bytes": ...}`` structs). Needs ``pyarrow`` (not a dependency of this project: ``pip install pyarrow``);
* a jsonl export: ``*.jsonl`` under DIR, one row per line with the same fields, ``input_image`` a path relative
  to the jsonl file's folder (see the README for a three-line export script).

ImgEdit-Bench Basic (``PKU-YuanGroup/ImgEdit``, Benchmark/Basic): ``basic_edit.json`` = {key: {"id": relative
image path, "prompt": instruction, "edit_type": one of nine types}} and the image folder (``Benchmark.tar``'s
``singleturn/``); pass ``--data`` as the folder holding ``basic_edit.json`` and, with ``--images``, the image root
(default: DIR itself, or DIR/singleturn when present).

A row that cannot be used (missing field, unknown group, image missing) is not dropped silently: readers return
it as a ``Problem`` naming the file and line / key, and the evaluation records it in its outputs.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

GEDIT_GROUPS = ("background_change", "color_alter", "material_alter", "motion_change", "ps_human", "style_change",
                "subject-add", "subject-remove", "subject-replace", "text_change", "tone_transfer")
IMGEDIT_TYPES = ("replace", "add", "adjust", "remove", "style", "action", "extract", "background", "compose")
GEDIT_LANGUAGES = ("en", "cn")


@dataclasses.dataclass
class Row:
    key: str
    group: str                   # GEdit task_type / ImgEdit edit_type
    instruction: str
    language: str = "en"
    intersection: bool = False   # GEdit Intersection_exist
    image_path: str | None = None
    image_bytes: bytes | None = dataclasses.field(default=None, repr=False)
    where: str = ""              # file:line or file[key], for messages

    def open_image(self):
        """The source image as RGB PIL (raises FileNotFoundError / ImageLoadError naming the row)."""
        from PIL import Image

        from edit_r1_jax.data.images import ImageLoadError, open_image, to_rgb

        if self.image_bytes is not None:
            try:
                img = Image.open(io.BytesIO(self.image_bytes))
                img.load()
            except Exception as e:  # noqa: BLE001 - re-raised naming the row
                raise ImageLoadError(f"{self.where}: cannot decode input_image: {e}") from e
            return to_rgb(img)
        try:
            return to_rgb(open_image(self.image_path))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.where}: {e}") from e
        except ImageLoadError as e:
            raise ImageLoadError(f"{self.where}: {e}") from e


@dataclasses.dataclass
class Problem:
    """A benchmark row that could not be read; ``key`` may be None when the row is too broken to name."""
    where: str
    error: str
    key: str | None = None

    def record(self) -> dict:
        return {"key": self.key, "status": "error", "stage": "read", "where": self.where, "error": self.error}


def _check_gedit(d: Any, where: str) -> tuple[Row | None, str | None]:
    if not isinstance(d, dict):
        return None, f"row is not an object ({type(d).__name__})"
    missing = [f for f in ("key", "task_type", "instruction", "instruction_language", "input_image") if f not in d]
    if missing:
        return None, f"missing field(s) {missing}"
    if d["task_type"] not in GEDIT_GROUPS:
        return None, f"task_type {d['task_type']!r} is not one of the 11 GEdit groups"
    if d["instruction_language"] not in GEDIT_LANGUAGES:
        return None, f"instruction_language {d['instruction_language']!r} is not one of {GEDIT_LANGUAGES}"
    if not isinstance(d["instruction"], str) or not d["instruction"].strip():
        return None, "instruction is empty"
    inter = d.get("Intersection_exist", d.get("intersection_exist", False))
    if not isinstance(inter, bool):
        return None, f"Intersection_exist must be true/false, got {inter!r}"
    return Row(key=str(d["key"]), group=d["task_type"], instruction=d["instruction"],
               language=d["instruction_language"], intersection=inter, where=where), None


def read_gedit(data_dir: str | Path, language: str = "en", subset: str = "fullset") -> tuple[list[Row], list[Problem]]:
    """Rows of one language (``en`` / ``cn``), the full set or the ``intersection`` subset."""
    if language not in GEDIT_LANGUAGES:
        raise ValueError(f"--language must be one of {GEDIT_LANGUAGES}, got {language!r}")
    if subset not in ("fullset", "intersection"):
        raise ValueError(f"--subset must be 'fullset' or 'intersection', got {subset!r}")
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"GEdit-Bench folder not found: {d}")
    parquet = sorted(d.rglob("*.parquet"))
    jsonl = sorted(d.rglob("*.jsonl"))
    if parquet and jsonl:
        raise ValueError(f"{d} holds both parquet shards and jsonl files: point --data at one layout")
    if parquet:
        rows, problems = _gedit_parquet(parquet)
    elif jsonl:
        rows, problems = _gedit_jsonl(jsonl)
    else:
        raise FileNotFoundError(f"{d}: no *.parquet shards and no *.jsonl export (see the README, Evaluation)")
    keys: dict[tuple, str] = {}
    kept = []
    for r in rows:
        if (r.key, r.language) in keys:
            problems.append(Problem(r.where, f"duplicate key {r.key!r} (first at {keys[(r.key, r.language)]})", r.key))
            continue
        keys[(r.key, r.language)] = r.where
        if r.language == language and (subset == "fullset" or r.intersection):
            kept.append(r)
    return kept, problems


def _gedit_jsonl(files) -> tuple[list[Row], list[Problem]]:
    rows, problems = [], []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{f}:{n}"
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(where, f"not valid JSON: {e}"))
                continue
            row, err = _check_gedit(d, where)
            if err:
                problems.append(Problem(where, err, str(d["key"]) if isinstance(d, dict) and "key" in d else None))
                continue
            img = d["input_image"]
            if not isinstance(img, str):
                problems.append(Problem(where, "input_image must be a path relative to the jsonl file", row.key))
                continue
            row.image_path = str(f.parent / img)
            rows.append(row)
    return rows, problems


def _gedit_parquet(files) -> tuple[list[Row], list[Problem]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading GEdit-Bench parquet shards needs pyarrow (pip install pyarrow), or export the "
                          "dataset to jsonl + images (README, Evaluation)") from None
    rows, problems = [], []
    for f in files:
        table = pq.read_table(f)
        for n, d in enumerate(table.to_pylist()):
            where = f"{f}[{n}]"
            row, err = _check_gedit(d, where)
            if err:
                problems.append(Problem(where, err, str(d.get("key")) if isinstance(d, dict) else None))
                continue
            img = d["input_image"]
            if isinstance(img, dict) and img.get("bytes"):
                row.image_bytes = img["bytes"]
            elif isinstance(img, dict) and img.get("path"):
                row.image_path = str(f.parent / img["path"])
            else:
                problems.append(Problem(where, "input_image holds neither bytes nor a path", row.key))
                continue
            rows.append(row)
    return rows, problems


def read_imgedit(data_dir: str | Path, images: str | Path | None = None) -> tuple[list[Row], list[Problem]]:
    """ImgEdit-Bench Basic: ``basic_edit.json`` in ``data_dir`` (or ``data_dir`` is that file)."""
    p = Path(data_dir)
    f = p if p.is_file() else p / "basic_edit.json"
    if not f.exists():
        raise FileNotFoundError(f"ImgEdit-Bench Basic: {f} not found (the benchmark's basic_edit.json)")
    root = Path(images) if images else (f.parent / "singleturn" if (f.parent / "singleturn").is_dir() else f.parent)
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{f}: expected an object {{key: {{id, prompt, edit_type}}}}")
    rows, problems = [], []
    for key, d in meta.items():
        where = f"{f}[{key!r}]"
        if not isinstance(d, dict):
            problems.append(Problem(where, f"row is not an object ({type(d).__name__})", str(key)))
            continue
        missing = [k for k in ("id", "prompt", "edit_type") if k not in d]
        if missing:
            problems.append(Problem(where, f"missing field(s) {missing}", str(key)))
            continue
        if d["edit_type"] not in IMGEDIT_TYPES:
            problems.append(Problem(where, f"edit_type {d['edit_type']!r} is not one of {IMGEDIT_TYPES}", str(key)))
            continue
        if not isinstance(d["prompt"], str) or not d["prompt"].strip():
            problems.append(Problem(where, "prompt is empty", str(key)))
            continue
        rows.append(Row(key=str(key), group=d["edit_type"], instruction=d["prompt"],
                        image_path=str(root / d["id"]), where=where))
    return rows, problems
