"""Helper for tests/test_flux_sharding.py (run as a subprocess: it needs 8 host CPU devices set before jax import).

Forward and LoRA gradient of a tiny FluxTransformer on a data x fsdp x tensor = 2x2x2 mesh vs one device.
Prints one JSON line with the measured errors and sharding facts; exits non-zero on failure.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from edit_r1_jax.models import lora as L  # noqa: E402
from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer, kontext_velocity  # noqa: E402
from edit_r1_jax.parallel import mesh as mesh_lib  # noqa: E402
from edit_r1_jax.parallel import rules  # noqa: E402


def main():
    assert len(jax.devices()) == 8, jax.devices()
    cfg = FluxConfig(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                     joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
                     remat_policy="dots_saveable", lora=L.LoRAConfig(rank=4, alpha=8.0))
    model = FluxTransformer(cfg, rngs=nnx.Rngs(0))
    graphdef, base, lora = L.split_policy(model)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    lora = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])

    rng = np.random.default_rng(0)
    b, n, t = 4, 6, 7
    rows, cols = np.divmod(np.arange(n), 3)
    inp = dict(
        x=rng.standard_normal((b, n, 8)).astype(np.float32),
        ref=rng.standard_normal((b, n, 8)).astype(np.float32),
        prompt=rng.standard_normal((b, t, 12)).astype(np.float32),
        pooled=rng.standard_normal((b, 10)).astype(np.float32),
        sigma=np.linspace(0.1, 0.9, b).astype(np.float32),
        img_ids=np.concatenate([np.stack([np.zeros(n), rows, cols], 1),
                                np.stack([np.ones(n), rows, cols], 1)]).astype(np.float32),
        txt_ids=np.zeros((t, 3), np.float32),
        guidance=np.full((b,), 2.5, np.float32),
    )
    w = rng.standard_normal((b, n, 8)).astype(np.float32)

    def fwd(base, lora, inp):
        return L.apply(graphdef, base, lora, inp["x"], inp["ref"], inp["prompt"], inp["pooled"], inp["sigma"],
                       inp["img_ids"], inp["txt_ids"], inp["guidance"], fn=kontext_velocity)

    def loss(lora, base, inp):
        return jnp.sum(fwd(base, lora, inp) * w)

    step = jax.jit(lambda base, lora, inp: (fwd(base, lora, inp), fwd(base, None, inp),
                                            jax.grad(loss)(lora, base, inp)))
    ref_out, ref_base, ref_grad = jax.device_get(step(base, lora, inp))

    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base_s = jax.device_put(base, rules.state_shardings(base, mesh))
    lora_s = jax.device_put(lora, rules.state_shardings(lora, mesh))
    batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    inp_s = {k: (jax.device_put(v, batch_sh) if k not in ("img_ids", "txt_ids") else v) for k, v in inp.items()}
    with jax.set_mesh(mesh):
        out, out_base, grad = step(base_s, lora_s, inp_s)
    out, out_base, grad = jax.device_get((out, out_base, grad))

    kernel = base_s["transformer_blocks"]["attn"]["to_q"]["kernel"].get_value()[0]
    spec = tuple(kernel.sharding.spec)
    shard_shape = kernel.addressable_shards[0].data.shape
    mlp = base_s["single_transformer_blocks"]["proj_mlp"]["kernel"].get_value()[0]
    lora_a = lora_s["transformer_blocks"]["attn"]["to_q"]["lora_a"].get_value()[0]
    scale = float(np.abs(ref_out).max())
    gflat = jax.tree.leaves(grad)
    rflat = jax.tree.leaves(ref_grad)
    gerr = max(float(np.abs(g - r).max() / (np.abs(r).max() + 1e-30)) for g, r in zip(gflat, rflat))
    result = {
        "out_rel_err": float(np.abs(out - ref_out).max()) / scale,
        "base_rel_err": float(np.abs(out_base - ref_base).max()) / scale,
        "grad_rel_err": gerr,
        "to_q_spec": [str(s) for s in spec],
        "to_q_shape": list(kernel.shape),
        "to_q_shard_shape": list(shard_shape),
        "proj_mlp_shard_shape": list(mlp.addressable_shards[0].data.shape),
        "lora_a_spec": [str(s) for s in lora_a.sharding.spec],
        "out_sharding": str(getattr(out, "sharding", None)),
    }
    # The trainer's loader: converted checkpoint -> base sharded on the mesh + LoRA initialised with shardings.
    import tempfile

    from edit_r1_jax import weights
    from edit_r1_jax.models.flux import params

    with tempfile.TemporaryDirectory() as d:
        # per-layer keys, as the converters write them: the loader stacks them shard by shard on the mesh
        flat = {k: np.asarray(v) for k, v in weights.flat_per_layer(base).items()}
        weights.save_tensors(os.path.join(d, weights.PARAMS_FILE), flat)
        with open(os.path.join(d, weights.CONFIG_FILE), "w") as f:
            json.dump(cfg.to_diffusers(), f)
        _, g2, base2, lora2 = params.load_transformer(d, mesh=mesh, lora=cfg.lora, remat_policy="dots_saveable")
        k2 = base2["transformer_blocks"]["attn"]["to_q"]["kernel"].get_value()[0]
        a2 = lora2["transformer_blocks"]["attn"]["to_q"]["lora_a"].get_value()[0]
        assert tuple(k2.sharding.spec) == ("fsdp", "tensor") and np.array_equal(np.asarray(k2), np.asarray(kernel))
        assert a2.sharding.spec[0] == "fsdp" and a2.addressable_shards[0].data.shape[0] * 2 == a2.shape[0]
        with jax.set_mesh(mesh):
            out2 = jax.device_get(jax.jit(lambda b, l, i: L.apply(
                g2, b, l, i["x"], i["ref"], i["prompt"], i["pooled"], i["sigma"], i["img_ids"], i["txt_ids"],
                i["guidance"], fn=kontext_velocity))(base2, lora_s, inp_s))
        result["loaded_rel_err"] = float(np.abs(out2 - ref_out).max()) / scale
        assert result["loaded_rel_err"] < 1e-5, result
    print(json.dumps(result))
    # Sharded matmuls / all-reduces change float32 summation order: 1e-5 of the scale (observed ~1e-7).
    assert result["out_rel_err"] < 1e-5 and result["base_rel_err"] < 1e-5 and gerr < 1e-4, result
    assert spec == ("fsdp", "tensor"), spec
    assert shard_shape[0] * 2 == kernel.shape[0] and shard_shape[1] * 2 == kernel.shape[1], shard_shape
    assert np.abs(out - out_base).max() > 1e-3 * scale, "LoRA must matter"


if __name__ == "__main__":
    main()
