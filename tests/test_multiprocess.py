"""Multi-controller training: 2 processes x 4 CPU devices (gloo over loopback) equal 1 process x 8 devices.

(Resuming a 2-process run's checkpoint in a 1-process run is checked on the paper path, in
tests/test_multiprocess_kontext.py.)
Tolerance: the two runs compile the same partitioned program over the same 8-device mesh, but cross-process
all-reduces go through gloo, whose summation order differs from XLA's in-process all-reduce. Float32 rounding
differences are then amplified by Adam only where a coordinate's gradient is itself at rounding-noise level
(Adam normalises per coordinate, so such an entry may move by a fraction of one step, lr = 1e-3); seen: one
entry of 128 off by 2.6e-6. So rtol 1e-5 and atol 1e-5 (1% of one Adam step); a real divergence (wrong data
share, wrong gather order) changes every entry by O(lr).
"""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from devices import ROOT, env as device_env

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("mp_train_worker.py"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, devices, timeout=900):
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=device_env(devices), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=900):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
        assert p.returncode == 0, out[-4000:]
    return outs


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _assert_same(a, b):
    keys = [k for k in a if "/" in k]
    assert keys and sorted(keys) == sorted(k for k in b if "/" in k)
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    two = tmp_path / "two"
    procs = [_run([two, 2, tmp_path / "two.npz", 2, i, port], devices=4) for i in range(2)]
    procs.append(_run([tmp_path / "one", 2, tmp_path / "one.npz"], devices=8))
    _wait(procs)
    a, b = _load(tmp_path / "two.npz"), _load(tmp_path / "one.npz")
    assert (int(a["processes"]), int(a["devices"])) == (2, 8)
    assert (int(b["processes"]), int(b["devices"])) == (1, 8)
    assert int(a["step"]) == int(b["step"]) == 2
    _assert_same(a, b)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_b" in k)  # it trained
