"""python -m edit_r1_jax.train --config configs/NAME.py[:variant] [--config.field=value ...] [--dry-run]

The Edit-R1 loop (spec E), one epoch at a time:
  group sampler -> condition -> rollout with theta_old -> decode -> reward -> advantages + filter
  -> NFT optimizer step(s) (EMA inside) -> theta_old soft update -> metrics, grids, checkpoint.
Without --config it runs the tiny CPU toy task (configs/toy.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from edit_r1_jax import checkpoint as ckpt_lib
from edit_r1_jax import compile_cache, host_memory
from edit_r1_jax import config as config_lib
from edit_r1_jax import editors, engine, runpath, tasks, weights
from edit_r1_jax import metrics as metrics_lib
from edit_r1_jax.data.groups import GroupSampler
from edit_r1_jax.data.prefetch import Prefetcher
from edit_r1_jax.models import lora as lora_lib
from edit_r1_jax.nft import advantages as adv_lib
from edit_r1_jax.nft import loss as nft_loss
from edit_r1_jax.parallel import distributed
from edit_r1_jax.parallel import mesh as mesh_lib
from edit_r1_jax.rewards import registry as reward_registry

log = logging.getLogger("edit_r1_jax.train")

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "toy.py")

# Measured wall time per unit of work, for the start-up estimate: (task, backend) -> seconds. The toy's figures come
# from configs/toy.py on the build machine (2 idle x86_64 cores; README "Quick start"); other pairs are unmeasured.
# setup: start-up and the first epoch's compilation; warm_step: one warm-start step of 32 rows; rollout: sampling +
# reward of one rollout; train: one rollout at one trained timestep (the theta, theta_old and reference forwards
# and the backward); eval: one evaluation (its compilation shared out).
MEASURED = {("toy", "cpu"): dict(setup=39.0, warm_step=0.13, rollout=0.0047, train=0.0038, eval=1.5,
                                 where="2 idle AMD EPYC cores, 2026-12-04")}


def expected_seconds(c, epochs: int, measured: dict, warm: bool) -> float:
    """The start-up estimate: setup, warm start (if it runs), ``epochs`` epochs and their evaluations."""
    sizes = config_lib.derived(c)
    epoch = sizes["samples_per_epoch"] * (measured["rollout"] + sizes["train_timesteps"] * measured["train"])
    evals = (epochs // c.eval.every + 1) if c.eval.every > 0 else 0
    warm_s = warm * c.warmup.steps * measured["warm_step"] * c.warmup.batch_size / 32
    return measured["setup"] + warm_s + epochs * epoch + evals * measured["eval"]


def nft_config(c, num_micro_batches: int) -> nft_loss.NFTConfig:
    t = c.train
    return nft_loss.NFTConfig(
        nft_beta=float(t.nft_beta), kl_weight=float(t.kl_weight), adv_clip_max=float(t.adv_clip_max),
        timestep_mode=str(t.timestep_sampling), timestep_fraction=float(t.timestep_fraction),
        num_micro_batches=int(num_micro_batches))


def run(c, max_epochs: int | None = None) -> dict[str, Any]:
    """Train per config ``c``; returns {"eval": {epochs done: metrics}, "last": metrics, "state": state, ...}
    (``format_summary`` reads the rest). A run whose checkpoints already hold ``num_epochs`` returns
    {"finished_before": message, ...} without writing anything."""
    t_start = time.perf_counter()
    host_memory.configure(c.host_malloc)  # before jax's backend starts
    compile_cache.use(c.compile_cache_dir)
    distributed.initialize(c.distributed.coordinator, c.distributed.num_processes, c.distributed.process_id)
    mesh = mesh_lib.make_mesh(dict(c.mesh))
    sizes = config_lib.validate(c, jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"])
    run_dir = epath.Path(c.run_dir)  # local folder or bucket URL alike (gs://...): never a local Path
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", c.checkpoint.max_to_keep,
                                 use_ocdbt=bool(c.checkpoint.use_ocdbt))
    # checkpoints are named by epochs done; an explicit restore_step continues from that one
    restore = int(c.checkpoint.restore_step)
    done_before = (restore if restore >= 0 else ckpt.latest_step()) if c.resume else None
    done_before = done_before or 0
    summary: dict[str, Any] = {"eval": {}, "run_dir": str(run_dir), "num_epochs": int(c.num_epochs)}
    if done_before >= c.num_epochs:  # before any writer exists: a finished run writes nothing
        ckpt.close()
        summary["finished_before"] = (f"{run_dir} is already finished ({done_before}/{c.num_epochs} epochs, "
                                      f"checkpoint {ckpt_lib.step_dir(ckpt, done_before)}): nothing to do. Delete "
                                      f"it or pass --config.run_dir=... to start over, --config.num_epochs=N to "
                                      f"train on.")
        return summary
    log.info("%s", plan_line(c, mesh, done_before))
    writer = metrics_lib.MetricWriter(run_dir, tensorboard=c.log.tensorboard)
    timer = metrics_lib.Timer()
    totals: dict[str, float] = {}  # seconds per phase over the whole run, for the final table

    with jax.set_mesh(mesh):
        with timer("setup"):
            task = tasks.build(c, mesh, run_dir, writer)
        tx = engine.make_optimizer(c)
        state = engine.init_state(task.init_lora(), tx, jax.random.key(c.seed))
        sampler = GroupSampler(task.num_train_rows, c.sample.groups_per_batch, c.sample.group_size,
                               c.sample.num_batches_per_epoch, c.seed, jax.process_index(), jax.process_count())
        start_epoch, empty_epochs = 0, 0
        identity = run_identity(c, task.num_train_rows)
        if c.resume and ckpt.latest_step() is not None:
            state, host = resume(c, ckpt, state, identity)
            sampler.set_state(host["sampler"])
            start_epoch = host["epoch"] + 1
            empty_epochs = int(host.get("empty_epochs", 0))
            log.info("resumed: %d epochs done (optimizer step %d)", start_epoch, int(state["step"]))
        elif int(c.checkpoint.restore_step) >= 0:
            raise ckpt_lib.CheckpointError(
                f"checkpoint.restore_step={c.checkpoint.restore_step} but "
                + ("resume=False" if not c.resume else f"{ckpt.directory} holds no checkpoint"))

        hp = nft_config(c, sizes["micro_batches_per_step"])
        end_epoch = c.num_epochs if max_epochs is None else min(c.num_epochs, start_epoch + max_epochs)
        # smoothing=0: the ETA is the mean rate since the clock was last set, and the clock is set again after
        # the first epoch of this process, so compilation does not inflate it.
        bar = tqdm(desc="epochs", unit="epoch", initial=start_epoch, total=end_epoch, smoothing=0,
                   disable=not c.log.progress or jax.process_index() != 0)
        for epoch in range(start_epoch, end_epoch):
            done = epoch + 1  # the one counter (epochs done): metrics step, grids, checkpoints, LoRA exports
            if c.eval.every > 0 and epoch % c.eval.every == 0:
                with timer("eval"):
                    summary["eval"][epoch] = evaluate(c, task, state, epoch, writer)
            with timer("epoch"):
                try:
                    batches = rollouts(c, task, mesh, sampler, state, epoch, sizes, timer)
                except reward_registry.RewardError as e:  # re-raised with the epoch (the task names the row)
                    raise reward_registry.RewardError(f"epoch {epoch}: {e}") from e
                with timer("advantages"):
                    adv, filt, epoch_metrics = advantages(c, batches, sampler)
                empty_epochs = empty_epochs + 1 if not np.any(filt.mask) else 0
                if empty_epochs:
                    train_metrics = empty_epoch(c, epoch, empty_epochs, epoch_metrics)
                else:
                    with timer("train"):
                        state, train_metrics = update(c, task, mesh, tx, hp, state, batches, adv, filt, sizes,
                                                      epoch)
            epoch_metrics.update(train_metrics, optimizer_step=int(state["step"]), **timer.pop())
            epoch_metrics["images_per_s"] = sizes["samples_per_epoch"] / epoch_metrics["time/epoch"]
            _accumulate(totals, epoch_metrics)
            writer.write(done, epoch_metrics)
            if c.log.image_every > 0 and done % c.log.image_every == 0:
                b = batches[0]
                n = min(c.log.num_images, len(b["rewards"]))
                writer.image_grid("train", done, task.source_images(b["inputs"])[:n], b["images"][:n],
                                  b["rewards"][:n], [task.caption(r) for r in b["local_rows"][:n]])
            bar.set_postfix(reward=f"{epoch_metrics['reward_mean']:.3f}",
                            loss=f"{epoch_metrics.get('train/total_loss', float('nan')):.4f}", refresh=False)
            summary["last"] = epoch_metrics
            if done % c.checkpoint.every == 0 or done == end_epoch:
                with timer("checkpoint"):
                    ckpt.save(done, state, {"epoch": epoch, "sampler": sampler.get_state(),
                                            "empty_epochs": empty_epochs, **identity})
                    export_lora(c, run_dir / "lora" / counter_name(done), state["ema"])
                summary["checkpoint"] = str(ckpt_lib.step_dir(ckpt, done))
                summary["lora"] = str(run_dir / "lora" / counter_name(done))
            bar.update(1)
            if epoch == start_epoch:
                bar.initial, bar.start_t = bar.n, time.time()
        bar.close()
        if c.eval.every > 0 and end_epoch > start_epoch and end_epoch == c.num_epochs:
            with timer("eval"):
                summary["eval"][end_epoch] = evaluate(c, task, state, end_epoch, writer)
        _accumulate(totals, timer.pop())
        ckpt.close()
        writer.close()
    summary.update(state=state, epochs=(start_epoch, end_epoch), times=totals,
                   wall_s=time.perf_counter() - t_start)
    return summary


def run_identity(c, num_train_rows: int) -> dict[str, Any]:
    """What is stored with every checkpoint to recognise the run: the resolved config and the dataset."""
    dataset: dict[str, Any] = {"num_train_rows": int(num_train_rows)}
    if c.task != "toy":
        meta = Path(c.data.root) / "train_metadata.jsonl"
        dataset["train_metadata_sha256"] = hashlib.sha256(meta.read_bytes()).hexdigest()
        dataset["root"] = str(Path(c.data.root).resolve())
        dataset["model_dir"] = str(Path(c.model.dir).resolve())
    return {"config": json.loads(json.dumps(c.to_dict(), default=str)), "dataset": dataset}


def resume(c, ckpt, state, identity):
    """Restore ``checkpoint.restore_step`` (-1: the latest), after checking the stored config against ``c``."""
    step = None if int(c.checkpoint.restore_step) < 0 else int(c.checkpoint.restore_step)
    restored, host = ckpt.read_host(step)  # the config is compared before any array is read
    check_resume_config(c, ckpt, restored, host, identity)
    state, host = ckpt.restore(ckpt_lib.abstract_like(state), restored)
    newer = [s for s in ckpt.all_steps() if s > restored]
    if newer:
        log.warning("restored step %d on request; the newer steps %s are replaced as the run reaches them",
                    restored, newer)
    return state, host


def check_resume_config(c, ckpt, restored: int, host: dict[str, Any], identity: dict[str, Any]) -> None:
    if "config" not in host:
        if not c.checkpoint.allow_config_change:
            raise ckpt_lib.CheckpointError(
                f"checkpoint step {restored} in {ckpt.directory} holds no config (written by an older version); "
                f"pass --config.checkpoint.allow_config_change=true to resume without the comparison")
        log.warning("resume: step %d holds no config; not compared (checkpoint.allow_config_change)", restored)
        return
    flat = ckpt_lib.flatten
    blocking, safe = ckpt_lib.config_changes({**flat(host["config"]), **flat(host.get("dataset", {}), "dataset.")},
                                             {**flat(identity["config"]), **flat(identity["dataset"], "dataset.")})
    for line in safe:
        log.info("resume: allowed config change %s", line)
    if blocking:
        listing = "\n  ".join(blocking)
        if not c.checkpoint.allow_config_change:
            raise ckpt_lib.CheckpointError(
                f"cannot resume from step {restored} in {ckpt.directory}: these fields change the training "
                f"state or the meaning of the run:\n  {listing}\nUse another run_dir, restore the old values, "
                f"or pass --config.checkpoint.allow_config_change=true to resume anyway.")
        log.warning("resume: checkpoint.allow_config_change=true, resuming despite:\n  %s", listing)


def empty_epoch(c, epoch: int, count: int, metrics: dict[str, Any]) -> dict[str, float]:
    """An epoch in which no sample can enter the loss: no optimizer step, a warning, and a stop after
    ``train.max_empty_epochs`` of them in a row."""
    reason = (f"{metrics['invalid_rewards']} invalid rewards, {metrics['filtered_groups']} groups filtered, "
              f"masked fraction {metrics['masked_fraction']:.2f}")
    if count >= int(c.train.max_empty_epochs):
        raise EmptyEpochsError(f"epoch {epoch}: {count} epochs in a row without a valid sample "
                               f"(train.max_empty_epochs={c.train.max_empty_epochs}); last one: {reason}. "
                               f"Check the rewards (reward.on_error='mask' masks failing samples) and the filter.")
    log.warning("epoch %d: no valid sample (%s); optimizer step skipped (%d/%d empty epochs in a row)",
                epoch, reason, count, c.train.max_empty_epochs)
    return {"train/skipped_empty_epoch": 1.0}


def counter_name(done: int) -> str:
    """The LoRA export's folder for the counter (epochs done), named as the checkpoints are: epoch_000120."""
    return ckpt_lib.step_name(done)


def _accumulate(totals: dict[str, float], metrics: dict[str, Any]) -> None:
    for k, v in metrics.items():
        if k.startswith("time/"):
            totals[k[len("time/"):]] = totals.get(k[len("time/"):], 0.0) + float(v)


def plan_line(c, mesh, done_before: int) -> str:
    """One line at start: task, model size, devices, epochs, and the expected time where one was measured."""
    from edit_r1_jax import plan as plan_lib

    if c.task == "toy":
        family, cfg = editors.get("kontext"), tasks.toy_flux_config(c)
    else:  # the converted checkpoint's own config: a tiny test model is counted as what it is
        family = editors.get(c.task)
        cfg = family.transformer_config(c.model.dir, lora=tasks.lora_config(c))
    base, lora = plan_lib.dit_leaves(cfg, family)
    n_base, n_lora = sum(leaf.size for leaf in base), sum(leaf.size for leaf in lora)
    backend = jax.default_backend()
    devices = f"{jax.device_count()} {backend} device{'s' if jax.device_count() > 1 else ''}"
    if jax.process_count() > 1:
        devices += f" on {jax.process_count()} hosts"
    epochs = c.num_epochs - done_before
    measured = MEASURED.get((c.task, backend))
    if measured is None:
        expected = f"no measured time for task {c.task} on {backend}"
    else:
        warm = c.task == "toy" and c.warmup.steps > 0 and not (epath.Path(c.run_dir) / "warm_base").exists()
        seconds = expected_seconds(c, epochs, measured, warm)
        minutes = f"{seconds / 60:.1f}" if seconds < 600 else f"{seconds / 60:.0f}"
        expected = f"expected ~{minutes} min (estimate, measured on {measured['where']})"
    resumed = f" (resuming after {done_before})" if done_before else ""
    return (f"plan: task {c.task}, DiT {_count(n_base)} params + LoRA {_count(n_lora)} trained, {devices}, "
            f"{epochs} epochs to {c.num_epochs}{resumed}; {expected}")


def _count(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


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
    grid = c.log.image_every > 0 and (epoch + 1) % c.log.image_every == 0  # named by epochs done
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


def update(c, task, mesh, tx, hp, state, batches, adv, filt, sizes, epoch: int = -1):
    """The NFT optimizer step(s) of the epoch, then the old-policy soft update (spec B.6, B.8).

    Each step is checked (loss, gradient norm, every LoRA leaf of theta): a non-finite value raises
    :class:`NonFiniteError` before the caller can save anything.
    """
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
        m = jax.device_get(m)
        check_finite(epoch, int(state["step"]), m, state["theta"])
        step_metrics.append(m)
    state = engine.sync_old_policy(state, int(c.train.decay_type))
    return state, {f"train/{k}": float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf; raised before anything is saved, so the last checkpoint stays good."""


class EmptyEpochsError(RuntimeError):
    """train.max_empty_epochs epochs in a row had no sample that could enter the loss."""


@jax.jit
def _finite_leaves(tree):
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def check_finite(epoch: int, step: int, metrics: dict[str, Any], theta) -> None:
    """Raise NonFiniteError naming epoch, optimizer step and the first non-finite quantity."""
    where = f"epoch {epoch}, optimizer step {step}"
    for name in ("loss", "grad_norm"):
        if name in metrics and not np.isfinite(metrics[name]):
            raise NonFiniteError(f"{where}: {name} is {float(metrics[name])}; stopped before saving (the last "
                                 f"checkpoint is untouched). Check train.learning_rate, train.max_grad_norm and "
                                 f"the rewards.")
    finite = jax.device_get(_finite_leaves(theta))
    for path, ok in jax.tree_util.tree_flatten_with_path(finite)[0]:
        if not ok:
            names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
            leaf = ".".join(n for n in names if n != "value")  # nnx.Variable's own attribute, not a module
            raise NonFiniteError(f"{where}: LoRA parameter {leaf} of theta is not finite after the update; "
                                 f"stopped before saving (the last checkpoint is untouched). Check "
                                 f"train.learning_rate and train.max_grad_norm.")


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
    writer.write(epoch, metrics)  # the run's one counter: epochs done
    log.info("eval at epoch %d: %s", epoch, {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def dry_run(c) -> dict[str, Any]:
    """Validate config, dataset, model folders and the checkpoint's config without loading any weights; return
    (and print) the run's sizes. What ``--dry-run`` does."""
    from edit_r1_jax import folders
    from edit_r1_jax.data import source as data_source

    mesh = mesh_lib.make_mesh(dict(c.mesh))
    sizes = config_lib.validate(c, jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"])
    report: dict[str, Any] = {"task": c.task, "mesh": dict(mesh.shape), **sizes}
    if c.task == "toy":
        report.update(train_rows=int(c.toy.num_train_rows), test_rows=int(c.toy.num_test_rows),
                      model=dict(c.model.dit))
    else:
        family = editors.get(c.task)
        family.check_dir(c.model.dir, "model.dir", text_encoders=not c.data.text_cache)
        found = editors.detect(c.model.dir, "model.dir")
        if found is not family:
            raise folders.FolderError(f"model.dir {c.model.dir} holds a {found.name} model but task={c.task!r}")
        dit = weights.read_config(Path(c.model.dir) / "transformer")
        report["model"] = {k: dit.get(k) for k in ("num_layers", "num_single_layers", "num_attention_heads",
                                                   "attention_head_dim") if k in dit}
        for split in ("train", "test"):
            rows = data_source.read_metadata(c.data.root, split, allow_outside_root=bool(c.data.allow_outside_root),
                                             on_duplicate=str(c.data.on_duplicate))
            report[f"{split}_rows"] = len(rows)
            if c.data.text_cache:
                from edit_r1_jax.embed_text import TextCache

                # exists and matches the encoders and the config's text settings; reads no rows
                TextCache(c.data.root, split, c.model.dir, family=family, text_cfg=c.text)
        if "mllm" in c.reward.weights:
            folders.check_qwen_dir(c.reward.mllm_dir, "reward.mllm_dir")
    report["epochs"] = int(c.num_epochs)
    report["optimizer_steps"] = int(c.num_epochs) * int(c.train.steps_per_epoch)
    report["images_sampled"] = int(c.num_epochs) * sizes["samples_per_epoch"]
    ckpt_dir = epath.Path(c.run_dir) / "checkpoints"
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, c.checkpoint.max_to_keep) if ckpt_dir.is_dir() else None
    steps = ckpt.all_steps() if ckpt is not None else []
    report["checkpoint_steps"] = steps
    if c.resume and steps:
        step = None if int(c.checkpoint.restore_step) < 0 else int(c.checkpoint.restore_step)
        restored, host = ckpt.read_host(step)
        check_resume_config(c, ckpt, restored, host, run_identity(c, report["train_rows"]))
        report["resume_from_step"] = restored
    if ckpt is not None:
        ckpt.close()
    for k, v in report.items():
        print(f"  {k}: {v}")
    print("dry run OK: config, dataset and model folders are valid; no weights were loaded")
    return report


def help_text(argv: list[str]) -> str:
    """``train --help``: the override syntax and the selected config's top-level fields with their values."""
    import importlib.util
    import textwrap

    path = DEFAULT_CONFIG
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    file, _, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location("_help_config", file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(variant)
    lines = [f"usage: python -m edit_r1_jax.train [--config configs/NAME.py[:variant]] [--config.FIELD=VALUE ...] "
             f"[--dry-run]", "", (__doc__ or "").strip().split("\n", 1)[1].strip(), "",
             "options:",
             "  --config PATH[:VARIANT]  training config file (default configs/toy.py)",
             "  --config.FIELD=VALUE     override one field, dotted, e.g. --config.train.learning_rate=1e-4",
             "                           --config.checkpoint.restore_step=3 --config.data.root=/data/edits",
             "  --dry-run                validate config, dataset and model folders without loading weights, "
             "print the sizes",
             "  --helpfull               every absl flag", "",
             f"fields of {path} (top level; groups show their fields = values):"]
    for key, value in c.items():
        if hasattr(value, "items"):
            body = ", ".join(f"{k}={(v.to_dict() if hasattr(v, 'to_dict') else v)!r}" for k, v in value.items())
            lines += textwrap.wrap(f"{key}: {body}", 116, initial_indent="  ", subsequent_indent="      ")
        else:
            lines.append(f"  {key} = {value!r}")
    return "\n".join(lines)


def print_help_if_asked(argv: list[str]) -> None:
    """absl's own --help prints flags only and exits 1; this one exits 0 with the config's fields."""
    if any(a in ("--help", "-h", "--help=true") for a in argv[1:]):
        print(help_text(argv[1:]))
        sys.exit(0)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: held-out metrics first/last evaluation, time per phase, where the files are."""
    if "finished_before" in summary:
        return summary["finished_before"]
    run_dir = epath.Path(summary["run_dir"])
    first, last = summary["epochs"]
    lines = [f"trained epochs {first} -> {last} of {summary['num_epochs']} in {summary['wall_s'] / 60:.1f} min"]
    evals = summary["eval"]
    if evals:
        cols = sorted(evals)[:: max(1, len(evals) - 1)]  # first and last evaluation
        names = sorted({k for e in cols for k in evals[e]})
        lines.append(f"  {'held-out (EMA policy)':26s}" + "".join(f"{f'epoch {e}':>12s}" for e in cols))
        for name in names:
            pct = "success" in name
            cells = [evals[e].get(name, float("nan")) for e in cols]
            lines.append(f"  {name.removeprefix('eval/'):26s}" + "".join(
                f"{v * 100:11.1f}%" if pct else f"{v:12.4f}" for v in cells))
    times = summary["times"]
    order = [k for k in ("setup", "eval", "data", "rollout", "reward", "advantages", "train", "checkpoint")
             if k in times]
    lines.append("  time: " + ", ".join(f"{k} {times[k]:.0f} s" for k in order))
    lines.append(f"  metrics      {run_dir / 'metrics.jsonl'}  (tensorboard --logdir {run_dir / 'tensorboard'})")
    lines.append(f"  grids        {run_dir / 'samples'}/eval_NNNNNN.png, train_NNNNNN.png (NNNNNN = epochs done)")
    if "checkpoint" in summary:
        lines.append(f"  checkpoint   {summary['checkpoint']}")
        lines.append(f"  LoRA (EMA)   {summary['lora']}  (to PEFT: python -m tools.convert_weights export-lora "
                     f"--src {summary['lora']} --dst lora.safetensors)")
    return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "training config file (path[:variant])")
_DRY_RUN = flags.DEFINE_bool("dry-run", False, "validate the config, dataset and model folders without loading "
                                               "weights, print the run's sizes, and exit")
_LOG_LEVEL = flags.DEFINE_enum("log_level", os.environ.get("EDIT_R1_LOG_LEVEL", "INFO").upper(),
                               ["DEBUG", "INFO", "WARNING", "ERROR"],
                               "log level (default: $EDIT_R1_LOG_LEVEL or INFO); DEBUG also shows jax's and "
                               "orbax's own INFO lines")


def main(argv):
    del argv
    level = getattr(logging, _LOG_LEVEL.value)
    # force: replace absl's handler with a plain stream handler, which tqdm's redirection recognises
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)
    if level > logging.DEBUG:  # jax's backend probing ("Unable to initialize backend 'tpu'") and orbax's per-file
        for name in ("jax", "absl"):  # INFO lines read like errors on a CPU machine: debug only
            logging.getLogger(name).setLevel(logging.WARNING)
    if _DRY_RUN.value:
        dry_run(_CONFIG.value)
        return
    with logging_redirect_tqdm():  # log lines above the progress bar, not inside it
        summary = run(_CONFIG.value)
    if jax.process_index() == 0:
        print(format_summary(summary), file=sys.stdout, flush=True)


if __name__ == "__main__":
    print_help_if_asked(sys.argv)
    app.run(main)
