"""The command-line entry points exist and answer --help (the converter lists every subcommand)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tools.convert_weights.__main__ import MODULES, build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_converter_has_every_subcommand():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"flux-transformer", "export-lora", "flux-vae", "clip-text", "t5-encoder", "kontext",
                                "qwen2.5-vl"}
    for name in MODULES:
        assert (ROOT / "tools" / "convert_weights" / f"{name}.py").exists(), name


@pytest.mark.parametrize("module", ["edit_r1_jax.train", "edit_r1_jax.edit", "edit_r1_jax.score",
                                    "edit_r1_jax.embed_text", "edit_r1_jax.plan", "tools.convert_weights"])
def test_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]  # asking for help is not an error
    if module == "edit_r1_jax.train":  # the flags, with the default config
        assert "--config" in out and "toy.py" in out, out[-2000:]
    else:
        assert "usage" in out.lower(), out[-2000:]
