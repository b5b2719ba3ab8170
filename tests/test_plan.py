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
    (["--mesh", "data=2", "--chip", "v5p", "--config.task=toy"], "task 'toy' has no memory plan"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--config", "configs/kontext_mllm.py", *argv])
    assert message in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Saved residuals: what JAX keeps for backward, split by where each value comes from.

_VIEW_OPS = ("squeeze", "slice", "dynamic_slice", "reshape", "reduce_precision")


def _residuals(f, *args):
    """``[(aval, kind)]`` for every residual of ``jax.vjp(f, *args)`` (as ``jax.ad_checkpoint``'s
    saved_residuals builds them), ``kind``: "argument" (an input itself), "param_slice" (an input parameter seen
    through slicing / squeezing / reshaping only: a layer's slice of a stacked weight, found by following the
    producing equations back to the input, not by shape) or "activation" (computed)."""
    flat, tree = jax.tree.flatten(args)
    n_params = len(jax.tree.leaves(args[:2]))  # (lora, base) come first

    def f_(*a):
        return f(*jax.tree.unflatten(tree, a))

    closed, out_shape = jax.make_jaxpr(lambda *a: jax.vjp(f_, *a), return_shape=True)(*flat)
    jaxpr = closed.jaxpr
    n_res = len(jax.tree.leaves(out_shape[1]))
    producer = {v: e for e in jaxpr.eqns for v in e.outvars}
    inputs = {v: i for i, v in enumerate(jaxpr.invars)}
    out = []
    for v in jaxpr.outvars[len(jaxpr.outvars) - n_res:]:
        if not hasattr(v, "count") and hasattr(v, "val"):  # a literal
            out.append((v.aval, "activation"))
            continue
        root = v
        while root in producer and producer[root].primitive.name in _VIEW_OPS:
            root = producer[root].invars[0]
        if v in inputs:
            out.append((v.aval, "argument"))
        elif inputs.get(root, n_params) < n_params:
            out.append((v.aval, "param_slice"))
        else:
            out.append((v.aval, "activation"))
    return out


def _nbytes(aval):
    return math.prod(aval.shape) * aval.dtype.itemsize


def _cut_model(config, **overrides):
    import dataclasses

    from flax import nnx

    from edit_r1_jax.models.lora import split_policy

    cfg = dataclasses.replace(plan.transformer_config(config), attention_impl="xla", **overrides)
    fam = plan.family(config)
    with plan._fast_tracing():
        model = fam.abstract_transformer(cfg)
    return (cfg, *split_policy(model))


@pytest.mark.parametrize("policy,blocks", [("none", (0, 1)), ("full", (0, 1)), ("dots_saveable", (0, 1)),
                                           ("dots_with_no_batch_dims_saveable", (0, 1)),
                                           ("dots_with_no_batch_dims_saveable", (1, 0))])
def test_activation_formula_matches_saved_residuals(config, policy, blocks):
    """The activations JAX saves for backward, for the full-width FLUX cut to one block (B=1, L=2176, XLA
    attention, LoRA r=32), against the plan's formula.

    A one-layer stack runs as a python loop whose ``stacked[0]`` slices (squeeze of a [1, ...] parameter) are
    residuals too: they are the parameters themselves (identified by following each residual's producers back
    to a parameter input through view ops only), and XLA compiles them to bitcasts of the input, no memory
    (test_stacked_weight_slices_memory). They are excluded here; their shapes are per-layer parameter shapes and
    they add up to at most the block's parameters (~0.5-0.7 GB in bf16)."""
    import jax.numpy as jnp

    from edit_r1_jax.models.lora import apply

    n_double, n_single = blocks
    cfg, g, base, lora = _cut_model(config, num_layers=n_double, num_single_layers=n_single, remat_policy=policy)
    n, t = 2048, 128
    s = jax.ShapeDtypeStruct
    args = (s((1, n, 64), jnp.bfloat16), s((1, t, 4096), jnp.bfloat16), s((1, 768), jnp.float32),
            s((1,), jnp.float32), s((n, 3), jnp.float32), s((t, 3), jnp.float32))

    def loss(l, b, *a):
        return jnp.mean(apply(g, b, l, *a, jnp.full((1,), 2.5)).astype(jnp.float32) ** 2)

    res = _residuals(loss, lora, base, *args)
    slices = [a for a, kind in res if kind == "param_slice"]
    per_layer = {(tuple(leaf.shape), leaf.itemsize) for leaf in plan._leaves(base) + plan._leaves(lora)}
    assert slices and all((tuple(a.shape), a.dtype.itemsize) in per_layer for a in slices)
    block_bytes = sum(leaf.size * leaf.itemsize for leaf in plan._leaves(base) + plan._leaves(lora)
                      if "transformer_blocks.0." in leaf.path)
    assert sum(map(_nbytes, slices)) <= block_bytes
    measured = sum(_nbytes(a) for a, kind in res if kind == "activation")
    model = plan.family(config).plan_activations(cfg)
    est = plan.activation_bytes(policy, model, micro_batch=1, tokens=n + t, text_tokens=t, tensor=1, itemsize=2,
                                xla_attention=True)["saved"]
    assert abs(est - measured) / measured < 0.03, (est, measured)  # stated accuracy 2%, with slack


# ---------------------------------------------------------------------------------------------------------
# Qwen-Image-Edit-2509 (configs/qwen_image_edit_mllm.py).


@pytest.fixture(scope="module")
def qconfig():
    from configs import qwen_image_edit_mllm

    return qwen_image_edit_mllm.get_config()


def qwen_image_params() -> int:
    """Qwen-Image(-Edit-2509) transformer parameters, summed from the architecture (diffusers
    QwenImageTransformer2DModel: 60 dual-stream blocks, width 3072, 24 x 128 heads, text width 3584)."""
    d, hd, c_in, c_out, joint, n = 3072, 128, 64, 64, 3584, 60

    def lin(i, o):
        return i * o + o

    top = lin(c_in, d) + joint + lin(joint, d)  # img_in, txt_norm (RMSNorm weight), txt_in
    top += lin(256, d) + lin(d, d)  # timestep embedder
    top += lin(d, 2 * d) + lin(d, c_out)  # norm_out, proj_out
    block = 2 * lin(d, 6 * d)  # img_mod, txt_mod
    block += 8 * lin(d, d) + 4 * hd  # to_q/k/v, add_q/k/v_proj, to_out, to_add_out; 4 q/k RMSNorms
    block += 2 * (lin(d, 4 * d) + lin(4 * d, d))  # img_mlp, txt_mlp
    return top + n * block


def test_qwen_params_match_the_architecture(qconfig):
    expected = qwen_image_params()
    assert 20.3e9 < expected < 20.5e9  # published: "20B" (the model card's safetensors: 20.4B)
    p = plan.plan(qconfig, {"data": 1}, "h200")
    r = row(p, "DiT base weights")
    assert r["params"] == expected and r["total"] == r["per_device"] == 2 * expected  # bf16, one device
    # LoRA r=32 on the 8 attention projections (d x d) of each of the 60 blocks: A [d, 32] + B [32, d]
    n_lora = 60 * 8 * 2 * 3072 * 32
    assert row(p, "LoRA theta")["params"] == 3 * n_lora and row(p, "LoRA theta")["total"] == 3 * 4 * n_lora
    assert row(p, "AdamW")["total"] == 2 * 4 * n_lora
    assert p["tokens"] == 1024 + 1024 + 256  # 512^2: (512/16)^2 noisy + reference tokens, 256 text tokens


def test_qwen_per_device_shards_match_jax(qconfig):
    base, lora = plan.dit_leaves(plan.transformer_config(qconfig), plan.family(qconfig))
    assert {leaf.path.split(".")[1] for leaf in base if leaf.path.startswith("transformer_blocks.")} == \
        {str(i) for i in range(60)}  # per-layer leaves of the stacked blocks
    for shape in ({"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 3, "tensor": 8}, {"tensor": 3}):
        mesh = plan.abstract_mesh(shape)
        for leaves in (base, lora):
            assert plan.per_device_bytes(leaves, mesh) == _jax_shard_bytes(leaves, mesh), shape
    p = plan.plan(qconfig, {"data": 6, "fsdp": 8}, "v5p")
    assert row(p, "DiT base weights")["per_device"] == _jax_shard_bytes(base, plan.abstract_mesh({"fsdp": 8}))
    assert row(p, "DiT base weights")["per_device"] < 2 * qwen_image_params() / 7.9
    # FSDP gathers one dual-stream block (36 d^2 + 30 d + 512 params, bf16) to full width, twice
    d = 3072
    assert row(p, "FSDP gather buffers")["per_device"] == 2 * 2 * (36 * d * d + 30 * d + 512)


def test_qwen_param_bytes_match_a_real_model(qconfig):
    """Inventory against a small Qwen-Image MMDiT allocated for real (its arrays' bytes)."""
    from flax import nnx

    from configs import qwen_image_edit_mllm
    from edit_r1_jax.models.lora import split_policy
    from edit_r1_jax.models.qwen_image.modeling import QwenImageTransformer

    c = qwen_image_edit_mllm.get_config()
    c.model.dit = dict(num_layers=3, attention_head_dim=16, num_attention_heads=4, axes_dims_rope=(4, 6, 6),
                       joint_attention_dim=40)
    c.model.param_dtype = "float32"
    c.lora.rank = 4
    _, base, lora = split_policy(QwenImageTransformer(plan.transformer_config(c), rngs=nnx.Rngs(0)))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    p = plan.plan(c, {"data": 1}, "h200")
    assert row(p, "DiT base weights")["total"] == nbytes(base)
    assert row(p, "DiT base weights")["params"] == sum(x.size for x in jax.tree.leaves(base))
    assert row(p, "LoRA theta")["total"] == 3 * nbytes(lora)
    assert row(p, "AdamW")["total"] == 2 * nbytes(lora)
    # the scan's one-layer weight slice: a third of the stacked block parameters (3 layers, float32)
    blocks = sum(x.nbytes for path, x in nnx.to_flat_state(base) if path[0] == "transformer_blocks")
    assert row(p, "layer weight slice")["per_device"] == blocks // 3


def test_qwen_text_encoder_vae_and_buffers(qconfig, tmp_path):
    p = plan.plan(qconfig, {"data": 1}, "h100")
    assert row(p, "text encoder")["per_device"] == 0  # text_cache=True
    c = qconfig.copy_and_resolve_references()
    c.data.text_cache = False
    r = row(plan.plan(c, {"data": 1}, "h100"), "text encoder Qwen2.5-VL-7B")
    assert 8.2e9 < r["params"] < 8.35e9 and r["per_device"] == 2 * r["params"]  # published 8.29 B, bf16
    # the reward checkpoint is the text encoder: one copy (tasks._shared_encoder)
    c.model.dir, c.reward.mllm_dir = str(tmp_path), str(tmp_path / "text_encoder")
    assert row(plan.plan(c, {"data": 1}, "h100"), "text encoder")["per_device"] == 0
    vae = row(p, "VAE")
    assert 40e6 < vae["params"] < 50e6  # the Wan-2.1 VAE (127 M) without temporal taps, 2-D on single images
    # epoch buffers: x0 + reference latents [1024, 64] float32, prompt embeddings [256, 3584] bf16, int32 mask
    per_sample = 2 * 1024 * 64 * 4 + 256 * 3584 * 2 + 256 * 4
    assert row(p, "epoch sample buffers")["total"] == 12 * 12 * 2 * per_sample


@pytest.mark.parametrize("policy", plan.REMAT_ORDER)
def test_qwen_activation_formula_matches_saved_residuals(qconfig, policy):
    """The full-width Qwen-Image MMDiT with 2 dual-stream blocks under the layer scan (B=1, L=2304, XLA
    attention, LoRA r=32): saved residuals against the formula (stated agreement 1%). Under the scan the stacked
    weights are never residual slices: the scan forwards them (any residual that is a parameter is the argument
    itself)."""
    import jax.numpy as jnp

    from edit_r1_jax.models.lora import apply

    cfg, g, base, lora = _cut_model(qconfig, num_layers=2, remat_policy=policy)
    n, t = 2048, 256
    s = jax.ShapeDtypeStruct
    args = (s((1, n, 64), jnp.bfloat16), s((1, t, 3584), jnp.bfloat16), s((1, t), jnp.int32), s((1,), jnp.float32),
            s((n, 3), jnp.int32), s((t, 3), jnp.int32))

    def loss(l, b, *a):
        return jnp.mean(apply(g, b, l, *a, num_target_tokens=n // 2).astype(jnp.float32) ** 2)

    res = _residuals(loss, lora, base, *args)
    assert not [a for a, kind in res if kind == "param_slice"]
    measured = sum(_nbytes(a) for a, kind in res if kind == "activation")
    model = plan.family(qconfig).plan_activations(cfg)
    est = plan.activation_bytes(policy, model, micro_batch=1, tokens=n + t, text_tokens=t, tensor=1, itemsize=2,
                                xla_attention=True)["saved"]
    assert abs(est - measured) / measured < 0.02, (est, measured)


def test_stacked_weight_slices_memory():
    """Whether the per-layer weight slices are device memory: XLA's own buffer assignment (memory_analysis of
    the compiled gradient) for layers stacked and run by models/scan.py (blocks of one 1024 x 1024 float32
    Linear + tanh: weights dwarf activations, as in the full model at B = 1; the gradient w.r.t. the input needs
    each layer's weight in backward). One layer: the python loop's slice of a [1, ...] stack is a bitcast
    (temporaries far below one layer's weights). Three layers under the scan: one layer's slice buffer at a time.
    Three layers as a python loop (``scan_layers=False``): every slice lives until backward (about the stack
    again). plan.py counts the scan's one slice ("layer weight slice") and the loop's all ("layer weight
    slices")."""
    import jax.numpy as jnp
    from flax import nnx

    from edit_r1_jax.models import scan

    width = 1024

    def temp_and_layer(layers, use_scan):
        blocks = nnx.eval_shape(lambda: scan.stack(lambda r: nnx.Linear(width, width, rngs=r), layers,
                                                   nnx.Rngs(0)))
        graphdef, state = nnx.split(blocks)

        def loss(x, state):
            run = scan.run(nnx.merge(graphdef, state), x, lambda blk, h, _: jnp.tanh(blk(h)), use_scan=use_scan)
            return jnp.mean(run ** 2)

        x = jax.ShapeDtypeStruct((1, 4, width), jnp.float32)
        compiled = jax.jit(jax.grad(loss)).lower(x, state).compile()
        layer = sum(_nbytes(a) for a in jax.tree.leaves(state)) // layers
        return compiled.memory_analysis().temp_size_in_bytes, layer

    temp1, layer = temp_and_layer(1, True)
    assert temp1 < 0.05 * layer, (temp1, layer)
    temp_scan, layer = temp_and_layer(3, True)
    assert 0.9 * layer < temp_scan < 1.5 * layer, (temp_scan, layer)
    temp_loop, _ = temp_and_layer(3, False)
    assert temp_loop > 2.2 * layer, (temp_loop, layer)


def test_qwen_recommendation_for_48_devices(qconfig):
    """The paper's 48-device Qwen run: a fitting mesh on every chip, batch-divisible (144 samples per
    micro-batch and rollout), the least model sharding among those that fit; on a 32 GB v6e only full remat
    fits (the 20.4 B bf16 DiT alone is 40.9 GB, so it must be sharded)."""
    for chip in ("h100", "h200", "v5p", "v6e"):
        rec = plan.recommend(qconfig, 48, chip)
        best = rec["best"]
        assert best is not None and best["fits"] and best["batch_divisible"], chip
        assert math.prod(best["mesh"].values()) == 48 and 144 % (best["mesh"]["data"] * best["mesh"]["fsdp"]) == 0
        sharding = best["mesh"]["fsdp"] * best["mesh"]["tensor"]
        for shape in plan.candidate_meshes(48):
            if shape["fsdp"] * shape["tensor"] < sharding:
                p = plan.plan(qconfig, shape, chip, remat_policy=rec["remat_policy"])
                assert not (p["fits"] and p["batch_divisible"]), (chip, shape)
        if chip == "v6e":
            assert rec["changed_policy"] and rec["remat_policy"] == "full" and sharding > 1


def test_qwen_cli(capsys):
    plan.main(["--config", "configs/qwen_image_edit_mllm.py", "--devices", "48", "--chip", "v6e"])
    text = capsys.readouterr().out
    assert "Qwen-Image MMDiT, frozen" in text and "VAE (Qwen-Image VAE)" in text and "2304 tokens/sample" in text
    [overrides] = [line.split()[1:] for line in text.splitlines() if line.startswith("overrides:")]
    assert "--config.model.remat_policy=full" in overrides  # 32 GB per chip: only full remat fits (see above)
    assert math.prod(int(o.rsplit("=", 1)[1]) for o in overrides if o.startswith("--config.mesh.")) == 48
