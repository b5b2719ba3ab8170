"""Input faults (issue 11): dataset paths confined to the root, minimum image size and duplicate rows at
start-up validation, and the score / edit command lines validated like their file inputs."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edit_r1_jax import score
from edit_r1_jax.data import source

ROOT = Path(__file__).resolve().parents[1]


def _dataset(root: Path, images: list[str], rows: list[dict]) -> Path:
    for rel in images:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        size = (1, 1) if "tiny" in rel else (24, 20)
        Image.fromarray(np.full(size + (3,), 120, np.uint8)).save(p)
    (root / "train_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("path", ["../outside.png", "ABS"])
def test_image_paths_stay_inside_the_root(tmp_path, path):
    root = tmp_path / "data"
    _dataset(tmp_path, ["outside.png"], [])
    path = str(tmp_path / "outside.png") if path == "ABS" else path
    _dataset(root, ["images/a.png"], [{"prompt": "p", "image": "images/a.png"}, {"prompt": "q", "image": path}])
    with pytest.raises(source.DatasetError, match=r"train_metadata.jsonl:2: image path .* leaves the dataset root"):
        source.read_metadata(root, "train")
    rows = source.read_metadata(root, "train", allow_outside_root=True)
    assert Path(rows[1].image_path).resolve() == (tmp_path / "outside.png").resolve()


def test_tiny_image_is_refused_at_start_up(tmp_path):
    _dataset(tmp_path, ["images/a.png", "images/tiny.png"],
             [{"prompt": "p", "image": "images/a.png"}, {"prompt": "q", "image": "images/tiny.png"}])
    with pytest.raises(source.DatasetError, match=r"train_metadata.jsonl:2: image .*tiny.png is 1x1"):
        source.read_metadata(tmp_path, "train")


def test_duplicate_rows_are_reported_by_line(tmp_path, caplog):
    row = {"prompt": "make it red", "image": "images/a.png"}
    _dataset(tmp_path, ["images/a.png"], [row, {"prompt": "other", "image": "images/a.png"}, row,
                                          dict(row, image="./images/a.png")])
    with pytest.raises(source.DatasetError, match="2 duplicate .*line 3 repeats line 1, line 4 repeats line 1"):
        source.read_metadata(tmp_path, "train")
    with caplog.at_level(logging.WARNING, logger="edit_r1_jax.data.source"):
        rows = source.read_metadata(tmp_path, "train", on_duplicate="warn")
    assert len(rows) == 4 and "line 3 repeats line 1" in caplog.text


@pytest.fixture
def pair(tmp_path):
    for name, side in (("a.png", 32), ("b.png", 32), ("tiny.png", 1)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("case,expect", [
    ("empty_instruction", "--instruction is empty"),
    ("tiny_source", "--source: image .*tiny.png is 1x1"),
    ("missing_edited", "--edited: image file not found"),
    ("missing_model", "--model .*folder not found .*convert_weights qwen2.5-vl"),
    ("empty_model", "--model .*missing config.json, params.safetensors"),
])
def test_score_command_line_is_validated(pair, case, expect):
    args = dict(model=str(pair / "model"), source=str(pair / "a.png"), edited=str(pair / "b.png"),
                instruction="make it red")
    if case == "empty_instruction":
        args["instruction"] = "  "
    elif case == "tiny_source":
        args["source"] = str(pair / "tiny.png")
    elif case == "missing_edited":
        args["edited"] = str(pair / "nope.png")
    elif case == "empty_model":
        (pair / "model").mkdir()
    with pytest.raises(SystemExit) as e:
        score.main([x for k, v in args.items() for x in (f"--{k}", v)])
    assert re.search(expect, str(e.value)), str(e.value)
    assert "Repo id" not in str(e.value)


def test_score_jsonl_refuses_a_tiny_image(pair):
    (pair / "pairs.jsonl").write_text(json.dumps({"source": "tiny.png", "edited": "b.png", "instruction": "x"}) + "\n")
    with pytest.raises(SystemExit, match=r"pairs.jsonl:1: image .*tiny.png is 1x1"):
        score.main(["--model", str(pair), "--jsonl", str(pair / "pairs.jsonl")])


@pytest.mark.parametrize("module,expect", [("edit_r1_jax.score", ["(default: 8)", "pairs per reward call"]),
                                           ("edit_r1_jax.edit", ["(default: 28)", "Euler denoising steps"])])
def test_cli_help_shows_defaults(module, expect):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0
    for s in expect:
        assert s in r.stdout, r.stdout
