"""edit_r1_jax.compile_cache (train's config.compile_cache_dir, edit's and evaluate's --compile-cache-dir): where
compiled programs are kept between starts, and that a second start really loads them instead of compiling again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax

from configs import base
from edit_r1_jax import checkpoint as ckpt_lib
from edit_r1_jax import compile_cache

ROOT = Path(__file__).resolve().parent.parent

# One start of the trainer's cache set-up in a fresh process, then one jitted program; prints the cache hits and
# misses jax reports (its own monitoring events, not ours).
_START = """
import json, sys, jax
from edit_r1_jax import compile_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
compile_cache.use(sys.argv[1])
jax.jit(lambda x: (x @ x.T).sum() + 1)(jax.numpy.ones((8, 8))).block_until_ready()
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _start(setting: str, env_dir: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # keep even the tiny test program
    if env_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = env_dir
    r = subprocess.run([sys.executable, "-c", _START, setting], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_second_start_loads_the_compiled_program(tmp_path):
    cache = tmp_path / "xla"
    first = _start(str(cache))
    assert first["hits"] == 0 and first["misses"] >= 1, first
    assert any(cache.iterdir()), "nothing was written to the cache"
    second = _start(str(cache))
    assert second["hits"] >= 1 and second["misses"] == 0, second


def test_none_turns_the_cache_off_even_when_jax_has_one(tmp_path):
    env_dir = tmp_path / "from_env"
    out = _start("none", env_dir=str(env_dir))
    assert out["hits"] == 0, out
    assert not env_dir.exists() or not any(env_dir.iterdir()), "compile_cache_dir=none still wrote programs"


def test_where_the_cache_goes(tmp_path, monkeypatch):
    assert compile_cache.resolve("none") is None and compile_cache.resolve(" None ") is None
    assert compile_cache.resolve("gs://bucket/xla") == "gs://bucket/xla"  # bucket URLs untouched
    monkeypatch.chdir(tmp_path)
    assert compile_cache.resolve("rel/xla") == str(tmp_path / "rel" / "xla")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve("~/c") == str(tmp_path / "home" / "c")
    # "": jax's own setting wins (the test session set one in conftest) ...
    assert compile_cache.resolve("") == jax.config.jax_compilation_cache_dir
    # ... and without one, the user's cache folder
    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert compile_cache.resolve("") == str(tmp_path / "xdg" / "edit_r1_jax" / "xla")
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert compile_cache.resolve("") == str(tmp_path / "home" / ".cache" / "edit_r1_jax" / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_changing_it_does_not_block_a_resume():
    """Neither the cache nor scan-or-loop (the same stacked parameters, the same function) changes the run."""
    c = base.get_config()
    blocking, safe = ckpt_lib.config_changes({"compile_cache_dir": "", "model.dit.scan_layers": True, "seed": 1},
                                             {"compile_cache_dir": "none", "model.dit.scan_layers": False, "seed": 2})
    assert [b.split(":")[0] for b in blocking] == ["seed"], blocking
    assert [x.split(":")[0] for x in safe] == ["compile_cache_dir", "model.dit.scan_layers"], safe
    assert "compile_cache_dir" in c, "the field the trainer reads is missing from the base config"
