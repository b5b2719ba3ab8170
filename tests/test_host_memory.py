"""edit_r1_jax.host_memory: XLA:CPU's per-call buffers kept from faulting in fresh pages on every call (train's
config.host_malloc, --host-malloc of edit, evaluate and the benchmarks; "auto", the default, keeps on a CPU-only
jax)."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from edit_r1_jax import config as config_lib
from edit_r1_jax import host_memory
from configs import toy

# A jitted program with 256 MB of temporaries (sin(x) and cos(x), 2^19 x 64 float32 each) and a small output:
# above the 64 MB that a thread's own glibc arena can hold, as the DiT's buffers are (so a call that ran on
# XLA's dispatch thread would fault whatever mallopt says). The child prints the minor page faults of each of 16
# calls after 4 warm-up calls.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    from edit_r1_jax import host_memory
    print(json.dumps({"applied": host_memory.configure(sys.argv[1], "--host-malloc")}))
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sin(x).T @ jnp.cos(x))
    x = jnp.ones((1 << 19, 64), jnp.float32)
    for _ in range(4):
        f(x).block_until_ready()
    faults = []
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"faults": faults}))
""")


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return {**env, **{k: v for k, v in extra.items() if v is not None}}


def _faults(setting: str) -> tuple[str, list[int]]:
    r = subprocess.run([sys.executable, "-c", _CHILD, setting], capture_output=True, text=True, timeout=300,
                       env=_child_env(JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return lines[0]["applied"], lines[1]["faults"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_reuses_the_pages_of_the_previous_call():
    applied, faults = _faults("system")
    assert applied == "system"
    # as glibc is, each call faults in fresh pages for its temporaries: at least half their 256 MB (65536 pages of
    # 4 KiB) in a typical call (measured: 65537-65541 pages per call)
    assert sorted(faults)[len(faults) // 2] >= 32768, faults
    applied, faults = _faults("keep")
    assert applied == "keep"
    # kept: once the heap has grown to the program's size, a call reuses its pages. Measured 0 in most calls; the
    # heap still grows now and then (one call of 16), hence the median; 1024 pages (4 MB) leaves room for
    # Python's own small allocations. Either part of keep alone fails this: without the inline calls (dispatch
    # thread's arena) 65537 pages per call, without mallopt (main heap, mmap above 32 MB) as many.
    assert sorted(faults)[len(faults) // 2] < 1024, faults
    # auto on a CPU-only jax is keep, with the same effect (both parts: without the inline calls the buffers come
    # from XLA's dispatch thread's arena, which maps them afresh, mallopt or not)
    applied, faults = _faults("auto")
    assert applied == "keep"
    assert sorted(faults)[len(faults) // 2] < 1024, faults


def _auto_choice(tmp_path, platforms=None, plugin=None) -> list:
    """host_memory.auto_choice() in a fresh process (jax not started) with JAX_PLATFORMS=``platforms`` (None:
    unset) and, if ``plugin``, a module of that name installed in the ``jax_plugins`` namespace package."""
    path = os.environ.get("PYTHONPATH", "")
    if plugin:
        os.makedirs(tmp_path / "jax_plugins" / plugin)
        (tmp_path / "jax_plugins" / plugin / "__init__.py").write_text("def initialize():\n    pass\n")
        path = os.pathsep.join(x for x in (str(tmp_path), path) if x)
    code = "import json; from edit_r1_jax import host_memory; print(json.dumps(host_memory.auto_choice()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=_child_env(JAX_PLATFORMS=platforms, PYTHONPATH=path or None))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_auto_keeps_only_where_jax_runs_on_the_cpu(tmp_path):
    assert _auto_choice(tmp_path, "cpu") == ["keep", "JAX_PLATFORMS=cpu"]
    assert _auto_choice(tmp_path, "cuda") == ["system", "JAX_PLATFORMS=cuda"]
    assert _auto_choice(tmp_path, "tpu,cpu") == ["system", "JAX_PLATFORMS=tpu,cpu"]
    # JAX_PLATFORMS unset: an installed accelerator plugin (found as jax finds them, none imported) means system
    assert _auto_choice(tmp_path, None, plugin="fake_accelerator") == [
        "system", "accelerator plugin installed: fake_accelerator"]
    if not host_memory.accelerator_plugins():  # this machine's jax is CPU-only (CI)
        assert _auto_choice(tmp_path / "plain", None) == [
            "keep", "jax on the CPU only: no accelerator plugin installed"]
    # once jax's backend runs (this test process: conftest started it) it is too late for the dispatch part
    assert host_memory.auto_choice() == ("system", "jax's backend had started already")


@pytest.mark.parametrize("setting,expected", [("system", "system"), ("keep", "keep"), (" Keep ", "keep"),
                                              ("AUTO", "auto")])
def test_resolve(setting, expected):
    assert host_memory.resolve(setting, "glibc") == expected


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match=r"--host-malloc='always': expected one of auto, system, keep"):
        host_memory.resolve("always", "glibc", "--host-malloc")
    with pytest.raises(ValueError, match=r"--config.host_malloc=keep needs glibc's mallopt; this C library is musl"):
        host_memory.resolve("keep", "musl")
    assert host_memory.resolve("system", "musl") == "system"  # nothing to set
    assert host_memory.resolve("auto", "musl") == "auto"  # decided at start-up (system there)
    c = toy.get_config()
    c.host_malloc = "always"
    with pytest.raises(config_lib.ConfigError, match=r"host_malloc='always': expected one of auto, system, keep"):
        config_lib.validate(c)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_train_applies_the_config_field(tmp_path):
    # num_epochs=0 is refused by the config check, which runs right after the allocator is set: each run stops
    # within seconds, having logged the setting (or refused it)
    cmd = [sys.executable, "-m", "edit_r1_jax.train", f"--config.run_dir={tmp_path / 'run'}", "--config.num_epochs=0",
           "--config.compile_cache_dir=none"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def stderr(*extra):
        r = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=300, cwd=root)
        assert r.returncode != 0
        return r.stderr

    out = stderr("--config.host_malloc=keep")
    assert "host malloc: keep (--config.host_malloc=keep)" in out and "num_epochs=0 must be >= 1" in out, out[-3000:]
    out = stderr("--config.host_malloc=system")
    assert "host malloc: keep" not in out and "num_epochs=0 must be >= 1" in out, out[-3000:]
    # the default, auto, reached before anything started jax's backend (else it would say so and leave it as is)
    out = stderr("--config.host_malloc=auto")
    cpu_only = os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and not host_memory.accelerator_plugins()
    want = "host malloc: keep (--config.host_malloc=auto: " if cpu_only else "host malloc: glibc and jax as they are"
    assert want in out and "had started already" not in out, out[-3000:]
    out = stderr("--config.host_malloc=always")
    assert "--config.host_malloc='always': expected one of auto, system, keep" in out, out[-3000:]
