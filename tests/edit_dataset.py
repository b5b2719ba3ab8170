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


def tiny_paper_run(c, run_dir: Path, model_dir: Path, data: Path, resolution: int, reward_dir: Path):
    """A paper config (configs/*_mllm.py) cut to one epoch of tiny sizes on the tiny models: float32, no remat,
    LoRA rank 4, 2 groups x 2 rollouts of 3 steps, an evaluation before and after, a sample grid."""
    c.run_dir = str(run_dir)
    c.model.update(dir=str(model_dir), dtype="float32", param_dtype="float32", remat_policy="none")
    c.data.update(root=str(data), resolution=resolution)
    c.reward.mllm_dir = str(reward_dir)
    c.lora.rank = 4
    c.sample.update(num_steps=3, group_size=2, groups_per_batch=2, num_batches_per_epoch=1, rollout_batch_size=4)
    c.train.micro_batch_size = 2
    c.eval.update(every=1, num_steps=2, num_samples=2, batch_size=2)
    c.log.update(tensorboard=False, progress=False, image_every=1)
    c.num_epochs = 1
    return c


def check_one_epoch(out, run_dir: Path) -> dict:
    """What one epoch of a paper config must show: a reward in [0, 1], a finite loss, a non-zero gradient,
    an evaluation and its grid. Returns the last epoch's metrics."""
    m = out["last"]
    assert 0.0 <= m["reward/mllm"] <= 1.0
    assert np.isfinite(m["train/policy_loss"]) and np.isfinite(m["train/grad_norm"])
    assert m["train/grad_norm"] > 0  # the LoRA got a gradient through the whole path
    assert 0.0 <= out["eval"][0]["eval/reward_mean"] <= 1.0
    assert list((Path(run_dir) / "samples").glob("eval_*.png"))
    return m
