"""The compile benchmark's code path on tiny sizes (``bench/compile.py --smoke``): every case lowers and compiles
against the current signatures of engine.sample, engine.train_step and the reward's scoring function (a renamed
or added argument there broke the full-size benchmark once without any test noticing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_compile_bench_smoke():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "bench/compile.py", "--smoke", "--no-unrolled"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["smoke"] is True and set(out["cases"]) == {"rollout", "train", "reward"}, out
    for case, modes in out["cases"].items():
        r = modes["scan"]
        assert r["compile_s"] > 0 and r["stablehlo_lines"] > 100, (case, r)
