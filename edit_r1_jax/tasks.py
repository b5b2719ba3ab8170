"""What the loop trains on: the editor around the DiT (conditioning, decoding), the data and the reward.

A task gives the loop:
  policy, base           the static DiT call (engine.Policy) and the frozen base parameters (on the mesh)
  init_lora()            the initial LoRA pytree theta (A gaussian, B zero)
  sigmas_train/_eval     rollout and evaluation schedules
  num_train_rows         rows the group sampler draws from (row id = group id)
  inputs(rows, split)    host arrays for this host's rows (source image, text conditioning)
  encode(inputs)         jitted: global inputs -> conditioning {"ref", <the family's text entries>}
  decode(x0)             jitted: final latents -> images [B, H, W, 3] in [0, 1] (global, on the mesh)
  reward(rows, inputs, images, index, split) -> (total [B], per-reward {name: [B]}, valid [B])
                         on the GLOBAL batch: rows/index are all B rows (numpy, the same on every process),
                         inputs/images the global arrays; the results are numpy, the same on every process
Two kinds: "toy" (pixel-space shapes editing, CPU demo) and EditTask, the paper's task for any model family of
``edit_r1_jax.editors`` (``config.task`` names the family: "kontext", "qwen_image_edit"): a jsonl dataset, the
family's VAE and text conditioning (from the cache or on the fly) and the MLLM reward.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from tqdm import tqdm

from edit_r1_jax import editors, engine, runpath, weights
from edit_r1_jax.data import source as data_source
from edit_r1_jax.data import toy
from edit_r1_jax.data.images import to_model_range
from edit_r1_jax.diffusion import latents, schedule
from edit_r1_jax.models import lora as lora_lib
from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer
from edit_r1_jax.parallel import distributed
from edit_r1_jax.parallel import rules
from edit_r1_jax.rewards import registry as reward_registry

log = logging.getLogger(__name__)


def build(c, mesh, run_dir: Path, writer):
    if c.task == "toy":
        return ToyTask(c, mesh, run_dir, writer)
    return EditTask(c, mesh, run_dir, writer)


lora_config = editors.lora_config  # the ``lora`` section as a LoRAConfig (also used by train.plan_line)


def split_on_mesh(model: nnx.Module, mesh):
    """Shard the model on the mesh, then split it into (graphdef, base, lora)."""
    rules.shard_model(model, mesh)
    return lora_lib.split_policy(model)


class Task:
    """What both tasks share: scoring through the reward registry, and source images for the grids."""

    reward_fn = None  # registry.combine(...) result, set by the task

    def _score(self, batch, rows=None, split: str = "train"):
        """(total [b], per-reward scores, valid [b]) from the combined reward; invalid samples are NaN.

        A reward error is re-raised naming the split and the dataset row of the failing sample (``rows``: the
        dataset row of each sample of the batch)."""
        try:
            total, info = self.reward_fn(batch)
        except reward_registry.RewardError as e:
            if rows is None:
                raise
            rows = [int(r) for r in np.asarray(rows)]
            # the registry names the failing samples by their positions in this batch
            pos = list(e.indices) if e.indices else [int(m) for m in re.findall(r"sample (\d+)", str(e))[:1]]
            named = [rows[i] for i in pos if 0 <= i < len(rows)]
            where = (f"dataset row{'s' if len(named) > 1 else ''} {', '.join(map(str, named))} of the {split} split"
                     if named else f"{split} split, dataset rows {rows} (by position in the batch)")
            raise reward_registry.RewardError(f"{where}: {e}", indices=e.indices, scores=e.scores) from e
        valid = info.pop("valid")
        info.pop("num_masked")
        return total, info, valid

    def source_images(self, inputs):
        return (inputs["source"] + 1) / 2


def toy_flux_config(c) -> FluxConfig:
    """The toy's DiT: the FLUX code at ``config.model.dit`` sizes over 2x2 RGB patches (12 features)."""
    t = c.toy
    return FluxConfig(**dict(c.model.dit), in_channels=12, joint_attention_dim=int(t.text_dim),
                      pooled_projection_dim=int(t.text_dim), guidance_embeds=False, dtype=c.model.dtype,
                      param_dtype=c.model.param_dtype, remat_policy=c.model.remat_policy,
                      attention_impl=c.model.attention_impl or None, lora=lora_config(c))


class ToyTask(Task):
    """Coloured shapes edited in pixel space: 16x16x3 images, 2x2 patches -> 64 tokens of 12 features.

    The base DiT is random, so it is warm-started by supervised flow matching on (source, instruction) ->
    target pairs (all base parameters, cached in run_dir/warm_base); RL then trains the LoRA on top.
    """

    def __init__(self, c, mesh, run_dir: Path, writer):
        t = c.toy
        self.c, self.mesh, self.res = c, mesh, int(t.resolution)
        kw = dict(seed=int(t.seed), resolution=self.res, max_len=int(t.text_length), dim=int(t.text_dim))
        self.train_rows = toy.make_batch([toy.ToySource(int(t.num_train_rows), **kw)[i]
                                          for i in range(int(t.num_train_rows))])
        self.test_rows = toy.make_batch([toy.ToySource(int(t.num_test_rows), **dict(kw, seed=int(t.seed) + 1))[i]
                                         for i in range(int(t.num_test_rows))])
        self.num_train_rows = int(t.num_train_rows)
        tokens = (self.res // 2) ** 2
        cfg = toy_flux_config(c)
        self.policy_cfg = cfg
        model = FluxTransformer(cfg, rngs=nnx.Rngs(c.seed))
        graphdef, base, lora = split_on_mesh(model, mesh)
        self.lora_init = lora
        self.policy = engine.Policy(graphdef, editors.get("kontext").velocity,
                                    latents.kontext_ids(self.res // 2, self.res // 2),
                                    latents.text_ids(int(t.text_length)), None, (tokens, 12))
        self.base = self._warm_start(base, epath.Path(run_dir) / "warm_base", writer)
        self.sigmas_train = schedule.sigmas(int(c.sample.num_steps), tokens)
        self.sigmas_eval = schedule.sigmas(int(c.eval.num_steps), tokens)
        self.reward_fn = reward_registry.default_registry.combine(dict(c.reward.weights), c.reward.on_error)

    # -- supervised warm start ------------------------------------------------------------------------------
    def _warm_start(self, base, path: epath.Path, writer):
        w = self.c.warmup
        if w.steps <= 0:
            return base
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), base)
        if (path / weights.PARAMS_FILE).exists():
            log.info("warm start: loading %s", path)
            with runpath.local_file(path / weights.PARAMS_FILE) as local:
                return weights.load_state(local, abstract, jax.tree.map(lambda s: s.sharding, abstract))
        log.info("warm start: %d steps of supervised flow matching (batch %d)", w.steps, w.batch_size)
        tx = _adam(float(w.learning_rate))
        opt = tx.init(base)
        data = distributed.replicate(self.mesh, {k: self.train_rows[k] for k in ("source", "target", "tokens", "pooled")})
        rng = np.random.default_rng(self.c.seed)
        key = jax.random.key(self.c.seed + 7)
        bar = tqdm(range(int(w.steps)), desc="warm start", unit="step", leave=False,
                   disable=not self.c.log.progress or jax.process_index() != 0)
        for i in bar:
            idx = rng.integers(0, self.num_train_rows, int(w.batch_size))
            idx, k = distributed.replicate(self.mesh, (idx, jax.random.key_data(jax.random.fold_in(key, i))))
            base, opt, loss = _warm_step(self.policy, tx, base, opt, jax.random.wrap_key_data(k), data, idx)
            if i % 100 == 0 or i == w.steps - 1:  # syncs the host: not every step
                writer.write(i, {"warmup/flow_matching_loss": float(loss)})  # step = warm-up step
                bar.set_postfix(loss=f"{float(loss):.4f}")
                log.debug("warm start step %d: loss %.4f", i, float(loss))
        bar.close()
        if jax.process_index() == 0:
            path.mkdir(parents=True, exist_ok=True)
            flat = weights.flat_per_layer(base)  # per-layer keys, like every converted checkpoint
            runpath.save_safetensors(path / weights.PARAMS_FILE, flat)
        log.info("warm start: done, flow-matching loss %.4f; base cached in %s", float(loss), path)
        return base

    # -- the task interface ---------------------------------------------------------------------------------
    def init_lora(self):
        """theta at start: LoRA A drawn at model construction from config.seed, B = 0."""
        return self.lora_init

    def _rows(self, split):
        return self.train_rows if split == "train" else self.test_rows

    def inputs(self, rows, split: str = "train") -> dict[str, np.ndarray]:
        d = self._rows(split)
        return {"source": d["source"][rows], "tokens": d["tokens"][rows], "pooled": d["pooled"][rows]}

    @functools.partial(jax.jit, static_argnums=0)
    def encode(self, inputs):
        return {"ref": latents.pack(inputs["source"]), "text": inputs["tokens"], "pooled": inputs["pooled"]}

    @functools.partial(jax.jit, static_argnums=0)
    def decode(self, x0):
        return jnp.clip((latents.unpack(x0, self.res, self.res) + 1) / 2, 0, 1)

    def reward(self, rows, inputs, images, index, split: str = "train"):
        # The verifier is host-side: the one place the decoded images are copied to the hosts (all of them,
        # 16x16 pixels each; every host scores the global batch, so nothing is gathered afterwards).
        d = self._rows(split)
        image, source = distributed.gather_global(images), distributed.gather_global(inputs["source"])
        return self._score({"image": image * 2 - 1, "source": source, "target": d["target"][np.asarray(rows)]},
                           rows, split)

    def caption(self, row, split: str = "train") -> str:
        return self._rows(split)["prompt"][int(row)]

    def eval_rows(self, n: int) -> np.ndarray:
        if n > len(self.test_rows["row_id"]):
            raise ValueError(f"eval.num_samples={n} exceeds toy.num_test_rows={len(self.test_rows['row_id'])}")
        return np.arange(n)

    def eval_extra_metrics(self, rewards) -> dict[str, float]:
        return {"eval/success_rate": float(np.nanmean(rewards >= self.c.toy.success_threshold))}



class EditTask(Task):
    """The paper's task for the model family ``config.task`` (spec A, D, F, G).

    The DiT base is loaded straight onto the mesh (each host reads its shards), LoRA adapters added; the VAE is
    replicated; the text conditioning comes from the cache (``python -m edit_r1_jax.embed_text``), so the text
    encoder never occupies accelerator memory during training, or from the family's encoder on the fly when
    ``data.text_cache`` is False. The MLLM reward runs in-process, sharded on the same mesh.
    """

    def __init__(self, c, mesh, run_dir: Path, writer):
        del run_dir, writer
        self.c, self.mesh = c, mesh
        self.family = family = editors.get(c.task)
        model_dir = Path(c.model.dir)
        res = int(c.data.resolution)
        # grain random-access datasets: the group sampler picks row ids, grain decodes and crops those rows
        self.sources, self.rows = {}, {}
        for split in ("train", "test"):
            self.sources[split], self.rows[split] = data_source.make_dataset(
                c.data.root, split, res, allow_outside_root=bool(c.data.allow_outside_root),
                on_duplicate=str(c.data.on_duplicate))
        self.num_train_rows = len(self.rows["train"])
        cfg, graphdef, self.base, self.lora_init = family.load_transformer(
            model_dir, mesh=mesh, seed=int(c.seed), dtype=c.model.dtype, param_dtype=c.model.param_dtype,
            remat_policy=c.model.remat_policy, attention_impl=c.model.attention_impl or None, lora=lora_config(c))
        vae = family.load_vae(model_dir, dtype=c.model.dtype, mesh=mesh)
        self.vae_graph, self.vae_state = nnx.split(vae)
        self.grid = family.grid(vae.cfg, res)
        tokens = self.grid[0] * self.grid[1]
        self.policy = family.policy(graphdef, cfg, vae.cfg, res, family.text_length(c.text),
                                    float(c.sample.guidance))
        sched = family.scheduler_config(model_dir)
        self.sigmas_train = family.sigmas(sched, int(c.sample.num_steps), tokens)
        self.sigmas_eval = family.sigmas(sched, int(c.eval.num_steps), tokens)
        reg = reward_registry.Registry()
        for name in reward_registry.default_registry.names():
            reg.register(name, reward_registry.default_registry.get(name))
        mllm = None
        if "mllm" in c.reward.weights:
            from edit_r1_jax.rewards.mllm import MLLMReward

            mllm = MLLMReward(c.reward.mllm_dir, mesh=mesh, jpeg=bool(c.reward.jpeg_roundtrip),
                              batch_size=int(c.reward.batch_size),
                              prompt_template=c.reward.get("prompt_template") or None)
            reg.register("mllm", lambda b: mllm(b["source"], b["image"], b["prompt"], b["requirement"]))
        self.reward_fn = reg.combine(dict(c.reward.weights), c.reward.on_error)
        if c.data.text_cache:
            from edit_r1_jax.embed_text import TextCache

            self.text = {s: TextCache(c.data.root, s, model_dir, family=family, text_cfg=c.text)
                         for s in ("train", "test")}
            self.conditioner = None
        else:
            # in the compute dtype (the reference runs its text encoders in bf16; a float32 7B encoder would
            # hold twice the memory), or the reward's own copy when it is the same checkpoint
            self.conditioner = family.conditioner(model_dir, c.text, dtype=jnp.dtype(c.model.dtype), mesh=mesh,
                                                  shared=_shared_encoder(mllm, model_dir))

    def init_lora(self):
        return self.lora_init

    def inputs(self, rows, split: str = "train") -> dict[str, np.ndarray]:
        items = [self.sources[split][int(r)] for r in rows]
        prompts = [it["prompt"] for it in items]
        images = np.stack([it["image"] for it in items])
        cond = (self.text[split].lookup(prompts, images) if self.conditioner is None
                else self.conditioner(prompts, images))
        return {"source": to_model_range(images).astype(np.float32), **cond}

    def encode(self, inputs):
        cond = {k: v for k, v in inputs.items() if k != "source"}
        return {"ref": editors.encode_reference(self.vae_graph, self.vae_state, inputs["source"]), **cond}

    def decode(self, x0):
        return editors.decode_latents(self.vae_graph, self.grid[0], self.grid[1], self.vae_state, x0)

    def reward(self, rows, inputs, images, index, split: str = "train"):
        """The global batch: ``images`` and ``inputs`` global arrays on the mesh (straight into the MLLM's
        on-device preprocessing), ``rows`` all of its rows, so every process builds the same prompts."""
        items = [self.rows[split][int(r)] for r in rows]
        batch = {"image": images, "source": _to_unit(inputs["source"]), "prompt": [r.prompt for r in items],
                 "requirement": [r.requirement for r in items], "index": np.asarray(index)}
        return self._score(batch, rows, split)

    def caption(self, row, split: str = "train") -> str:
        return self.rows[split][int(row)].prompt

    def eval_rows(self, n: int) -> np.ndarray:
        return np.arange(min(n, len(self.rows["test"])))

    def eval_extra_metrics(self, rewards) -> dict[str, float]:
        return {}


def _shared_encoder(mllm, model_dir: Path):
    """The reward's loaded Qwen2.5-VL when it is the same checkpoint as the family's text encoder (one copy of
    the weights on the devices), else None."""
    if mllm is None or not (model_dir / "text_encoder").is_dir():
        return None
    if Path(mllm.model_dir).resolve() != (model_dir / "text_encoder").resolve():
        return None
    log.info("text encoder %s is the reward model: one copy of its weights", model_dir / "text_encoder")
    return mllm.model


@jax.jit
def _to_unit(source):
    return (source + 1) / 2


@functools.lru_cache(maxsize=None)
def _adam(lr: float):
    return optax.adam(lr)


@functools.partial(jax.jit, static_argnames=("policy", "tx"), donate_argnames=("base", "opt"))
def _warm_step(policy: engine.Policy, tx, base, opt, key, data, idx):
    """One supervised flow-matching step on (source, instruction) -> target, all base parameters."""
    src, tgt = data["source"][idx], latents.pack(data["target"][idx])
    cond = {"ref": latents.pack(src), "text": data["tokens"][idx], "pooled": data["pooled"][idx]}
    k1, k2 = jax.random.split(key)
    eps = jax.random.normal(k1, tgt.shape)
    t = jax.nn.sigmoid(jax.random.normal(k2, (tgt.shape[0],)))  # logit-normal, as in SD3/Flux training
    x_t = (1 - t[:, None, None]) * tgt + t[:, None, None] * eps

    def loss_fn(b):
        return jnp.mean((policy.velocity(b, None, x_t, t, cond) - (eps - tgt)) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(base)
    upd, opt = tx.update(g, opt, base)
    return optax.apply_updates(base, upd), opt, loss
