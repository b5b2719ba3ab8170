"""Procedural image-editing task for the CPU demo.

Images are small RGB arrays in [-1, 1] (HWC float32, default 16x16) on a plain mid-grey background with 2-3
coloured shapes (circle, square, triangle; each shape type at most once per image, so "the square" is
unambiguous). Edits:

* recolor: ``"make the red circle blue"``
* remove:  ``"remove the square"``
* move:    ``"move the triangle to the left"`` / ``"... to the right"`` / ``"move the triangle up"`` /
  ``"... down"`` -- by one shape size, so old and new footprints do not overlap.

Row ``i`` is generated from ``numpy.random.default_rng([seed, i])``: index-addressable and deterministic
(``ToySource`` is a grain random-access source). Each row carries the ground-truth target (rendered exactly,
no anti-aliasing) for the supervised warm start and for the verifier (``rewards/verifiers.py``).

Instructions are embedded without a text encoder (:func:`encode_instruction`): one token per content word, each
a one-hot whose index encodes both the word and its *role* (verb / object colour / shape / new colour /
direction), because Flux text tokens carry no position (txt_ids are zeros), so "red ... blue" must not depend
on order. Plus one "is a token" feature, zero padding to ``max_len``, and a pooled vector = sum of the tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["COLOURS", "SHAPES", "DIRECTIONS", "BACKGROUND", "EditSpec", "make_row", "make_batch", "ToySource",
           "encode_instruction", "render", "VOCAB_DIM"]

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "yellow": (1.0, 1.0, -1.0)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
OPS = ("recolor", "remove", "move")
BACKGROUND = (0.0, 0.0, 0.0)  # mid grey: equally far from every palette colour

_COLOUR_NAMES = tuple(COLOURS)
_DIR_NAMES = tuple(DIRECTIONS)
# Role-specific one-hot layout: [verb 3 | object colour 4 | shape 3 | new colour 4 | direction 4 | is-token 1]
_VERBS = ("make", "remove", "move")
_OFF_VERB, _OFF_COL, _OFF_SHAPE = 0, 3, 7
_OFF_NEW, _OFF_DIR, _OFF_TOK = 10, 14, 18
VOCAB_DIM = 19
_STOP = {"the", "to", "a", "it"}


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    y: int  # top-left of the bounding box
    x: int


@dataclasses.dataclass(frozen=True)
class EditSpec:
    op: str
    shape: str          # the edited shape's kind
    colour: str         # its current colour
    new_colour: str = ""
    direction: str = ""

    def instruction(self) -> str:
        if self.op == "recolor":
            return f"make the {self.colour} {self.shape} {self.new_colour}"
        if self.op == "remove":
            return f"remove the {self.shape}"
        if self.direction in ("left", "right"):
            return f"move the {self.shape} to the {self.direction}"
        return f"move the {self.shape} {self.direction}"


def _footprint(kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2.0
    if kind == "square":
        return np.ones((size, size), bool)
    if kind == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2.0) ** 2 - 0.25
    if kind == "triangle":  # apex up, one pixel wide at the top, full base at the bottom
        return np.abs(xx - c) <= yy / 2.0 + 1e-9
    raise ValueError(f"unknown shape {kind!r}")


def render(shapes, resolution: int, size: int) -> np.ndarray:
    img = np.empty((resolution, resolution, 3), np.float32)
    img[...] = BACKGROUND
    for s in shapes:
        fp = _footprint(s.kind, size)
        region = img[s.y:s.y + size, s.x:s.x + size]
        region[fp] = COLOURS[s.colour]
    return img


def _boxes_overlap(a, b, size, gap=1):
    return abs(a[0] - b[0]) < size + gap and abs(a[1] - b[1]) < size + gap


def _shape_size(resolution: int) -> int:
    return max(3, (resolution * 5) // 16)


def make_row(index: int, seed: int = 0, resolution: int = 16, min_shapes: int = 2, max_shapes: int = 3) -> dict:
    """Row ``index``: ``{"row_id", "prompt", "source" [R,R,3], "target" [R,R,3], "spec" (EditSpec)}``.

    ``min_shapes`` defaults to 2 so that "remove" never leaves an empty canvas (a blank output must not be a
    good answer on average: with one-shape images it scores ~0.4 mean reward under the verifier).
    """
    if not 1 <= min_shapes <= max_shapes <= len(SHAPES):
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {len(SHAPES)}, got {min_shapes}, {max_shapes}")
    if resolution < 16 or resolution % 2:
        raise ValueError(f"toy resolution must be an even number >= 16, got {resolution}")
    rng = np.random.default_rng([seed, index])
    size = _shape_size(resolution)
    hi = resolution - size  # last valid top-left coordinate
    for _ in range(1000):
        n = int(rng.integers(min_shapes, max_shapes + 1))
        kinds = rng.choice(SHAPES, size=n, replace=False)
        pos = [(int(rng.integers(0, hi + 1)), int(rng.integers(0, hi + 1))) for _ in range(n)]
        if any(_boxes_overlap(pos[i], pos[j], size) for i in range(n) for j in range(i)):
            continue
        shapes = [Shape(str(k), str(rng.choice(_COLOUR_NAMES)), p[0], p[1]) for k, p in zip(kinds, pos)]
        target_i = int(rng.integers(0, n))
        tgt = shapes[target_i]
        op = str(rng.choice(OPS))
        new_shapes = list(shapes)
        if op == "recolor":
            new = str(rng.choice([c for c in _COLOUR_NAMES if c != tgt.colour]))
            spec = EditSpec(op, tgt.kind, tgt.colour, new_colour=new)
            new_shapes[target_i] = dataclasses.replace(tgt, colour=new)
        elif op == "remove":
            spec = EditSpec(op, tgt.kind, tgt.colour)
            del new_shapes[target_i]
        else:
            options = []
            for d, (dy, dx) in DIRECTIONS.items():
                p = (tgt.y + dy * size, tgt.x + dx * size)
                if 0 <= p[0] <= hi and 0 <= p[1] <= hi and not any(
                        _boxes_overlap(p, (s.y, s.x), size) for j, s in enumerate(shapes) if j != target_i):
                    options.append((d, p))
            if not options:
                continue
            d, p = options[int(rng.integers(0, len(options)))]
            spec = EditSpec(op, tgt.kind, tgt.colour, direction=d)
            new_shapes[target_i] = dataclasses.replace(tgt, y=p[0], x=p[1])
        return {"row_id": index, "prompt": spec.instruction(), "source": render(shapes, resolution, size),
                "target": render(new_shapes, resolution, size), "spec": spec}
    raise RuntimeError(f"could not place shapes for toy row {index} (seed {seed}, resolution {resolution})")


def encode_instruction(text: str, max_len: int = 8, dim: int = 32):
    """``(tokens [max_len, dim] float32, pooled [dim] float32)`` for a toy instruction (see module docstring)."""
    if dim < VOCAB_DIM:
        raise ValueError(f"dim must be >= {VOCAB_DIM}, got {dim}")
    words = [w for w in text.lower().replace(",", " ").split() if w not in _STOP]
    if not words or words[0] not in _VERBS:
        raise ValueError(f"toy instruction must start with one of {_VERBS}: {text!r}")
    idx = [_OFF_VERB + _VERBS.index(words[0])]
    seen_colour = False
    for w in words[1:]:
        if w in COLOURS:
            off = _OFF_NEW if (words[0] == "make" and seen_colour) else _OFF_COL
            seen_colour = True
            idx.append(off + _COLOUR_NAMES.index(w))
        elif w in SHAPES:
            idx.append(_OFF_SHAPE + SHAPES.index(w))
        elif w in DIRECTIONS:
            idx.append(_OFF_DIR + _DIR_NAMES.index(w))
        else:
            raise ValueError(f"unknown word {w!r} in toy instruction {text!r}")
    if len(idx) > max_len:
        raise ValueError(f"instruction {text!r} has {len(idx)} tokens > max_len {max_len}")
    tokens = np.zeros((max_len, dim), np.float32)
    for k, i in enumerate(idx):
        tokens[k, i] = 1.0
        tokens[k, _OFF_TOK] = 1.0
    return tokens, tokens.sum(axis=0)


class ToySource:
    """grain random-access source: ``grain.MapDataset.source(ToySource(n, seed))``. Adds the instruction
    embedding (``tokens``, ``pooled``) to each row."""

    def __init__(self, num_rows: int, seed: int = 0, resolution: int = 16, max_len: int = 8, dim: int = 32,
                 min_shapes: int = 2, max_shapes: int = 3):
        self.num_rows, self.seed, self.resolution, self.max_len, self.dim = num_rows, seed, resolution, max_len, dim
        self.min_shapes, self.max_shapes = min_shapes, max_shapes

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int) -> dict:
        if not 0 <= int(index) < self.num_rows:
            raise IndexError(f"toy row {index} out of range [0, {self.num_rows})")
        row = make_row(int(index), self.seed, self.resolution, self.min_shapes, self.max_shapes)
        row["tokens"], row["pooled"] = encode_instruction(row["prompt"], self.max_len, self.dim)
        return row


def make_batch(rows: list[dict]) -> dict:
    """Stack rows: ``source``/``target`` ``[B,R,R,3]``, ``tokens`` ``[B,T,D]`` (when present), ``pooled``,
    ``row_id`` ``[B]``; ``prompt`` and ``spec`` as lists."""
    out = {"row_id": np.array([r["row_id"] for r in rows], np.int64),
           "source": np.stack([r["source"] for r in rows]), "target": np.stack([r["target"] for r in rows]),
           "prompt": [r["prompt"] for r in rows], "spec": [r["spec"] for r in rows]}
    if "tokens" in rows[0]:
        out["tokens"] = np.stack([r["tokens"] for r in rows])
        out["pooled"] = np.stack([r["pooled"] for r in rows])
    return out
