"""python -m edit_r1_jax.train --config configs/NAME.py[:variant] [--config.field=value ...]

The Edit-R1 loop (spec E), one epoch at a time:
  group sampler -> condition -> rollout with theta_old -> decode -> reward -> advantages + filter
  -> NFT optimizer step(s) (EMA inside) -> theta_old soft update -> metrics, grids, checkpoint.
Without --config it runs the tiny CPU toy task (configs/toy.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
from absl import app
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm

from edit_r1_jax import checkpoint as ckpt_lib
from edit_r1_jax import config as config_lib
from edit_r1_jax import engine, runpath, tasks
from edit_r1_jax import metrics as metrics_lib
from edit_r1_jax.data.groups import GroupSampler
from edit_r1_jax.data.prefetch import Prefetcher
from edit_r1_jax.models import lora as lora_lib
from edit_r1_jax.nft import advantages as adv_lib
from edit_r1_jax.nft import loss as nft_loss
from edit_r1_jax.parallel import distributed
from edit_r1_jax.parallel import mesh as mesh_lib

log = logging.getLogger("edit_r1_jax.train")

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "toy.py")


def nft_config(c, num_micro_batches: int) -> nft_loss.NFTConfig:
    t = c.train
    return nft_loss.NFTConfig(
        nft_beta=float(t.nft_beta), kl_weight=float(t.kl_weight), adv_clip_max=float(t.adv_clip_max),
        timestep_mode=str(t.timestep_sampling), timestep_fraction=float(t.timestep_fraction),
        num_micro_batches=int(num_micro_batches))


def run(c, max_epochs: int | None = None) -> dict[str, Any]:
    """Train per config ``c``; returns {"eval": {epoch: metrics}, "last": metrics, "state": state}."""
    distributed.initialize(c.distributed.coordinator, c.distributed.num_processes, c.distributed.process_id)
    mesh = mesh_lib.make_mesh(dict(c.mesh))
    sizes = config_lib.validate(c, jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"])
    run_dir = epath.Path(c.run_dir)  # local folder or bucket URL alike (gs://...): never a local Path
    writer = metrics_lib.MetricWriter(run_dir, tensorboard=c.log.tensorboard)
    timer = metrics_lib.Timer()
    summary: dict[str, Any] = {"eval": {}}

    with jax.set_mesh(mesh):
        task = tasks.build(c, mesh, run_dir, writer)
        tx = engine.make_optimizer(c)
        state = engine.init_state(task.init_lora(), tx, jax.random.key(c.seed))
        sampler = GroupSampler(task.num_train_rows, c.sample.groups_per_batch, c.sample.group_size,
                               c.sample.num_batches_per_epoch, c.seed, jax.process_index(), jax.process_count())
        ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", c.checkpoint.max_to_keep,
                                     use_ocdbt=bool(c.checkpoint.get("use_ocdbt", True)))
        start_epoch = 0
        if c.resume and ckpt.latest_step() is not None:
            state, host = ckpt.restore(ckpt_lib.abstract_like(state))
            sampler.set_state(host["sampler"])
            start_epoch = host["epoch"] + 1
            log.info("resumed after epoch %d (optimizer step %d)", host["epoch"], int(state["step"]))

        hp = nft_config(c, sizes["micro_batches_per_step"])
        end_epoch = c.num_epochs if max_epochs is None else min(c.num_epochs, start_epoch + max_epochs)
        bar = tqdm(range(start_epoch, end_epoch), desc="epochs", initial=start_epoch, total=end_epoch,
                   disable=not c.log.progress or jax.process_index() != 0)
        for epoch in bar:
            if c.eval.every > 0 and epoch % c.eval.every == 0:
                with timer("eval"):
                    summary["eval"][epoch] = evaluate(c, task, state, epoch, writer)
            with timer("epoch"):
                batches = rollouts(c, task, mesh, sampler, state, epoch, sizes, timer)
                with timer("advantages"):
                    adv, filt, epoch_metrics = advantages(c, batches, sampler)
                with timer("train"):
                    state, train_metrics = update(c, task, mesh, tx, hp, state, batches, adv, filt, sizes)
            epoch_metrics.update(train_metrics, epoch=epoch, **timer.pop())
            epoch_metrics["images_per_s"] = sizes["samples_per_epoch"] / epoch_metrics["time/epoch"]
            writer.write(int(state["step"]), epoch_metrics)
            if c.log.image_every > 0 and epoch % c.log.image_every == 0:
                b = batches[0]
                n = min(c.log.num_images, len(b["rewards"]))
                writer.image_grid("train", epoch, task.source_images(b["inputs"])[:n], b["images"][:n],
                                  b["rewards"][:n], [task.caption(r) for r in b["local_rows"][:n]])
            bar.set_postfix(reward=f"{epoch_metrics['reward_mean']:.3f}",
                            loss=f"{epoch_metrics['train/total_loss']:.4f}")
            summary["last"] = epoch_metrics
            if (epoch + 1) % c.checkpoint.every == 0 or epoch + 1 == end_epoch:
                ckpt.save(epoch, state, {"epoch": epoch, "sampler": sampler.get_state()})
                export_lora(c, run_dir / "lora" / f"step_{int(state['step']):07d}", state["ema"])
        if c.eval.every > 0 and end_epoch > start_epoch and end_epoch == c.num_epochs:
            summary["eval"][end_epoch] = evaluate(c, task, state, end_epoch, writer)
        ckpt.close()
        writer.close()
    summary["state"] = state
    return summary


def rollouts(c, task, mesh, sampler, state, epoch: int, sizes, timer) -> list[dict[str, Any]]:
    """The epoch's sampling batches (M rows x K repeats each), rolled out with theta_old in chunks of
    ``sample.rollout_batch_size`` and scored. Each chunk is one entry; global order = gather order.

    The devices are kept busy: the next chunk's inputs (image decoding, resizing, text lookup) are prepared in
    a background thread while the current chunk rolls out, and chunk i+1's rollout is dispatched before chunk
    i's rewards are read back (JAX dispatches asynchronously; only the reward read-back blocks). Decoded
    images stay on the mesh for the reward; a host copy is made only for the sample grid.
    """
    epoch_key = jax.random.fold_in(jax.random.key(c.seed + 1), epoch)
    chunk = c.sample.rollout_batch_size // jax.process_count()  # this host's share of one rollout call
    plan = []  # (this host's rows, their global sample indices) per rollout call
    with timer("data"):
        for i in range(c.sample.num_batches_per_epoch):
            draw = sampler.next_batch()  # group id = dataset row id (spec H.1, H.2)
            offset = epoch * sizes["samples_per_epoch"] + i * sizes["samples_per_batch"]
            for start in range(0, len(draw.row_ids), chunk):
                plan.append((draw.row_ids[start:start + chunk], offset + draw.slot_ids[start:start + chunk]))
    grid = c.log.image_every > 0 and epoch % c.log.image_every == 0
    batches, pending = [], None
    with Prefetcher(task.inputs, [rows for rows, _ in plan]) as prefetched:
        for k, (rows, local_index) in enumerate(plan):
            with timer("data"):  # only the wait for the background thread: the host-side stall
                inputs = next(prefetched)
            with timer("rollout"):
                g_inputs = distributed.to_global(mesh, inputs)
                cond = task.encode(g_inputs)
                gidx = distributed.to_global(mesh, local_index)
                x0 = engine.sample(task.policy, task.base, state["theta_old"], cond, epoch_key, gidx,
                                   task.sigmas_train, c.sample.solver, float(c.sample.eta))
                if c.log.sync_phase_times:
                    jax.block_until_ready(x0)
            with timer("decode"):
                images = task.decode(x0)  # stays on the mesh
                if c.log.sync_phase_times:
                    jax.block_until_ready(images)
            if pending is not None:  # chunk k is dispatched: now read back chunk k-1's rewards
                batches.append(_score_chunk(task, pending, timer))
            pending = dict(local_rows=rows, local_index=local_index, x0=x0, cond=cond, index=gidx,
                           images=images, g_inputs=g_inputs, inputs=inputs, grid=grid and k == 0)
        if pending is not None:
            batches.append(_score_chunk(task, pending, timer))
    return batches


def _score_chunk(task, p, timer, split: str = "train") -> dict[str, Any]:
    """Reward of one rollout call on the global batch (every process the same program); per-sample results come
    back to every host once. ``rewards``/``valid``/``per_reward`` are this host's share (grid captions pair
    with ``local_rows``); the ``*_all`` entries are the global batch for the advantages."""
    with timer("reward"):
        rows = distributed.gather(p["local_rows"])
        index = distributed.gather(p["local_index"])
        total, per_reward, valid = task.reward(rows, p["g_inputs"], p["images"], index, split)
    host = distributed.host_slice(len(rows))
    images = distributed.to_local(p["images"]) if p["grid"] else None  # host copy for the grid only
    return dict(local_rows=p["local_rows"], x0=p["x0"], cond=p["cond"], index=p["index"], images=images,
                inputs=p["inputs"], rows_all=rows, rewards_all=np.asarray(total), valid_all=np.asarray(valid),
                per_reward_all={k: np.asarray(v) for k, v in per_reward.items()},
                rewards=np.asarray(total)[host], valid=np.asarray(valid)[host],
                per_reward={k: np.asarray(v)[host] for k, v in per_reward.items()})


def advantages(c, batches, sampler):
    """Group advantages over the whole epoch; every host computes the same from the same global arrays (the
    rewards were gathered once per rollout call in ``_score_chunk``)."""
    rows = np.concatenate([b["rows_all"] for b in batches])
    rewards = np.concatenate([b["rewards_all"] for b in batches])
    valid = np.concatenate([b["valid_all"] for b in batches])
    adv = adv_lib.compute_advantages(rewards, rows, global_std=bool(c.train.global_std),
                                     adv_clip_max=float(c.train.adv_clip_max), adv_mode=str(c.train.adv_mode),
                                     valid=valid)
    filt = adv_lib.filter_groups(rows, adv.group_mean, adv.group_std, std_thres=float(c.filter.std_thres),
                                 mean_thres=float(c.filter.mean_thres), rule=str(c.filter.rule),
                                 enabled=bool(c.filter.enabled), valid=valid)
    sampler.ban(filt.ban_ids)
    metrics = {"reward_mean": float(np.mean(rewards[valid])) if valid.any() else float("nan"),
               "reward_std": float(np.std(rewards[valid])) if valid.any() else float("nan"),
               **adv_lib.reward_stats(rewards, rows, valid), "banned_rows": len(sampler.banned),
               "filtered_groups": filt.filtered_groups, "masked_fraction": float(1 - np.mean(filt.mask)),
               "invalid_rewards": int((~valid).sum())}
    for name in batches[0]["per_reward_all"]:
        values = np.concatenate([b["per_reward_all"][name] for b in batches])
        metrics[f"reward/{name}"] = float(np.nanmean(values))
        metrics[f"reward/{name}_std"] = float(np.nanstd(values))
    return adv, filt, metrics


def update(c, task, mesh, tx, hp, state, batches, adv, filt, sizes):
    """The NFT optimizer step(s) of the epoch, then the old-policy soft update (spec B.6, B.8)."""
    cat = lambda key: jax.tree.map(lambda *xs: jnp.concatenate(xs), *[b[key] for b in batches])  # noqa: E731
    x0, cond, index = cat("x0"), cat("cond"), cat("index")
    per_step = sizes["samples_per_step"]
    step_metrics = []
    for s in range(c.train.steps_per_epoch):
        sl = slice(s * per_step, (s + 1) * per_step)
        host = distributed.host_slice(per_step)
        batch = dict(x0=x0[sl], cond=jax.tree.map(lambda a: a[sl], cond), index=index[sl],
                     r=distributed.to_global(mesh, np.asarray(adv.r[sl], np.float32)[host]),
                     mask=distributed.to_global(mesh, np.asarray(filt.mask[sl], np.float32)[host]),
                     sigmas=jnp.asarray(task.sigmas_train, jnp.float32))
        state, m = engine.train_step(task.policy, tx, hp, task.base, state, batch)
        step_metrics.append(jax.device_get(m))
    state = engine.sync_old_policy(state, int(c.train.decay_type))
    return state, {f"train/{k}": float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}


def export_lora(c, path, lora) -> None:
    """The EMA LoRA (the evaluation policy, spec B.7) in our flat layout, ready for
    ``python -m tools.convert_weights export-lora --src PATH --dst FILE`` and ``edit --lora PATH``.
    Every process takes part in the gather; process 0 writes, through epath (``path`` may be a bucket URL)."""
    flat = {k: np.asarray(jax.experimental.multihost_utils.process_allgather(v, tiled=True))
            for k, v in lora_lib.lora_to_flat(lora).items()}
    if jax.process_index() != 0:
        return
    path = epath.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    runpath.save_safetensors(path / "lora.safetensors", flat)
    (path / "config.json").write_text(json.dumps(
        {"lora": {"rank": int(c.lora.rank), "alpha": float(c.lora.alpha), "targets": list(c.lora.targets)}}))


def evaluate(c, task, state, epoch: int, writer) -> dict[str, float]:
    """EMA policy, eval.solver (Euler ODE) over eval.num_steps, fixed noise per held-out row.

    Every held-out row is scored exactly once (no padding by repetition, spec H.12), and the grid's captions,
    images and scores come from the same samples. Any number of rows runs on any device count: a batch whose
    size the batch shards (and processes) do not divide is padded with copies of its last row, whose samples
    are computed and dropped (masked) before anything is averaged.
    """
    rows = task.eval_rows(c.eval.num_samples)
    key = jax.random.key(c.seed + 2)
    shards = math.lcm(task.mesh.shape["data"] * task.mesh.shape["fsdp"], jax.process_count())
    rewards = []
    for start in range(0, len(rows), c.eval.batch_size):
        real = rows[start:start + c.eval.batch_size]
        size = math.ceil(len(real) / shards) * shards
        padded = np.concatenate([real, np.repeat(real[-1:], size - len(real))])
        is_real = np.arange(size) < len(real)
        local = distributed.host_slice(size)
        global_index = np.arange(start, start + size)  # a padded sample's index is never a real row's in-batch
        inputs = task.inputs(padded[local], split="test")
        g_inputs = distributed.to_global(task.mesh, inputs)
        cond = task.encode(g_inputs)
        gidx = distributed.to_global(task.mesh, global_index[local])
        x0 = engine.sample(task.policy, task.base, state["ema"], cond, key, gidx, task.sigmas_eval,
                           c.eval.solver, 0.0)
        images = task.decode(x0)
        r, _, valid = task.reward(padded, g_inputs, images, global_index, split="test")
        r = np.where(np.asarray(valid), np.asarray(r), np.nan)
        rewards.append(r[is_real])
        if start == 0 and c.log.image_every > 0 and epoch % c.log.image_every == 0:
            keep = is_real[local]
            n = min(c.log.num_images, int(keep.sum()))
            host_images = distributed.to_local(images)[keep]
            writer.image_grid("eval", epoch, task.source_images(inputs)[keep][:n], host_images[:n],
                              r[local][keep][:n], [task.caption(x, "test") for x in padded[local][keep][:n]])
    all_r = np.concatenate(rewards)
    if len(all_r) != len(rows):
        raise AssertionError(f"evaluation scored {len(all_r)} samples for {len(rows)} rows")
    metrics = {"eval/reward_mean": float(np.nanmean(all_r)), **task.eval_extra_metrics(all_r)}
    writer.write(int(state["step"]), metrics)
    log.info("eval at epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
    return metrics


_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "training config file (path[:variant])")


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    t0 = time.time()
    summary = run(_CONFIG.value)
    if jax.process_index() == 0:
        evals = {k: {m: round(v, 4) for m, v in d.items()} for k, d in summary["eval"].items()}
        print(f"done in {time.time() - t0:.0f} s; evaluation by epoch: {evals}")


if __name__ == "__main__":
    app.run(main)
