"""QwenImageTransformer (LoRA, remat, text mask, reference tokens) on 8 host CPU devices, mesh data x fsdp x tensor =
2x2x2, loaded by ``params.load_transformer(mesh=...)``, equals one device.

The pytest test runs this file as a subprocess (the 8 fake devices must be configured before jax is imported; other
tests in the pytest process already imported it). Tolerance: sharded matmuls and all-reduces change float32
summation order: 1e-5 of max|output| for the velocity, 1e-4 of max|grad| per LoRA tensor.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from devices import env as device_env


def test_sharded_forward_and_grad_match_single_device():
    env = device_env(8)
    proc = subprocess.run([sys.executable, str(Path(__file__))], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["to_q_spec"] == ["fsdp", "tensor"]
    assert result["img_mlp_in_spec"] == ["fsdp", "tensor"]
    assert result["out_rel_err"] < 1e-5 and result["grad_rel_err"] < 1e-4


def _main():
    import tempfile

    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    jax.config.update("jax_default_matmul_precision", "highest")
    from edit_r1_jax import weights
    from edit_r1_jax.diffusion import qwen_image as Q
    from edit_r1_jax.models import lora as L
    from edit_r1_jax.models.qwen_image import params
    from edit_r1_jax.models.qwen_image.modeling import QwenImageConfig, QwenImageTransformer, qwen_image_velocity
    from edit_r1_jax.parallel import mesh as mesh_lib
    from edit_r1_jax.parallel import rules

    assert len(jax.devices()) == 8, jax.devices()
    lcfg = L.LoRAConfig(rank=4, alpha=8.0)
    cfg = QwenImageConfig(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                          num_attention_heads=4, joint_attention_dim=12, axes_dims_rope=(4, 6, 6), lora=lcfg)
    graphdef, base, lora = L.split_policy(QwenImageTransformer(cfg, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])

    rng = np.random.default_rng(0)
    b, t = 4, 8
    shapes = [(1, 2, 3), (1, 3, 2)]
    img_ids, txt_ids = Q.position_ids(shapes, t)
    mask = (np.arange(t)[None, :] < np.array([8, 5, 3, 6])[:, None]).astype(np.int32)
    inp = dict(x=rng.standard_normal((b, 6, 16)).astype(np.float32),
               ref=rng.standard_normal((b, 6, 16)).astype(np.float32),
               prompt=rng.standard_normal((b, t, 12)).astype(np.float32), mask=mask,
               sigma=np.linspace(0.1, 0.9, b).astype(np.float32))
    w = rng.standard_normal((b, 6, 16)).astype(np.float32)

    def make_step(gd):
        def fwd(base, lora, a):
            return L.apply(gd, base, lora, a["x"], a["ref"], a["prompt"], a["mask"], a["sigma"], img_ids, txt_ids,
                           fn=qwen_image_velocity)

        return jax.jit(lambda base, lora, a: (fwd(base, lora, a),
                                              jax.grad(lambda l: jnp.sum(fwd(base, l, a) * w))(lora)))

    ref_out, ref_grad = jax.device_get(make_step(graphdef)(base, lora, inp))

    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with tempfile.TemporaryDirectory() as d:  # the trainer's path: converted folder -> sharded base + LoRA
        # per-layer keys, as the converter writes them: the loader stacks them shard by shard on the mesh
        flat = {k: np.asarray(v) for k, v in weights.flat_per_layer(base).items()}
        assert "transformer_blocks.1.attn.to_q.kernel" in flat, sorted(flat)[:8]
        weights.save_tensors(os.path.join(d, weights.PARAMS_FILE), flat)
        with open(os.path.join(d, weights.CONFIG_FILE), "w") as f:
            json.dump(cfg.to_diffusers(), f)
        _, g2, base2, lora2 = params.load_transformer(d, mesh=mesh, lora=lcfg, remat_policy="dots_saveable")
    lora_s = jax.device_put(lora, rules.state_shardings(lora, mesh))
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    inp_s = {k: jax.device_put(v, batch_sh) for k, v in inp.items()}
    with jax.set_mesh(mesh):
        out, grad = jax.device_get(make_step(g2)(base2, lora_s, inp_s))

    # stacked blocks (models/scan.py): layer 0's slice of transformer_blocks.<rest> [L, ...]
    kernel = base2["transformer_blocks"]["attn"]["to_q"]["kernel"].get_value()[0]
    mlp = base2["transformer_blocks"]["img_mlp"]["net"][0]["proj"]["kernel"].get_value()[0]
    a2 = lora2["transformer_blocks"]["attn"]["to_q"]["lora_a"].get_value()[0]
    assert a2.sharding.spec[0] == "fsdp", a2.sharding.spec
    scale = float(np.abs(ref_out).max())
    gerr = max(float(np.abs(g - r).max() / (np.abs(r).max() + 1e-30))
               for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)))
    result = {"out_rel_err": float(np.abs(out - ref_out).max()) / scale, "grad_rel_err": gerr,
              "to_q_spec": [str(s) for s in kernel.sharding.spec], "img_mlp_in_spec": [str(s) for s in mlp.sharding.spec],
              "to_q_shard_shape": list(kernel.addressable_shards[0].data.shape), "to_q_shape": list(kernel.shape)}
    print(json.dumps(result))
    assert result["out_rel_err"] < 1e-5 and gerr < 1e-4, result


if __name__ == "__main__":
    _main()
