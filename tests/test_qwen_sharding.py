"""MLLMReward on a (data=2, fsdp=2, tensor=2) mesh of 8 host CPU devices equals the unsharded run, with the
parameters actually sharded. Runs in a subprocess because the device count must be set before jax starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from qwen_fixtures import qwen_tokenizer_dir
from devices import ROOT, env as device_env

SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp, numpy as np
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from qwen_fixtures import save_tiny_checkpoint, convert_cli
from edit_r1_jax.parallel.mesh import make_mesh
from edit_r1_jax.rewards.mllm import MLLMReward

assert len(jax.devices()) == 8, jax.devices()
root, tok = Path(sys.argv[1]), Path(sys.argv[2])
save_tiny_checkpoint(root / "hf", tok, seed=2)
convert_cli(root / "hf", root / "jax")
rng = np.random.default_rng(0)
src, edt = rng.random((3, 56, 84, 3)).astype(np.float32), rng.random((3, 56, 56, 3)).astype(np.float32)
ins, req = ["add a hat", "remove the tree on the left", "b"], ["", "keep the sky", ""]
plain = MLLMReward(root / "jax", dtype=jnp.float32)
s0, p0 = plain.score(src, edt, ins, req)
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
sharded = MLLMReward(root / "jax", dtype=jnp.float32, mesh=mesh)
s1, p1 = sharded.score(src, edt, ins, req)
q = sharded.model.model.layers[0].self_attn.q_proj.kernel[...]
v = sharded.model.visual.blocks[0].mlp.up_proj.kernel[...]
print(json.dumps({"s0": s0.tolist(), "s1": s1.tolist(), "p0": p0.tolist(), "p1": p1.tolist(),
                  "q_spec": str(q.sharding.spec), "q_shard": list(q.addressable_shards[0].data.shape),
                  "q_shape": list(q.shape), "v_shard": list(v.addressable_shards[0].data.shape),
                  "v_shape": list(v.shape)}))
"""


def test_sharded_equals_unsharded(tmp_path, tmp_path_factory):
    import numpy as np

    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp().parent / "qwen_cache")
    env = device_env(8)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(tok), str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # q_proj kernel [embed, heads]: embed over fsdp (2), heads over tensor (2).
    assert r["q_shard"] == [r["q_shape"][0] // 2, r["q_shape"][1] // 2], r
    assert r["v_shard"] == [r["v_shape"][0] // 2, r["v_shape"][1] // 2], r
    # Same float32 math, different reduction splits across devices: 1e-5 on scores/probabilities.
    np.testing.assert_allclose(r["s1"], r["s0"], atol=1e-5)
    np.testing.assert_allclose(r["p1"], r["p0"], atol=1e-5)
