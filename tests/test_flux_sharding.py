"""FluxTransformer (with LoRA, remat) on 8 host CPU devices, mesh data x fsdp x tensor = 2x2x2, equals one device.

Runs tests/flux_sharding_check.py in a subprocess because the 8 fake devices must be configured before jax is
imported (other tests in this process already imported it). Tolerances are stated in that script.
"""

import json
import subprocess
import sys
from pathlib import Path
from devices import env as device_env


def test_sharded_forward_and_grad_match_single_device():
    script = Path(__file__).with_name("flux_sharding_check.py")
    env = device_env(8)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["to_q_spec"] == ["fsdp", "tensor"]
    assert result["to_q_shard_shape"] == [s // 2 for s in result["to_q_shape"]]
    assert result["out_rel_err"] < 1e-5
