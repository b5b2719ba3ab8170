"""Metrics to metrics.jsonl and TensorBoard, and PNG sample grids; written by process 0 only."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


class MetricWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.run_dir = Path(run_dir)
        self._tb = None
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)

    def image_grid(self, name: str, step: int, sources: np.ndarray, edited: np.ndarray,
                   scores: Sequence[float], captions: Sequence[str] = ()) -> Path | None:
        """Rows of (source | edited | score), images float [0,1] [B,H,W,3], saved as a PNG."""
        if not self.active:
            return None
        path = self.run_dir / "samples" / f"{name}_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid_image(sources, edited, scores, captions).save(path)
        return path

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def grid_image(sources, edited, scores, captions=(), min_side: int = 96) -> Image.Image:
    sources, edited = np.asarray(sources), np.asarray(edited)
    b, h, w, _ = sources.shape
    zoom = max(1, min_side // h)
    cell_h, cell_w, text_w = h * zoom, w * zoom, 260
    canvas = Image.new("RGB", (2 * cell_w + text_w, b * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(b):
        for j, img in enumerate((sources[i], edited[i])):
            tile = Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
            canvas.paste(tile.resize((cell_w, cell_h), Image.NEAREST), (j * cell_w, i * cell_h))
        caption = captions[i] if i < len(captions) else ""
        draw.text((2 * cell_w + 4, i * cell_h + 4), f"{float(scores[i]):.3f}\n{caption[:40]}", fill="black")
    return canvas


class Timer:
    """Seconds per phase, accumulated between resets: ``with timer("rollout"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t

        return _Ctx()

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        self.seconds = {}
        return out
