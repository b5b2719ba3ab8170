"""Memory planner (edit_r1_jax/plan.py): parameter counts against the architecture, sharding arithmetic, fit
verdicts, mesh search, CLI. eval_shape only (nothing allocated); the DiT inventory is built once (~3 s)."""

import io
import json
import math
from contextlib import redirect_stdout

import jax
import pytest

from configs import kontext_mllm
from edit_r1_jax import plan


def flux_dev_params() -> int:
    """FLUX.1-dev / Kontext-dev transformer parameters, summed from the architecture (diffusers layout)."""
    d, hd, c_in, joint, pooled, n_double, n_single = 3072, 128, 64, 4096, 768, 19, 38

    def lin(i, o):
        return i * o + o

    top = lin(c_in, d) + lin(joint, d)
    top += 2 * (lin(256, d) + lin(d, d))  # timestep and guidance embedders
    top += lin(pooled, d) + lin(d, d)  # pooled text embedder
    top += lin(d, 2 * d) + lin(d, c_in)  # norm_out (AdaLayerNormContinuous) and proj_out
    double = 2 * lin(d, 6 * d)  # norm1, norm1_context
    double += 8 * lin(d, d)  # q, k, v, out for image and text streams
    double += 4 * hd  # q/k RMSNorms of both streams
    double += 2 * (lin(d, 4 * d) + lin(4 * d, d))  # ff, ff_context
    single = lin(d, 3 * d) + lin(d, 4 * d) + lin(5 * d, d) + 3 * lin(d, d) + 2 * hd
    return top + n_double * double + n_single * single


@pytest.fixture(scope="module")
def config():
    return kontext_mllm.get_config()


@pytest.fixture(scope="module")
def leaves(config):
    return plan.dit_leaves(plan.transformer_config(config))


def row(p, name):
    [r] = [r for r in p["rows"] if r["name"].startswith(name)]
    return r


def test_dit_params_match_flux_architecture(config, leaves):
    base, lora = leaves
    expected = flux_dev_params()
    assert 11.85e9 < expected < 11.95e9  # "about 11.9 B"
    p = plan.plan(config, {"data": 1}, "h200")
    r = row(p, "DiT base weights")
    assert r["params"] == expected
    assert r["total"] == r["per_device"] == 2 * expected  # bfloat16, unsharded on one device
    # LoRA r=32 on the 8 attention projections of the 19 double blocks + q/k/v of the 38 single blocks:
    # each d x d target gets A [d, 32] and B [32, d].
    assert sum(l.size for l in lora) == (19 * 8 + 38 * 3) * 2 * 3072 * 32
    assert row(p, "LoRA theta")["per_device"] == 3 * 4 * sum(l.size for l in lora)
    assert row(p, "AdamW")["per_device"] == 2 * 4 * sum(l.size for l in lora)


def _jax_shard_bytes(leaves, mesh):
    """Per-device bytes as jax itself shards each parameter: the trainer's partition spec (parallel.rules) on a
    NamedSharding, whose shard_shape is jax's own arithmetic (not the planner's)."""
    from jax.sharding import NamedSharding

    from edit_r1_jax.parallel import rules

    total = 0
    for leaf in leaves:
        spec = rules.partition_spec(leaf.axes, leaf.shape, mesh) if leaf.axes else jax.sharding.PartitionSpec()
        total += math.prod(NamedSharding(mesh, spec).shard_shape(leaf.shape)) * leaf.itemsize
    return total


def test_per_device_bytes_shrink_by_fsdp(config, leaves):
    base, _ = leaves
    one = plan.abstract_mesh({"data": 8})
    fsdp8 = plan.abstract_mesh({"fsdp": 8})
    for shape in ({"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}):
        mesh = plan.abstract_mesh(shape)
        assert plan.per_device_bytes(base, mesh) == _jax_shard_bytes(base, mesh), shape
    expected = plan.per_device_bytes(base, fsdp8)
    assert expected < plan.total_bytes(base) / 7.9  # nearly every byte is split 8 ways
    assert plan.per_device_bytes(base, one) == plan.total_bytes(base)  # data parallel replicates
    [q] = [l for l in base if l.path == "transformer_blocks.0.attn.to_q.kernel"]
    assert plan.shard_elems(q, fsdp8) == 3072 * 3072 // 8
    assert plan.shard_elems(q, plan.abstract_mesh({"fsdp": 8, "tensor": 4})) == 3072 * 3072 // 32
    p1 = plan.plan(config, {"data": 8}, "v5p")
    p8 = plan.plan(config, {"fsdp": 8}, "v5p")
    assert row(p8, "DiT base weights")["per_device"] == expected
    assert row(p8, "DiT base weights")["per_device"] < row(p1, "DiT base weights")["per_device"] / 7.9
    assert row(p8, "FSDP gather buffers")["per_device"] > 0 == row(p1, "FSDP gather buffers")["per_device"]


def test_fit_verdict_flips(config):
    # 1 device, 1 sample: ~24 GB DiT + ~17 GB Qwen2.5-VL-7B + activations: too much for 32 GB, fine for 141 GB.
    small = plan.plan(config, {"data": 1}, "v6e", micro_batch=1)
    big = plan.plan(config, {"data": 1}, "h200", micro_batch=1)
    assert small["static"] == big["static"]  # same mesh: the chip only changes the attention estimate
    assert not small["fits"] and big["fits"]
    # ... and sharding the same per-device work over 8 chips makes the small chip fit.
    assert plan.plan(config, {"fsdp": 8}, "v6e", micro_batch=1)["fits"]


def test_activations_order_and_scaling(config):
    p = plan.plan(config, {"data": 1}, "h100", micro_batch=2)
    acts = {k: v["saved"] for k, v in p["activations"].items()}
    assert acts["none"] > acts["dots_saveable"] >= acts["dots_with_no_batch_dims_saveable"] > acts["full"] > 0
    # Full remat keeps at least one [L, D] bf16 block input per block and sample (57 blocks, L = 2176 tokens).
    assert acts["full"] > 2 * 57 * 2176 * 3072 * 2
    # More samples per device: activations and peak grow, the static part does not (affine in the micro-batch).
    p1, p4 = (plan.plan(config, {"data": 1}, "h100", micro_batch=b) for b in (1, 4))
    for name in plan.REMAT_ORDER:
        a1, a2, a4 = (q["activations"][name]["total"] for q in (p1, p, p4))
        assert a1 < a2 < a4 and (a4 - a2) == 2 * (a2 - a1), name
    # (the peak is the largest of training, rollout, VAE decode and reward transients: non-decreasing)
    assert p1["static"] == p["static"] == p4["static"] and p1["peak"] <= p["peak"] <= p4["peak"]


def test_static_memory_falls_with_model_sharding(config):
    statics = [plan.plan(config, {"data": 8 // f, "fsdp": f}, "v5p")["static"] for f in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(statics, statics[1:])), statics


def test_param_bytes_match_a_real_model():
    """The planner's inventory against a model that exists: a small FLUX built for real (arrays allocated),
    its base and LoRA bytes counted from the arrays themselves."""
    from flax import nnx

    from edit_r1_jax.models.flux.modeling import FluxTransformer
    from edit_r1_jax.models.lora import split_policy

    c = kontext_mllm.get_config()
    c.model.dit = dict(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=4,
                       axes_dims_rope=(4, 6, 6), joint_attention_dim=96, pooled_projection_dim=32)
    c.model.param_dtype = "float32"
    c.lora.rank = 4
    _, base, lora = split_policy(FluxTransformer(plan.transformer_config(c), rngs=nnx.Rngs(0)))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    p = plan.plan(c, {"data": 1}, "h200")
    assert row(p, "DiT base weights")["total"] == nbytes(base)
    assert row(p, "DiT base weights")["params"] == sum(x.size for x in jax.tree.leaves(base))
    assert row(p, "LoRA theta")["total"] == 3 * nbytes(lora)  # theta, theta_old, EMA in float32
    assert row(p, "AdamW")["total"] == 2 * nbytes(lora)


def test_text_encoders_and_reward_sizes(config):
    p = plan.plan(config, {"data": 1}, "h100")
    assert row(p, "text encoders")["per_device"] == 0  # text_cache=True
    c = kontext_mllm.get_config()
    c.data.text_cache = False
    r = row(plan.plan(c, {"data": 1}, "h100"), "text encoders")
    assert 4.85e9 < r["params"] < 4.92e9  # T5-XXL encoder 4.76 B + CLIP-L text 0.12 B
    assert 8.2e9 < row(p, "reward Qwen2.5-VL-7B")["params"] < 8.35e9  # published 8.29 B
    p32 = plan.plan(config, {"data": 1}, "h100", reward="32b")
    assert 33.0e9 < row(p32, "reward Qwen2.5-VL-32B")["params"] < 34.0e9  # published 33.5 B
    assert 80e6 < row(p, "VAE")["params"] < 90e6  # FLUX VAE 83.8 M


def test_recommend_prefers_least_model_sharding(config):
    rec = plan.recommend(config, 8, "h200")
    best = rec["best"]
    assert best is not None and best["fits"] and best["batch_divisible"]
    for shape in plan.candidate_meshes(8):
        p = plan.plan(config, shape, "h200", remat_policy=rec["remat_policy"])
        if p["fits"] and p["batch_divisible"]:
            assert shape["fsdp"] * shape["tensor"] >= best["mesh"]["fsdp"] * best["mesh"]["tensor"]
    # 72 samples per micro-batch do not split over 32 data-parallel devices: such meshes are not recommended.
    rec32 = plan.recommend(config, 32, "v5p")
    assert rec32["best"] is not None
    assert 72 % (rec32["best"]["mesh"]["data"] * rec32["best"]["mesh"]["fsdp"]) == 0


def test_recommendation_fits_the_chip(config):
    for devices, chip in ((8, "h200"), (8, "h100"), (32, "v5p")):
        rec = plan.recommend(config, devices, chip)
        best = rec["best"]
        assert best["peak"] <= plan.CHIPS[chip] * (1 - best["margin"]) and best["headroom"] >= 0, (devices, chip)
        assert math.prod(best["mesh"].values()) == devices


def _parse_train_command(command: str, monkeypatch):
    """The trainer's own flag parsing (absl + ml_collections config_flags), fresh flag values. config_flags
    reads the overrides from sys.argv, so that is where the command line goes."""
    import shlex
    import sys

    from absl import flags
    from ml_collections import config_flags

    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "edit_r1_jax.train"], argv
    monkeypatch.setattr(sys, "argv", ["train", *argv[3:]])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", "configs/toy.py", "", flag_values=fv)
    fv(sys.argv)
    return fv.config


def test_printed_command_is_a_valid_config_that_fits(monkeypatch):
    """plan's printed command line, parsed as the trainer parses it, passes config.validate on the recommended
    mesh, carries the remat policy the fit needed, and re-planned from the parsed config it fits."""
    from edit_r1_jax import config as config_lib

    paths = ["--config.model.dir=weights/kontext", "--config.reward.mllm_dir=weights/qwen7b",
             "--config.data.root=data"]
    out = io.StringIO()
    with redirect_stdout(out):
        plan.main(["--config", "configs/kontext_mllm.py", "--devices", "8", "--chip", "h100", *paths])
    text = out.getvalue()
    [command] = [line.removeprefix("command:").strip() for line in text.splitlines() if line.startswith("command:")]
    [overrides] = [line.removeprefix("overrides:").split() for line in text.splitlines()
                   if line.startswith("overrides:")]
    assert all(o in command.split() for o in overrides + paths)
    c = _parse_train_command(command, monkeypatch)
    # 72 samples per micro-batch at 9 per H100 only fit with full remat (README "Memory plan").
    assert "--config.model.remat_policy=full" in overrides and c.model.remat_policy == "full"
    mesh = {a: int(c.mesh[a]) for a in plan.MESH_AXES}
    assert math.prod(mesh.values()) == 8
    config_lib.validate(c, 1, mesh["data"] * mesh["fsdp"])  # raises ConfigError naming the field otherwise
    again = plan.plan(c, mesh, "h100")
    assert again["fits"] and again["batch_divisible"]


def test_cli_json_and_overrides():
    out = io.StringIO()
    with redirect_stdout(out):
        plan.main(["--config", "configs/kontext_mllm.py", "--mesh", "data=2,fsdp=4", "--chip", "v5p", "--json",
                   "--config.train.micro_batch_size=16"])
    result = json.loads(out.getvalue())
    p = result["plan"]
    assert p["devices"] == 8 and p["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert p["micro_batch_per_device"] == 2  # 16 / (data*fsdp)
    assert p["attention"].startswith("xla")  # TPU default
    assert math.isclose(p["usable"], 95e9 * 0.85)
    assert "recommendation" in result
    out = io.StringIO()
    with redirect_stdout(out):
        plan.main(["--config", "configs/kontext_mllm.py", "--mesh", "data=8", "--chip", "h100"])
    text = out.getvalue()
    assert "DiT base weights" in text and "recommended mesh for 8 x h100" in text
    assert ("DOES NOT FIT" in text) or ("FITS" in text)


@pytest.mark.parametrize("argv,message", [
    (["--mesh", "data=2,pipe=4", "--chip", "v5p"], "--mesh"),
    (["--mesh", "data=2", "--chip", "v5p", "--config.train.no_such=1"], "no such field"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--config", "configs/kontext_mllm.py", *argv])
    assert message in str(e.value)



@pytest.mark.parametrize("policy,blocks", [("none", (0, 1)), ("full", (0, 1)), ("dots_saveable", (0, 1)),
                                           ("dots_with_no_batch_dims_saveable", (0, 1)),
                                           ("dots_with_no_batch_dims_saveable", (1, 0))])
@pytest.mark.xfail(strict=True, reason=(
    "known gap: with the stacked (scanned) layer layout, saved_residuals also lists each layer's slice of the "
    "stacked base weights (~280 MB per block set here, with scan and with the python loop alike); the plan's "
    "activation formula does not model it yet. strict: this fails loudly once the formula is updated."))
def test_activation_formula_matches_saved_residuals(config, policy, blocks):
    """The activations JAX saves for backward, for the full-width model cut to one block (B=1, L=2176, XLA
    attention, LoRA r=32), against the plan's formula."""
    import dataclasses
    import jax
    import jax.numpy as jnp
    from flax import nnx

    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError:  # private helper behind jax.ad_checkpoint.print_saved_residuals
        pytest.skip("jax moved saved_residuals")
    from edit_r1_jax.models.flux.modeling import FluxTransformer
    from edit_r1_jax.models.lora import apply, split_policy

    n_double, n_single = blocks
    cfg = dataclasses.replace(plan.transformer_config(config), num_layers=n_double, num_single_layers=n_single,
                              remat_policy=policy, attention_impl="xla")
    with plan._fast_tracing():
        model = nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))
    g, base, lora = split_policy(model)
    n, t = 2048, 128
    s = jax.ShapeDtypeStruct
    args = (s((1, n, 64), jnp.bfloat16), s((1, t, 4096), jnp.bfloat16), s((1, 768), jnp.float32),
            s((1,), jnp.float32), s((n, 3), jnp.float32), s((t, 3), jnp.float32))

    def loss(l, b, *a):
        return jnp.mean(apply(g, b, l, *a, jnp.full((1,), 2.5)).astype(jnp.float32) ** 2)

    measured = sum(math.prod(a.shape) * a.dtype.itemsize for a, why in saved_residuals(loss, lora, base, *args)
                   if "from the argument" not in why)
    est = plan.activation_bytes(policy, micro_batch=1, tokens=n + t, dim=3072, heads=24, rank=32,
                                n_double=n_double, n_single=n_single, tensor=1, itemsize=2,
                                xla_attention=True)["saved"]
    assert abs(est - measured) / measured < 0.03, (est, measured)  # stated accuracy 2%, with slack
