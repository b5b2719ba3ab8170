"""The paper's task: FLUX.1-Kontext editing of a jsonl dataset, rewarded by Qwen2.5-VL (spec A, D, F).

The DiT base is loaded straight onto the mesh (each host reads its shards), LoRA adapters added; the VAE is
replicated (84M parameters); instruction embeddings come from the text cache (``python -m
edit_r1_jax.embed_text``) so T5-XXL never occupies accelerator memory, or from the text encoders on the fly when
``data.text_cache`` is False. The MLLM reward runs in-process, sharded on the same mesh.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax import engine, weights
from edit_r1_jax.data import source as data_source
from edit_r1_jax.data.images import to_model_range
from edit_r1_jax.diffusion import latents
from edit_r1_jax.models.flux import autoencoder_params as vae_params
from edit_r1_jax.models.flux.autoencoder_params import load_vae
from edit_r1_jax.models.flux.params import load_transformer
from edit_r1_jax.pipeline import ScheduleConfig
from edit_r1_jax.rewards import registry as reward_registry
from edit_r1_jax.tasks import Task, lora_config

log = logging.getLogger(__name__)


class KontextTask(Task):
    def __init__(self, c, mesh, run_dir: Path, writer):
        del run_dir, writer
        self.c, self.mesh = c, mesh
        model_dir = Path(c.model.dir)
        res = int(c.data.resolution)
        # grain random-access datasets: the group sampler picks row ids, grain decodes and crops those rows
        self.sources, self.rows = {}, {}
        for split in ("train", "test"):
            self.sources[split], self.rows[split] = data_source.make_dataset(
                c.data.root, split, res, allow_outside_root=bool(c.data.allow_outside_root),
                on_duplicate=str(c.data.on_duplicate))
        self.num_train_rows = len(self.rows["train"])
        _, graphdef, self.base, self.lora_init = load_transformer(
            model_dir / "transformer", mesh=mesh, seed=int(c.seed), dtype=c.model.dtype,
            param_dtype=c.model.param_dtype, remat_policy=c.model.remat_policy,
            attention_impl=c.model.attention_impl or None, lora=lora_config(c))
        # Replicated on the mesh, each process filling its own devices from the file (a device_put of arrays
        # committed to one device would be a cross-host transfer, which jax does not do).
        vae_cfg = vae_params.config_from_dict(weights.read_config(model_dir / "vae"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        vae_sh = jax.tree.map(lambda _: replicated, vae_params.abstract_state(vae_cfg))
        self.vae = load_vae(model_dir / "vae", dtype=jnp.dtype(c.model.dtype), shardings=vae_sh)
        self.vae_graph, self.vae_state = nnx.split(self.vae)
        h = res // (self.vae.cfg.scale_factor * 2)
        self.grid = h
        tokens = h * h
        self.policy = engine.Policy(graphdef, latents.kontext_ids(h, h), latents.text_ids(int(c.text.t5_length)),
                                    float(c.sample.guidance), (tokens, 4 * self.vae.cfg.latent_channels))
        sched_file = model_dir / "scheduler" / "scheduler_config.json"
        sched = ScheduleConfig(json.loads(sched_file.read_text()) if sched_file.exists() else None)
        self.sigmas_train = sched.sigmas(int(c.sample.num_steps), tokens)
        self.sigmas_eval = sched.sigmas(int(c.eval.num_steps), tokens)
        if c.data.text_cache:
            from edit_r1_jax.embed_text import TextCache

            self.text = {s: TextCache(c.data.root, s, model_dir) for s in ("train", "test")}
            self.encoders = None
        else:
            from edit_r1_jax.models.text.encoders import TextEncoders

            self.encoders = TextEncoders.from_pretrained(model_dir, t5_length=int(c.text.t5_length),
                                                         clip_length=int(c.text.clip_length))
        reg = reward_registry.Registry()
        for name in reward_registry.default_registry.names():
            reg.register(name, reward_registry.default_registry.get(name))
        if "mllm" in c.reward.weights:
            from edit_r1_jax.rewards.mllm import MLLMReward

            mllm = MLLMReward(c.reward.mllm_dir, mesh=mesh, jpeg=bool(c.reward.jpeg_roundtrip),
                              batch_size=int(c.reward.batch_size),
                              prompt_template=c.reward.get("prompt_template") or None)
            reg.register("mllm", lambda b: mllm(b["source"], b["image"], b["prompt"], b["requirement"]))
        self.reward_fn = reg.combine(dict(c.reward.weights), c.reward.on_error)

    def init_lora(self):
        return self.lora_init

    def inputs(self, rows, split: str = "train") -> dict[str, np.ndarray]:
        items = [self.sources[split][int(r)] for r in rows]
        prompts = [it["prompt"] for it in items]
        if self.encoders is None:
            embeds, pooled = self.text[split].lookup(prompts)
        else:
            embeds, pooled = self.encoders(prompts)
        return {"source": np.stack([to_model_range(it["image"]) for it in items]).astype(np.float32),
                "text": np.asarray(embeds, np.float32), "pooled": np.asarray(pooled, np.float32)}

    def encode(self, inputs):
        return _encode(self.vae_graph, self.vae_state, inputs)

    def decode(self, x0):
        return _decode(self.vae_graph, self.grid, self.vae_state, x0)

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


@jax.jit
def _to_unit(source):
    return (source + 1) / 2


@functools.partial(jax.jit, static_argnums=0)
def _encode(vae_graph, vae_state, inputs):
    vae = nnx.merge(vae_graph, vae_state)
    ref = latents.pack(vae.encode_normalized(inputs["source"]).astype(jnp.float32))
    return {"ref": ref, "text": inputs["text"], "pooled": inputs["pooled"]}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _decode(vae_graph, grid: int, vae_state, x0):
    vae = nnx.merge(vae_graph, vae_state)
    x = vae.decode_normalized(latents.unpack(x0, 2 * grid, 2 * grid)).astype(jnp.float32)
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)
