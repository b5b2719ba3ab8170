"""edit_r1_jax.host_memory: glibc kept from handing XLA:CPU fresh pages on every call, opt-in (train's
config.host_malloc=keep, --host-malloc keep of edit, evaluate and the benchmarks)."""

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

# A jitted program with 32 MB of temporaries (sin(x) and cos(x), 1024 x 4096 float32 each) and a small output.
# The child prints the minor page faults of each of 16 calls after 4 warm-up calls.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    from edit_r1_jax import host_memory
    print(json.dumps({"applied": host_memory.configure(sys.argv[1], "--host-malloc")}))
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.sin(x) @ jnp.cos(x).T, axis=0))
    x = jnp.ones((1024, 4096), jnp.float32)
    for _ in range(4):
        f(x).block_until_ready()
    faults = []
    for _ in range(16):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"faults": faults}))
""")


def _faults(setting: str) -> tuple[str, list[int]]:
    r = subprocess.run([sys.executable, "-c", _CHILD, setting], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    return lines[0]["applied"], lines[1]["faults"]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_reuses_the_pages_of_the_previous_call():
    applied, faults = _faults("system")
    assert applied == "system"
    # as glibc is, each call faults in fresh pages for its temporaries: at least half their 32 MB (8192 pages of
    # 4 KiB) in a typical call (measured: 8193-12375 pages per call)
    assert sorted(faults)[len(faults) // 2] >= 4096, faults
    applied, faults = _faults("keep")
    assert applied == "keep"
    # kept: once the heap has grown to the program's size, a call reuses its pages. Measured 0 in most calls; the
    # heap still grows now and then (8192 pages in a few calls, more often under the tests' XLA flags), hence
    # the median; 1024 pages (4 MB) leaves room for Python's own small allocations.
    assert sorted(faults)[len(faults) // 2] < 1024, faults


@pytest.mark.parametrize("setting,expected", [("system", "system"), ("keep", "keep"), (" Keep ", "keep")])
def test_resolve(setting, expected):
    assert host_memory.resolve(setting, "glibc") == expected


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match=r"--host-malloc='always': expected one of system, keep"):
        host_memory.resolve("always", "glibc", "--host-malloc")
    with pytest.raises(ValueError, match=r"--config.host_malloc=keep needs glibc's mallopt; this C library is musl"):
        host_memory.resolve("keep", "musl")
    assert host_memory.resolve("system", "musl") == "system"  # nothing to set
    c = toy.get_config()
    c.host_malloc = "always"
    with pytest.raises(config_lib.ConfigError, match=r"host_malloc='always': expected one of system, keep"):
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
    out = stderr()
    assert "host malloc: keep" not in out and "num_epochs=0 must be >= 1" in out, out[-3000:]  # default: as is
    out = stderr("--config.host_malloc=always")
    assert "--config.host_malloc='always': expected one of system, keep" in out, out[-3000:]
