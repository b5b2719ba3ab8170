"""The evaluation's edit phase on a mesh: the tiny converted Kontext loaded sharded (DiT by its logical axes over
fsdp, VAE replicated), 3 rows padded to the 4-way batch axes (data 2 x fsdp 2), equal to the 1-device edit.
A subprocess: the host CPU device count must be set before jax starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from devices import ROOT, env as device_env

SCRIPT = r"""
import json, sys
from pathlib import Path
import jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
sys.path.insert(0, sys.argv[2])
from kontext_tiny import RESOLUTION, T5_LENGTH, save_and_convert
from edit_r1_jax.evaluate import _mesh
from edit_r1_jax.pipeline import KontextEditor

_, model = save_and_convert(Path(sys.argv[1]))
plain = KontextEditor.from_pretrained(model, t5_length=T5_LENGTH)
mesh = _mesh("data=2,fsdp=2", "--edit-mesh")
sharded = KontextEditor.from_pretrained(model, t5_length=T5_LENGTH, mesh=mesh, load_text_encoders=False)
rng = np.random.default_rng(0)
pixels = rng.integers(0, 256, (3, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
prompts = ["make the sky red", "turn the cat blue", "add a hat"]
h, w = plain.token_grid(RESOLUTION)
noise = np.concatenate([plain.make_noise(1, h, w, s) for s in (11, 12, 13)])
emb, pooled = plain.text_encoders.encode(prompts)  # once (the text encoders are not what is tested)
emb, pooled = np.asarray(emb), np.asarray(pooled)
a = plain.edit(pixels, prompt_embeds=emb, pooled=pooled, num_steps=2, noise=noise)
b = sharded.edit(pixels, prompt_embeds=emb, pooled=pooled, num_steps=2, noise=noise)
# one row alone (padded with 3 copies of itself) gives that row's result of the batch of 3
c = sharded.edit(pixels[1:2], prompt_embeds=emb[1:2], pooled=pooled[1:2], num_steps=2, noise=noise[1:2])
leaves = jax.tree.leaves(sharded._dit_state)
big = max(leaves, key=lambda x: x.size)
print(json.dumps({"shape": list(b.shape), "diff": float(np.abs(a - b).max()), "diff1": float(np.abs(a[1:2] - c).max()),
                  "multiple": sharded.batch_multiple, "mesh_devices": len(big.sharding.device_set),
                  "big_fully_replicated": bool(big.sharding.is_fully_replicated),
                  "vae_devices": len(jax.tree.leaves(sharded._vae_state)[0].sharding.device_set),
                  "range": [float(a.min()), float(a.max())], "spread": float(a.std())}))
"""


def test_sharded_edit_equals_one_device(tmp_path):
    env = device_env(4)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["multiple"] == 4 and r["shape"] == [3, 64, 64, 3], r  # 3 rows padded to 4, the padding dropped
    assert r["mesh_devices"] == 4 and not r["big_fully_replicated"], r  # the DiT really is sharded (fsdp)
    assert r["vae_devices"] == 4, r
    assert r["spread"] > 1e-3, r  # not a constant image: the comparison below means something
    # float32 with highest matmul precision; sharded reductions (fsdp all-gathers, batch split) may sum in another
    # order, so allow a few float32 ulps of accumulated drift through 2 Euler steps and the VAE decoder
    assert r["diff"] < 1e-5, r
    assert r["diff1"] < 1e-5, r
