"""Metrics to metrics.jsonl and TensorBoard, and PNG sample grids; written by process 0 only, through etils.epath
so that the run directory may be a local folder or a bucket (gs://...) alike.

On a local run directory metrics.jsonl is appended to and TensorBoard writes in place. A bucket object cannot be
appended to, so on a remote one metrics.jsonl is rewritten whole (earlier lines included, read back at start)
at most every ``sync_seconds`` and at close, and TensorBoard writes its event files to a local temporary folder
that is copied to ``run_dir/tensorboard`` on the same schedule (tensorboardX's own gs:// writer needs
google-cloud-storage credentials of its own and covers no other protocol).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from typing import Mapping, Sequence

import jax
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from edit_r1_jax.runpath import is_local

log = logging.getLogger(__name__)


class MetricWriter:
    def __init__(self, run_dir, tensorboard: bool = True, sync_seconds: float = 60.0):
        self.active = jax.process_index() == 0
        self.run_dir = epath.Path(run_dir)
        self.local = is_local(self.run_dir)
        self.sync_seconds = float(sync_seconds)
        self._tb = None
        self._tb_local = None
        self._last_sync = time.monotonic()
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "metrics.jsonl"
            if self.local:
                self._jsonl = open(os.fspath(path), "a")
            else:
                self._lines = path.read_text().splitlines(keepends=True) if path.exists() else []
            if tensorboard:
                from tensorboardX import SummaryWriter

                if self.local:
                    self._tb = SummaryWriter(os.fspath(self.run_dir / "tensorboard"))
                else:
                    self._tb_local = tempfile.mkdtemp(prefix="edit_r1_tb_")
                    self._tb = SummaryWriter(self._tb_local)
                    log.info("TensorBoard: events written to %s and copied to %s every %.0f s", self._tb_local,
                             self.run_dir / "tensorboard", self.sync_seconds)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        line = json.dumps({"step": int(step), "time": time.time(), **clean}) + "\n"
        if self.local:
            self._jsonl.write(line)
            self._jsonl.flush()
        else:
            self._lines.append(line)
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if not self.local and time.monotonic() - self._last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Push metrics.jsonl and TensorBoard events to a remote run directory (no-op on a local one)."""
        if not self.active or self.local:
            return
        (self.run_dir / "metrics.jsonl").write_text("".join(self._lines))
        if self._tb is not None:
            self._tb.flush()
            self._copy_tensorboard()
        self._last_sync = time.monotonic()

    def _copy_tensorboard(self) -> None:
        dst = self.run_dir / "tensorboard"
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(os.listdir(self._tb_local)):
            with open(os.path.join(self._tb_local, f), "rb") as src:
                (dst / f).write_bytes(src.read())

    def image_grid(self, name: str, step: int, sources: np.ndarray, edited: np.ndarray,
                   scores: Sequence[float], captions: Sequence[str] = ()) -> epath.Path | None:
        """Rows of (source | edited | score), images float [0,1] [B,H,W,3], saved as a PNG."""
        if not self.active:
            return None
        path = self.run_dir / "samples" / f"{name}_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        grid_image(sources, edited, scores, captions).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        return path

    def close(self) -> None:
        if self.active:
            if self.local:
                self._jsonl.close()
            else:
                self.sync()
            if self._tb is not None:
                self._tb.close()
                if not self.local:
                    self._copy_tensorboard()


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
