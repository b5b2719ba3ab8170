"""Memory plan: bytes PER DEVICE of an Edit-R1 run for a mesh and a chip, from abstract shapes only.

    python -m edit_r1_jax.plan --config configs/kontext_mllm.py --mesh data=4,fsdp=8,tensor=1 --chip v5p \
        [--micro-batch N] [--reward 7b|32b|none] [--margin 0.15] [--json] [--config.train.micro_batch_size=96 ...]
    python -m edit_r1_jax.plan --config configs/kontext_mllm.py --devices 8 --chip h100   # search only
    python -m edit_r1_jax.plan --config configs/qwen_image_edit_mllm.py --devices 48 --chip h200

Nothing is allocated: every model is built with ``nnx.eval_shape`` and each parameter's per-device shard is
derived from its ``logical_axes`` metadata through ``edit_r1_jax.parallel.rules.partition_spec`` on an
``AbstractMesh`` (dimensions the mesh axes do not divide are replicated, exactly as the trainer does).

Model families: the plan is generic over ``config.task`` (``edit_r1_jax.editors``). What differs per family comes
from the ``Family`` planner methods (editors/base.py, "planner" section): the full-size transformer config
(``plan_transformer_config``), the VAE (``plan_vae_config`` + ``abstract_vae``, ``plan_vae_top_width``), the text
encoders (``plan_text_encoders``), the per-sample epoch buffers (``plan_sample_bytes``), the token counts
(``plan_tokens``) and the activation model with its block sets and parameter prefixes (``plan_activations``).
Kontext: FLUX.1 DiT (19 double + 38 single blocks), FLUX VAE, T5-XXL + CLIP-L, L = 2*(R/16)^2 + 128 = 2176
tokens at 512^2. Qwen-Image-Edit-2509: Qwen-Image MMDiT (60 dual-stream blocks, 20.4 B), Qwen-Image VAE,
Qwen2.5-VL-7B text encoder, L = 2*(R/16)^2 + 256 = 2304 tokens at 512^2.

What is counted (per device)
    DiT base weights      the family's config at full size (plus ``config.model.dit`` overrides),
                          ``config.model.param_dtype``.
    LoRA theta / theta_old / EMA, LoRA grads, AdamW mu+nu   float32, sharded by their logical axes.
    reward model          Qwen2.5-VL 7B (our ``Qwen2_5_VLConfig`` defaults) or 32B (published sizes), bf16
                          (the config has no reward dtype field: bf16 assumed), sharded by the same rules.
    text encoders         Kontext: T5-XXL encoder + CLIP-L text; Qwen-Image-Edit: Qwen2.5-VL-7B (vision tower
                          included: the prompt embeddings see the source image); compute dtype. 0 when
                          ``config.data.text_cache`` (embeddings are read from the cache during training), and 0
                          for Qwen-Image-Edit when ``reward.mllm_dir`` is ``model.dir/text_encoder`` (the trainer
                          then loads one copy for both, ``tasks._shared_encoder``).
    VAE                   the family's VAE config defaults (FLUX AutoencoderKL; Qwen-Image VAE, 2-D on single
                          images), float32 (the reference keeps it fp32).
    FSDP gather buffers   2 x the largest block gathered to full width (current + prefetched), when fsdp > 1.
    layer weight slice    the largest block's per-device weights, once (see "Stacked layers" below).
    epoch buffers         per sample kept between rollout and training: x0 and reference latents (float32) and
                          the ``cond`` text entries (Kontext: T5 in the compute dtype + pooled CLIP float32;
                          Qwen-Image-Edit: prompt embeddings [256, 3584] compute dtype + int32 mask),
                          samples_per_epoch / (data*fsdp) samples.

Stacked layers (models/scan.py) and jax's saved residuals
    The identical blocks are stored stacked ([L, ...]) and run under ``jax.lax.scan``; ``saved_residuals`` of a
    model cut to ONE block lists that layer's weight slices as residuals (~0.5-0.7 GB per block set in bf16).
    They are not activations: following each residual's producing equations back (tests/test_plan.py
    ``_residuals``) they are a parameter input seen through squeeze/slice only (the one-layer stack runs as the
    python loop, ``stacked[0]``). Whether they are device memory, from XLA's buffer assignment
    (``memory_analysis`` of the compiled gradient, CPU, float32 stacked Linear blocks of 4.2 MB each,
    tests/test_plan.py::test_stacked_weight_slices_memory): one layer 0.016 MB of temporaries (the slice of a
    [1, ...] stack is a bitcast); 3 and 6 layers under the scan 4.3 and 4.4 MB (one layer's dynamic-slice buffer
    at a time: the scan forwards the stacked weights to its backward instead of saving per-iteration slices,
    and 2+ layer scans list no slice residuals at all); 3 and 6 layers as the python loop
    (``scan_layers=False``) 12.6 and 25.3 MB (every slice kept until backward: the stack again). So the plan
    counts one layer's slice under the scan ("layer weight slice", e.g. 0.68 GB for a bf16 FLUX double or
    Qwen-Image block at fsdp = tensor = 1; a GPU/TPU backend that fuses the slice into the matmul needs less)
    and every layer's slice with ``scan_layers=False`` ("layer weight slices"); the activation formula excludes
    them. (bfloat16 on the CPU is no guide: XLA:CPU converts the whole bf16 stack to float32 for its dots.)

Activation estimate (training step, per device; b = compute-dtype bytes, B = micro-batch per device)
    L tokens per sample (above), T text tokens. D = heads*head_dim (3072 for both), t = mesh tensor size;
    "heads/mlp-width" tensors are split over t, "embed-width" ones are not (``act_embed`` is replicated by the
    rules). Per token per block, elements saved for backward (f32 intermediates of LayerNorm/RMSNorm/RoPE
    counted as 2 bf16 units):
        policy                          FLUX double (19)        FLUX single (38)        Qwen dual (60)
        none (everything)               18 D + 18 D/t (+probs)  8 D + 21 D/t (+probs)   14 D + 14 D/t + 4r (+probs)
        dots_saveable (matmul outputs)  4 D + 11 D/t + 4r (+sc) 2 D + 11 D/t + 3r (+sc) 4 D + 11 D/t + 4r (+sc)
        dots_with_no_batch_dims_sav.    4 D + 10 D/t + 4r       2 D + 10 D/t + 3r       4 D + 10 D/t + 4r
        full (nothing_saveable)         1 D                     1 D                     1 D
    ("+probs"/"+sc": with the XLA attention implementation (the TPU default) the [H/t, L, L] attention
    matrix is materialised: float32 + compute-dtype probabilities for ``none``, float32 scores for
    ``dots_saveable``; with cuDNN flash attention (the GPU default) it is never stored.
    ``dots_with_no_batch_dims_saveable`` never saves it: the attention matmuls have batch dims.)
    r = LoRA rank, 4 LoRA targets per stream in a double / dual block and 3 (q, k, v) in a single block; each
    LoRA target also saves its B output (counted in the D terms).
    Outside the blocks, per sample under every policy: FLUX ~6 L D b (final norm in float32, embedders) plus
    float32 copies of the timestep/guidance/text embedder weights (3 D^2 + 1280 D floats, once); Qwen-Image
    ~5.4 L D b (image in/out projections, final norm in float32) + 1.5 T*3584*b (the text-input RMSNorm's input)
    + float32 timestep-embedder weights (D^2 + 256 D floats, once), and with ``none`` + XLA attention the text-key
    mask broadcast over the attention matrix (bool + float32 masked scores, 5 bytes x H/t x L^2: the layer scan
    hoists this loop-invariant residual out of its body, one per sample, not per block).
    Qwen-Image derivation: per stream its block runs the FLUX double block's sequence (modulated affine-free
    LayerNorm, q/k/v + q/k RMSNorm, RoPE, joint attention, output projection, gated residual, 4x tanh-GELU MLP),
    so the remat policies save FLUX's double-block matmul outputs; under ``none`` it saves 4 float32 LayerNorm
    tensors (8) + 6 embed-width tensors (e = 14), the heads/MLP-width tensors h = 14 and the 4 LoRA-A outputs.
    The q/k RMSNorm and the tanh GELU run under ``jax.checkpoint`` (models/flux/modeling.py): under ``none``
    each keeps only its input, which took the ``none`` h from 45 / 47 / 40 (FLUX double / single / Qwen dual)
    to 18 / 21 / 14 and the text-input RMSNorm from 7 to 1.5 units (re-calibrated 2026-12-02 as below).
    Calibration: the saved residuals that ``jax.ad_checkpoint`` builds (weight slices excluded, see above), B=1,
    XLA attention, LoRA r=32, full width (tests/test_plan.py::test_activation_formula_matches_saved_residuals and
    ::test_qwen_activation_formula_matches_saved_residuals). FLUX cut to one double block or one single block
    (L=2176): within 2% for every policy (full: 0.223 vs 0.219 GB; none: single 1.2787 vs 1.2792 GB, double
    1.3723 vs 1.3750 GB; the remat policies within 0.4-1.0%). Qwen-Image with 2 dual blocks under the layer scan
    (L=2304, T=256; a one-block cut runs as the python loop, where the last block's text MLP is dead code and the
    mask is not hoisted, so it is not the shape of the 60-block run): none 3.080 vs 3.088 GB, full 0.1484 vs
    0.1483 GB, dots_saveable 1.5652 vs 1.5652, dots_with_no_batch_dims_saveable 0.5176 vs 0.5177, all within 0.3%.
    (Before the checkpointed norm and GELU, the same checks were also run per interior block of 2- and 3-block
    scans: within 2% for FLUX, 1% for Qwen-Image.)
    With a remat policy one block is recomputed at a time during backward: add B x (one block's ``none``
    activations + its attention matrix when XLA attention) as the working set. Saved activations of the
    v_theta forward only: v_old / v_ref forwards run without gradients and are covered by the working set.
    Training total = B * (sum over block sets of count * block + outside) + once + working set.
    Rollout: rollout_batch_size / (data*fsdp) samples through one block at a time, no saved activations
    (bounded by the largest block's ``none`` activations per sample + outside: an upper bound for inference).
    VAE: decoding the rollout batch (rollout_batch_size / (data*fsdp) images at once) keeps ~4 float32
    [R, R, w] tensors per image live at the top decoder level (the largest; w = 128 for FLUX, ~0.5 GB per
    512^2 image; w = 96 for Qwen-Image, whose upsampler into that level holds its conv's [R/2 + 1, R/2 + 1, 4w]
    phase output next to the interleaved [R, R, w] result; models/conv.py). Checked against XLA:CPU's buffer
    assignment of one float32 decode (memory_analysis temporaries, 64^2 and 128^2), when the upsamplers still
    ran at the output resolution: Qwen-Image 7.1 / 25.3 MB vs 6.3 / 25.2 MB estimated; FLUX 14.7 / 58.7 MB vs
    8.4 / 33.6 MB, i.e. the FLUX bound is 1.75x low on the CPU (left as it was; GPU/TPU buffer assignment
    differs, and the decode is below the training activations in every plan above). Since then 21.7 / 30.8 MB
    (Qwen-Image) and 59.0 / 67.1 MB (FLUX): at these small sizes the upsamplers' folded kernels (fixed, ~15
    and ~44 MB in float32) dominate; the FLUX decode at 256^2 and 512^2 moved by under 1% (235.9 vs 234.9 MB,
    941.6 vs 939.5 MB).
    Reward: reward.batch_size / (data*fsdp) sequences of ~ 2 images ((R/28)^2 tokens each) + 128 prompt tokens
    through one decoder layer at a time (hidden + 2*intermediate/t + q/k/v); the last-position logits only.
    Peak = static + max(training, rollout, VAE decode, reward); it fits when peak <= HBM * (1 - margin) (XLA
    temporaries, fragmentation, the runtime's reserve). HBM in decimal GB: h100 80, h200 141, v5p 95, v6e 32.

Recommended mesh: every (data, fsdp, tensor) over the device count with tensor <= 8 whose data*fsdp divides the
global micro-batch and rollout batch (``config.validate`` requires it; skipped with ``--micro-batch``), that fits;
the least model sharding (fsdp*tensor, then tensor) wins. If none fits with the configured remat policy the
search is repeated with ``full`` remat and says so.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from edit_r1_jax.models import scan
from edit_r1_jax.parallel import rules as sharding_rules

GB = 1e9
CHIPS = {  # HBM bytes per device (decimal GB, conservative: 80 GB H100 has 79.6 GiB usable)
    "h100": 80 * GB,
    "h200": 141 * GB,
    "v5p": 95 * GB,
    "v6e": 32 * GB,
}
GPU_CHIPS = ("h100", "h200")
MESH_AXES = ("data", "fsdp", "tensor")
REMAT_ORDER = ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full")
MAX_TENSOR = 8

# ---------------------------------------------------------------------------------------------------------
# Abstract parameter inventories.


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: str
    shape: tuple[int, ...]
    itemsize: int
    axes: tuple | None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@contextlib.contextmanager
def _fast_tracing():
    """Speed up ``nnx.eval_shape`` of large models ~8x.

    flax's ``Variable.set_value`` probes ``value.sharding``; on a jaxpr tracer that raises an AttributeError
    whose message walks the whole jaxpr built so far (quadratic in the number of parameters: 23 s -> 3 s for
    the 12B DiT). The message is only text, so it is blanked while we trace; restored afterwards.
    """
    try:
        from jax._src.interpreters import partial_eval as pe
        cls = pe.DynamicJaxprTracer
        original = cls.__dict__["_origin_msg"]
    except (ImportError, AttributeError, KeyError):  # jax moved it: slower, still correct
        yield
        return
    cls._origin_msg = lambda self: ""
    try:
        yield
    finally:
        cls._origin_msg = original


def _leaves(abstract_module, variable_type=None) -> list[Leaf]:
    """Per-layer leaves of an abstract module (or its ``nnx.State``), optionally of one variable type."""
    if isinstance(abstract_module, nnx.State):
        state = abstract_module if variable_type is None else nnx.state(abstract_module, variable_type)
    else:
        state = nnx.state(abstract_module) if variable_type is None else nnx.state(abstract_module, variable_type)
    out = []
    for path, v in nnx.to_flat_state(state):
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        axes = None if axes is None else tuple(axes)
        per_layer = scan.layer_keys(path, v)
        if per_layer is None:
            out.append(Leaf(".".join(str(p) for p in path), tuple(value.shape), jnp.dtype(value.dtype).itemsize,
                            axes))
        else:  # stacked layers (models/scan.py): one leaf per layer, as the checkpoints and FSDP gathers see them
            out.extend(Leaf(k, tuple(value.shape[1:]), jnp.dtype(value.dtype).itemsize,
                            None if axes is None else axes[1:]) for k in per_layer)
    return out


def family(config):
    """The model family of ``config.task`` (``edit_r1_jax.editors``); what differs per family goes through it."""
    from edit_r1_jax import editors

    return editors.get(str(config.task))


def transformer_config(config):
    """The full-size transformer config of ``config``'s family (``config.model.dit`` overrides, dtypes, LoRA)."""
    return family(config).plan_transformer_config(config)


@functools.lru_cache(maxsize=8)
def dit_leaves(cfg, family=None) -> tuple[list[Leaf], list[Leaf]]:
    """(base leaves, LoRA leaves) of ``family``'s transformer for ``cfg`` (default: FLUX), from eval_shape."""
    from edit_r1_jax import editors
    from edit_r1_jax.models.lora import LoRAParam

    family = family or editors.get("kontext")
    with _fast_tracing():
        model = family.abstract_transformer(cfg)
    lora = _leaves(model, LoRAParam)
    base = _leaves(model, nnx.Not(LoRAParam))
    return base, lora


def qwen_config(size: str, param_dtype=jnp.bfloat16):
    from edit_r1_jax.models.qwen2_5_vl.language import TextConfig
    from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VLConfig
    from edit_r1_jax.models.qwen2_5_vl.vision import VisionConfig

    if size == "7b":
        return Qwen2_5_VLConfig(dtype=param_dtype, param_dtype=param_dtype)  # its defaults are the 7B sizes
    if size == "32b":  # Qwen/Qwen2.5-VL-32B-Instruct config.json
        text = TextConfig(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                          num_attention_heads=40, num_key_value_heads=8, vocab_size=152064)
        vision = VisionConfig(intermediate_size=3456, out_hidden_size=5120)
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, dtype=param_dtype, param_dtype=param_dtype)
    raise ValueError(f"--reward {size!r}: one of 7b, 32b, none")


@functools.lru_cache(maxsize=4)
def qwen_leaves(size: str, dtype_name: str = "bfloat16") -> list[Leaf]:
    from edit_r1_jax.models.qwen2_5_vl.model import Qwen2_5_VL

    cfg = qwen_config(size, jnp.dtype(dtype_name))
    with _fast_tracing():
        model = nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0)))
    return _leaves(model)


@functools.lru_cache(maxsize=4)
def vae_leaves(family_name: str = "kontext", dtype_name: str = "float32") -> list[Leaf]:
    """The family's full-size VAE (``Family.plan_vae_config``)."""
    from edit_r1_jax import editors

    fam = editors.get(family_name)
    with _fast_tracing():
        return _leaves(fam.abstract_vae(fam.plan_vae_config(dtype_name)))


@functools.lru_cache(maxsize=4)
def text_encoder_leaves(family_name: str = "kontext", dtype_name: str = "bfloat16") -> list[Leaf]:
    """The family's text encoder(s) (``Family.plan_text_encoders``: FLUX T5-XXL + CLIP-L; Qwen-Image-Edit
    Qwen2.5-VL-7B)."""
    from edit_r1_jax import editors

    with _fast_tracing():
        return [leaf for m in editors.get(family_name).plan_text_encoders(dtype_name) for leaf in _leaves(m)]


# ---------------------------------------------------------------------------------------------------------
# Sharding arithmetic.


def abstract_mesh(shape: dict[str, int]):
    sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    return jax.sharding.AbstractMesh(sizes, MESH_AXES)


def shard_elems(leaf: Leaf, mesh) -> int:
    """Elements of ``leaf`` held by one device under the logical-axis rules."""
    if not leaf.axes:
        return leaf.size
    return _shard_elems(leaf.axes, leaf.shape, mesh, sharding_rules._rules)


@functools.lru_cache(maxsize=65536)
def _shard_elems(axes, shape, mesh, rules) -> int:
    # cached: the stacked layers repeat the same (axes, shape) per layer, and the mesh search asks per mesh;
    # keyed by the active rules too (parallel.rules.set_rules)
    leaf = Leaf("", shape, 0, axes)
    spec = sharding_rules.partition_spec(leaf.axes, leaf.shape, mesh, rules)
    n = 1
    for dim, entry in zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec))):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        div = math.prod(mesh.shape[a] for a in names)
        n *= dim // div
    return n


def per_device_bytes(leaves: Sequence[Leaf], mesh, itemsize: int | None = None) -> int:
    return sum(shard_elems(leaf, mesh) * (itemsize or leaf.itemsize) for leaf in leaves)


def total_bytes(leaves: Sequence[Leaf], itemsize: int | None = None) -> int:
    return sum(leaf.size * (itemsize or leaf.itemsize) for leaf in leaves)


def _block_leaves(base: Sequence[Leaf], prefix: str) -> dict[str, list[Leaf]]:
    """Per-layer leaves ``<prefix>.<i>.<rest>`` grouped by layer index i."""
    blocks: dict[str, list[Leaf]] = {}
    depth = len(prefix.split("."))
    for leaf in base:
        if leaf.path.startswith(prefix + "."):
            idx = leaf.path.split(".")[depth]
            blocks.setdefault(idx, []).append(leaf)
    return blocks


# ---------------------------------------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass
class Row:
    name: str
    params: int
    dtype: str
    total: int
    per_device: int
    note: str = ""


def _dtype_name(itemsize):
    return {4: "float32", 2: "bfloat16", 1: "int8"}.get(itemsize, f"{itemsize}B")


def activation_bytes(policy: str, model, *, micro_batch: int, tokens: int, text_tokens: int = 0, tensor: int,
                     itemsize: int, xla_attention: bool, counts: dict[str, int] | None = None) -> dict:
    """Training activations per device of the activation model ``model`` (``Family.plan_activations``; see the
    module docstring). ``counts``: blocks per kind instead of the model's own (e.g. one block for the rollout)."""
    b, t, L, dim = itemsize, tensor, tokens, model.dim
    heads_t = -(-model.heads // t) if model.heads % t == 0 else model.heads  # heads not divisible by t: replicated
    if policy not in REMAT_ORDER:
        raise ValueError(f"model.remat_policy={policy!r}: one of {sorted(REMAT_ORDER)}")

    def per_block(blocks, pol):
        e, h, r, attn = blocks.saved[pol]
        elems_per_token = e * dim + h * dim / t + r * model.rank
        out = elems_per_token * L * b
        if xla_attention and attn == "probs":
            out += heads_t * L * L * (4 + b)
        elif xla_attention and attn == "scores":
            out += heads_t * L * L * 4
        return out

    counts = {blk.kind: blk.count for blk in model.blocks} if counts is None else counts
    saved = sum(counts.get(blk.kind, 0) * per_block(blk, policy) for blk in model.blocks)
    saved += (model.outside * L * dim + model.outside_text * text_tokens * model.text_width) * b
    if xla_attention:
        saved += model.outside_attn.get(policy, 0) * heads_t * L * L
    working = 0.0
    if policy != "none":
        working = max(per_block(blk, "none") for blk in model.blocks)
    once = model.once
    return dict(policy=policy, saved=int(micro_batch * saved + once), working=int(micro_batch * working),
                total=int(micro_batch * (saved + working) + once))


def _reward_transient(size: str, per_device: int, resolution: int, tensor: int, itemsize: int) -> int:
    if size == "none" or per_device == 0:
        return 0
    cfg = qwen_config(size).text_config
    tokens = 2 * (resolution // 28) ** 2 + 128
    per_token = 4 * cfg.hidden_size + (2 * cfg.intermediate_size + 3 * cfg.hidden_size) / tensor
    vision = qwen_config(size).vision_config
    vis = 2 * (resolution // 14) ** 2 * (4 * vision.hidden_size + 3 * vision.intermediate_size / tensor)
    return int(per_device * (tokens * per_token + vis) * itemsize)


def plan(config, mesh_shape: dict[str, int], chip: str, *, micro_batch: int | None = None,
         reward: str | None = None, margin: float = 0.15, remat_policy: str | None = None) -> dict:
    """Per-device memory plan for ``config`` on ``mesh_shape`` (axis -> size) and ``chip``. Returns a dict."""
    if chip not in CHIPS:
        raise ValueError(f"--chip {chip!r}: one of {sorted(CHIPS)}")
    mesh_shape = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
    for a, s in mesh_shape.items():
        if s < 1:
            raise ValueError(f"mesh axis {a}={s} must be >= 1")
    mesh = abstract_mesh(mesh_shape)
    devices = math.prod(mesh_shape.values())
    batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
    tensor = mesh_shape["tensor"]
    notes: list[str] = []

    fam = family(config)
    tcfg = fam.plan_transformer_config(config)
    base, lora = dit_leaves(tcfg, fam)
    model = fam.plan_activations(tcfg)
    rows: list[Row] = []

    def add(name, leaves, note="", itemsize=None, copies=1):
        rows.append(Row(name, copies * sum(l.size for l in leaves),
                        _dtype_name(itemsize or (leaves[0].itemsize if leaves else 4)),
                        copies * total_bytes(leaves, itemsize), copies * per_device_bytes(leaves, mesh, itemsize),
                        note))

    add("DiT base weights", base, f"{fam.plan_transformer_name}, frozen")
    add("LoRA theta + theta_old + EMA", lora, "3 copies", itemsize=4, copies=3)
    add("LoRA grads", lora, "accumulated over micro-batches", itemsize=4)
    add("AdamW mu + nu", lora, "2 x LoRA", itemsize=4, copies=2)

    reward = reward or ("7b" if "mllm" in config.reward.weights else "none")
    if reward != "none":
        add(f"reward Qwen2.5-VL-{reward.upper()}", qwen_leaves(reward), "frozen, bf16 assumed")
    else:
        rows.append(Row("reward model", 0, "-", 0, 0, "no MLLM reward"))
    text_name = fam.plan_text_encoder_name
    if config.data.text_cache:
        rows.append(Row(text_name, 0, "-", 0, 0, "data.text_cache=True: embeddings come from the cache"))
    elif fam.plan_text_encoder_reward == reward and _same_checkpoint(config):
        rows.append(Row(text_name, 0, "-", 0, 0, "data.text_cache=False: the reward model's weights "
                        "(reward.mllm_dir is model.dir/text_encoder: one copy)"))
    else:
        add(text_name, text_encoder_leaves(fam.name, str(jnp.dtype(config.model.dtype))),
            "data.text_cache=False: resident on device")
    add(f"VAE ({fam.plan_vae_name})", vae_leaves(fam.name, "float32"), "float32")

    # FSDP: one block's weights gathered to full width (split only by tensor), current + prefetched.
    gather = 0
    if mesh_shape["fsdp"] > 1:
        tmesh = abstract_mesh({"tensor": tensor})
        blocks = [blk for bs in model.blocks for blk in _block_leaves(base, bs.prefix).values()]
        gather = 2 * max(per_device_bytes(blk, tmesh) for blk in blocks)
    rows.append(Row("FSDP gather buffers", 0, "-", 0, gather, "2 blocks at full width" if gather else "fsdp=1"))
    # The stacked layers' per-layer weight slices (see "Stacked layers" in the module docstring): under the
    # layer scan one layer's slice buffer at a time; the python loop (scan_layers=False) keeps every slice.
    per_layer = [per_device_bytes(blk, mesh) for bs in model.blocks for blk in _block_leaves(base, bs.prefix).values()]
    if getattr(tcfg, "scan_layers", True):
        rows.append(Row("layer weight slice", 0, "-", 0, max(per_layer, default=0),
                        "one stacked layer's dynamic-slice in the scan"))
    else:
        rows.append(Row("layer weight slices", 0, "-", 0, sum(per_layer),
                        "scan_layers=False: every layer's slice is kept for backward"))

    res = int(config.data.resolution)
    tok = fam.plan_tokens(config)
    cdt = jnp.dtype(config.model.dtype).itemsize
    per_epoch = (int(config.sample.group_size) * int(config.sample.groups_per_batch)
                 * int(config.sample.num_batches_per_epoch))
    per_sample, what = fam.plan_sample_bytes(tcfg, config)
    samples_dev = -(-per_epoch // batch_shards)
    rows.append(Row("epoch sample buffers", 0, "-", per_epoch * per_sample, samples_dev * per_sample,
                    f"{samples_dev} samples x ({what})"))

    # Activations.
    global_micro = int(config.train.micro_batch_size)
    rollout = int(config.sample.rollout_batch_size)
    batch_ok = global_micro % batch_shards == 0 and rollout % batch_shards == 0
    if micro_batch is None:
        micro_batch = -(-global_micro // batch_shards)
        if not batch_ok:
            notes.append(f"train.micro_batch_size={global_micro} / sample.rollout_batch_size={rollout} are not "
                         f"divisible by data*fsdp={batch_shards} (config.validate rejects this); "
                         f"estimated with {micro_batch} per device")
    policy = remat_policy or str(config.model.remat_policy)
    impl = str(config.model.get("attention_impl", "") or "")
    xla_attention = impl == "xla" or (impl == "" and chip not in GPU_CHIPS)
    tokens = tok["image"] + tok["reference"] + tok["text"]
    kw = dict(micro_batch=micro_batch, tokens=tokens, text_tokens=tok["text"], tensor=tensor, itemsize=cdt,
              xla_attention=xla_attention)
    acts = {p: activation_bytes(p, model, **kw) for p in REMAT_ORDER}
    if policy not in acts:
        raise ValueError(f"model.remat_policy={policy!r}: one of {sorted(acts)}")
    train_act = acts[policy]["total"]
    rollout_dev = -(-rollout // batch_shards)
    # inference: one block at a time (the largest kind's ``none`` activations bound it)
    rollout_act = max(activation_bytes("none", model, **{**kw, "micro_batch": rollout_dev},
                                       counts={blk.kind: 1})["total"] for blk in model.blocks)
    reward_dev = -(-int(config.reward.batch_size) // batch_shards)
    reward_act = _reward_transient(reward, reward_dev, res, tensor, 2)
    vae_act = rollout_dev * 4 * res * res * fam.plan_vae_top_width(fam.plan_vae_config()) * 4

    static = sum(r.per_device for r in rows)
    peak = static + max(train_act, rollout_act, vae_act, reward_act)
    hbm = CHIPS[chip]
    usable = hbm * (1 - margin)
    return dict(
        chip=chip, hbm=hbm, margin=margin, usable=usable, mesh=mesh_shape, devices=devices,
        micro_batch_per_device=micro_batch, batch_divisible=batch_ok, remat_policy=policy,
        attention="xla (materialised)" if xla_attention else "flash (cudnn)", tokens=tokens, reward=reward,
        rows=[dataclasses.asdict(r) for r in rows], static=static,
        activations=acts, train_activations=train_act, rollout_transient=rollout_act,
        reward_transient=reward_act, vae_transient=vae_act, peak=peak, fits=peak <= usable, headroom=usable - peak,
        notes=notes,
    )


def _same_checkpoint(config) -> bool:
    """Whether the reward model is the family's text encoder checkpoint (``tasks._shared_encoder`` then loads
    one copy): ``reward.mllm_dir`` resolves to ``model.dir/text_encoder``."""
    from pathlib import Path

    mllm, model_dir = str(config.reward.get("mllm_dir", "") or ""), str(config.model.get("dir", "") or "")
    return bool(mllm and model_dir) and Path(mllm).resolve() == (Path(model_dir) / "text_encoder").resolve()


def candidate_meshes(devices: int) -> list[dict[str, int]]:
    out = []
    for tensor in range(1, min(MAX_TENSOR, devices) + 1):
        if devices % tensor:
            continue
        rest = devices // tensor
        for fsdp in range(1, rest + 1):
            if rest % fsdp == 0:
                out.append(dict(data=rest // fsdp, fsdp=fsdp, tensor=tensor))
    return out


def recommend(config, devices: int, chip: str, *, micro_batch: int | None = None, reward: str | None = None,
              margin: float = 0.15) -> dict:
    """Search the meshes over ``devices``; the fitting one with the least model sharding."""
    configured = str(config.model.remat_policy)
    for policy in dict.fromkeys((configured, "full")):
        results = []
        for shape in candidate_meshes(devices):
            p = plan(config, shape, chip, micro_batch=micro_batch, reward=reward, margin=margin,
                     remat_policy=policy)
            if p["fits"] and (micro_batch is not None or p["batch_divisible"]):
                results.append(p)
        results.sort(key=lambda p: (p["mesh"]["fsdp"] * p["mesh"]["tensor"], p["mesh"]["tensor"], p["peak"]))
        if results:
            return dict(remat_policy=policy, changed_policy=policy != configured, best=results[0],
                        alternatives=results[1:5])
    return dict(remat_policy=None, changed_policy=False, best=None, alternatives=[])


# ---------------------------------------------------------------------------------------------------------
# Command line.


def load_config(spec: str, overrides: Sequence[str] = ()):
    """``path.py[:variant]`` -> ConfigDict, with ``--config.a.b=value`` overrides applied (typed by the default)."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_plan_config", path)
    if module_spec is None or module_spec.loader is None:
        raise SystemExit(f"--config {spec}: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise SystemExit(f"unknown argument {item!r} (overrides look like --config.train.micro_batch_size=96)")
        key, value = item[len("--config."):].split("=", 1)
        parent = config
        *head, last = key.split(".")
        for k in head:
            parent = parent[k]
        if last not in parent:
            raise SystemExit(f"--config.{key}: no such field")
        old = parent[last]
        if isinstance(old, bool):
            new = value.lower() in ("1", "true", "yes")
        elif isinstance(old, (int, float, str)) and not isinstance(old, bool):
            new = type(old)(value)
        else:
            new = ast.literal_eval(value)
        parent[last] = new
    return config


def parse_mesh(text: str) -> dict[str, int]:
    shape = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES or not size.strip().lstrip("-").isdigit():
            raise SystemExit(f"--mesh {text!r}: expected e.g. data=4,fsdp=8,tensor=1 (axes {MESH_AXES})")
        shape[name] = int(size)
    if any(v < 1 for v in shape.values()):
        raise SystemExit(f"--mesh {text!r}: sizes must be >= 1 (the device count is their product)")
    return {a: shape.get(a, 1) for a in MESH_AXES}


def _gb(x) -> str:
    return f"{x / GB:8.2f}"


def format_plan(p: dict) -> str:
    m = p["mesh"]
    lines = [f"mesh data={m['data']},fsdp={m['fsdp']},tensor={m['tensor']} ({p['devices']} devices) on "
             f"{p['chip']} ({p['hbm'] / GB:.0f} GB HBM); micro-batch {p['micro_batch_per_device']}/device, "
             f"{p['tokens']} tokens/sample, attention {p['attention']}",
             f"{'component':34s} {'params':>14s} {'dtype':>9s} {'total GB':>9s} {'GB/device':>9s}  note",
             "-" * 100]
    for r in p["rows"]:
        params = f"{r['params']:,}" if r["params"] else "-"
        lines.append(f"{r['name']:34s} {params:>14s} {r['dtype']:>9s} {_gb(r['total']):>9s} "
                     f"{_gb(r['per_device']):>9s}  {r['note']}")
    lines.append(f"{'static total':34s} {'':>14s} {'':>9s} {'':>9s} {_gb(p['static']):>9s}")
    lines.append("-" * 100)
    for name, a in p["activations"].items():
        mark = "*" if name == p["remat_policy"] else " "
        lines.append(f"{mark} activations remat={name:32s} saved {_gb(a['saved'])} + working {_gb(a['working'])}"
                     f" = {_gb(a['total'])} GB")
    lines.append(f"  rollout transient {_gb(p['rollout_transient']).strip()} GB, VAE decode transient "
                 f"{_gb(p['vae_transient']).strip()} GB, reward transient {_gb(p['reward_transient']).strip()} GB")
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(f"peak = static + max(train[{p['remat_policy']}], rollout, VAE, reward) = {p['peak'] / GB:.2f} GB; "
                 f"usable {p['usable'] / GB:.2f} GB ({p['hbm'] / GB:.0f} GB x (1 - {p['margin']})): {verdict} "
                 f"(headroom {p['headroom'] / GB:+.2f} GB)")
    for n in p["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def recommended_overrides(r: dict, config, micro_batch: int | None = None) -> list[str]:
    """The ``--config.`` flags that make the trainer run what ``r`` (a :func:`recommend` result) planned: the
    mesh, the remat policy when the plan needed another one, and the global micro-batch for ``--micro-batch``."""
    if r["best"] is None:
        return []
    m = r["best"]["mesh"]
    out = [f"--config.mesh.{a}={m[a]}" for a in MESH_AXES]
    if r["remat_policy"] != str(config.model.remat_policy):
        out.append(f"--config.model.remat_policy={r['remat_policy']}")
    if micro_batch is not None:
        out.append(f"--config.train.micro_batch_size={micro_batch * m['data'] * m['fsdp']}")
    return out


def format_recommendation(r: dict, devices: int, chip: str, command: Sequence[str] = ()) -> str:
    """``command``: the trainer's command line (config and the overrides given to plan) to extend."""
    if r["best"] is None:
        return (f"recommended mesh: none of the meshes over {devices} {chip} devices fits, even with remat 'full' "
                f"(reduce the micro-batch or use a bigger chip)")
    b = r["best"]
    m = b["mesh"]
    out = [f"recommended mesh for {devices} x {chip}: data={m['data']},fsdp={m['fsdp']},tensor={m['tensor']} "
           f"(peak {b['peak'] / GB:.2f} GB, remat {r['remat_policy']}"
           + (", changed from the configured policy: nothing fits with it" if r["changed_policy"] else "") + ")"]
    for a in r["alternatives"]:
        am = a["mesh"]
        out.append(f"  also fits: data={am['data']},fsdp={am['fsdp']},tensor={am['tensor']} "
                   f"(peak {a['peak'] / GB:.2f} GB)")
    out.append("overrides: " + " ".join(r["overrides"]))
    if command:
        out.append("command:   " + " ".join([*command, *r["overrides"]]))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edit_r1_jax.plan", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
    parser.add_argument("--mesh", help="data=D,fsdp=F,tensor=T (device count = product)")
    parser.add_argument("--devices", type=int, help="device count for the mesh search when --mesh is not given")
    parser.add_argument("--chip", required=True, choices=sorted(CHIPS))
    parser.add_argument("--micro-batch", type=int, help="micro-batch PER DEVICE (default: "
                        "config.train.micro_batch_size / (data*fsdp))")
    parser.add_argument("--reward", choices=("7b", "32b", "none"), help="default: 7b if reward.weights has mllm")
    parser.add_argument("--margin", type=float, default=0.15, help="HBM fraction kept free (default 0.15)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args, rest = parser.parse_known_args(argv)
    if args.mesh is None and args.devices is None:
        parser.error("give --mesh data=D,fsdp=F,tensor=T or --devices N")
    config = load_config(args.config, rest)
    from edit_r1_jax import editors

    if str(config.task) not in editors.names():
        raise SystemExit(f"--config {args.config}: task {config.task!r} has no memory plan (the planner sizes the "
                         f"model families {', '.join(editors.names())})")
    kw = dict(micro_batch=args.micro_batch, reward=args.reward, margin=args.margin)
    result: dict[str, Any] = {}
    if args.mesh is not None:
        shape = parse_mesh(args.mesh)
        result["plan"] = plan(config, shape, args.chip, **kw)
        devices = result["plan"]["devices"]
    else:
        devices = args.devices
    rec = result["recommendation"] = recommend(config, devices, args.chip, **kw)
    rec["overrides"] = recommended_overrides(rec, config, args.micro_batch)
    # the overrides given to plan come first: the recommendation's flags after them win if both set a field
    rec["command"] = " ".join(["python -m edit_r1_jax.train", "--config", args.config, *rest, *rec["overrides"]])
    if args.json:
        json.dump(result, sys.stdout, indent=1, default=float)
        print()
    else:
        if "plan" in result:
            print(format_plan(result["plan"]))
            print()
        elif result["recommendation"]["best"] is not None:
            print(format_plan(result["recommendation"]["best"]))
            print()
        print(format_recommendation(rec, devices, args.chip,
                                    ["python -m edit_r1_jax.train", "--config", args.config, *rest]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
