"""Config faults (issue 11): bad numbers and intervals stop at start-up naming the field, before any work;
``train --help`` exits 0 with the override syntax; ``--dry-run`` validates without loading weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import kontext_mllm, toy
from edit_r1_jax import config as config_lib
from edit_r1_jax import train
from edit_r1_jax.folders import FolderError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("field,value,expect", [
    ("train.learning_rate", float("nan"), "train.learning_rate=nan must be finite"),
    ("train.learning_rate", -1e-3, "train.learning_rate=-0.001 must be >= 0"),
    ("train.max_grad_norm", 0.0, "train.max_grad_norm=0.0 must be > 0"),
    ("train.adam_b1", 1.0, "train.adam_b1=1.0 must be < 1"),
    ("train.adam_b2", float("inf"), "train.adam_b2=inf must be finite"),
    ("train.weight_decay", -0.1, "train.weight_decay=-0.1 must be >= 0"),
    ("checkpoint.every", 0, "checkpoint.every=0 must be >= 1"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep=0 must be >= 1"),
    ("train.max_empty_epochs", 0, "train.max_empty_epochs=0 must be >= 1"),
    ("eval.batch_size", 0, "eval.batch_size=0 must be >= 1"),
    ("checkpoint.restore_step", -2, "checkpoint.restore_step=-2 must be >= -1"),
    ("data.on_duplicate", "ignore", "data.on_duplicate='ignore'"),
])
def test_bad_fields_stop_before_any_work(tmp_path, field, value, expect):
    c = toy.get_config()
    c.run_dir = str(tmp_path)
    group, name = field.split(".")
    c[group][name] = value
    with pytest.raises(config_lib.ConfigError) as e:
        train.run(c)
    assert expect in str(e.value)
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_reward_prompt_template_file_must_exist(tmp_path):
    c = toy.get_config()
    c.run_dir = str(tmp_path / "run")
    c.reward.prompt_template = str(tmp_path / "official_prompt.txt")
    with pytest.raises(config_lib.ConfigError) as e:
        train.run(c)
    assert "reward.prompt_template=" in str(e.value) and "official_prompt.txt" in str(e.value)
    assert "not found" in str(e.value)
    (tmp_path / "official_prompt.txt").write_text("Rate the edit '{prompt}' from 0 to 5.")
    config_lib.validate(c)  # an existing file with a {prompt} field passes


def test_unused_ema_field_is_gone():
    assert "ema" not in toy.get_config().train  # the EMA policy is always kept (spec B.7)


def test_empty_epoch_guard_and_nonfinite_check_name_the_quantity():
    with pytest.raises(train.NonFiniteError, match="epoch 3, optimizer step 7: grad_norm is inf"):
        train.check_finite(3, 7, {"loss": np.float32(0.5), "grad_norm": np.float32(np.inf)}, {})
    theta = {"blocks": {"0": {"lora_a": np.ones(2, np.float32), "lora_b": np.array([0.0, np.nan], np.float32)}}}
    with pytest.raises(train.NonFiniteError, match="LoRA parameter blocks.0.lora_b of theta"):
        train.check_finite(0, 1, {"loss": np.float32(0.5)}, theta)


def test_help_exits_zero_with_override_syntax_and_fields():
    r = subprocess.run([sys.executable, "-m", "edit_r1_jax.train", "--config", "configs/kontext_mllm.py", "--help"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for s in ("--config.FIELD=VALUE", "--dry-run", "fields of configs/kontext_mllm.py", "  train: ",
              "  lora: ", "  checkpoint: ", "restore_step=-1", "  task = 'kontext'"):
        assert s in r.stdout, (s, r.stdout)


def test_dry_run_toy_prints_sizes(capsys, tmp_path):
    c = toy.get_config("long")  # 120 epochs x 2 optimizer steps
    c.run_dir = str(tmp_path)
    report = train.dry_run(c)
    assert report["samples_per_epoch"] == 64 and report["optimizer_steps"] == 240 and report["train_rows"] == 256
    assert "no weights were loaded" in capsys.readouterr().out


def test_dry_run_kontext_checks_folders(tmp_path):
    c = kontext_mllm.get_config()
    c.run_dir = str(tmp_path / "run")
    c.model.dir = str(tmp_path / "no_model")
    c.data.root = str(tmp_path / "data")
    c.reward.mllm_dir = str(tmp_path / "no_qwen")
    c.mesh.data = 1
    c.sample.rollout_batch_size = c.train.micro_batch_size = c.eval.batch_size = 72
    with pytest.raises(FolderError, match=r"model.dir .*no_model: folder not found"):
        train.dry_run(c)
    (tmp_path / "no_model" / "transformer").mkdir(parents=True)
    with pytest.raises(FolderError, match=r"missing config.json, params.safetensors"):
        train.dry_run(c)


def test_dry_run_flag_on_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "edit_r1_jax.train", "--dry-run", f"--config.run_dir={tmp_path}",
                        "--config.checkpoint.every=0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "checkpoint.every=0 must be >= 1" in r.stderr


def test_dry_run_kontext_on_a_converted_tiny_pipeline(tmp_path, capsys):
    import json

    from PIL import Image

    from kontext_tiny import save_and_convert

    _, model = save_and_convert(tmp_path)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for split, n in (("train", 3), ("test", 2)):
        lines = []
        for i in range(n):
            Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(data / "images" / f"{split}{i}.png")
            lines.append(json.dumps({"prompt": f"make it red {i}", "image": f"images/{split}{i}.png"}))
        (data / f"{split}_metadata.jsonl").write_text("\n".join(lines) + "\n")
    c = kontext_mllm.get_config()
    c.update(run_dir=str(tmp_path / "run"))
    c.model.dir, c.data.root, c.data.text_cache = str(model), str(data), False
    c.reward.weights = {"toy_edit": 1.0}  # no MLLM folder in this check
    c.mesh.data = 1
    report = train.dry_run(c)
    assert report["train_rows"] == 3 and report["test_rows"] == 2 and report["samples_per_epoch"] == 288
    assert report["model"]["num_layers"] == 1
    assert "no weights were loaded" in capsys.readouterr().out
    # the same dataset with one image path escaping the root is caught by the dry run
    (data / "train_metadata.jsonl").write_text(json.dumps({"prompt": "x", "image": "../escape.png"}) + "\n")
    from edit_r1_jax.data.source import DatasetError

    with pytest.raises(DatasetError, match="leaves the dataset root"):
        train.dry_run(c)
