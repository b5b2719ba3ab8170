"""A tiny editing dataset in the reference's layout (spec F), shared by the paper-path tests: random non-square
images (the loader crops them) and ``{prompt, image, requirement}`` rows in ``<split>_metadata.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = ["make the sky red", "turn the cat into a dog", "add a hat", "remove the tree"]


def write_dataset(root: Path, sizes=(("train", 4), ("test", 2)), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True)
    for split, n in sizes:
        lines = []
        for i in range(n):
            path = f"images/{split}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (80, 96, 3), np.uint8)).save(root / path)  # non-square: cropped
            lines.append(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "image": path,
                                     "requirement": "keep the rest"}))
        (root / f"{split}_metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
