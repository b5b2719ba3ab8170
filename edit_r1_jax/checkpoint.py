"""Orbax checkpoints of the whole training state.

Device state (theta, theta_old, EMA, optimizer, step, PRNG key) is one pytree saved with StandardSave: every
host writes its shards, restore places them back onto the shardings of the abstract target. Host state (epoch,
data-sampler state, ban set, config) is JSON. Resume restores both, so a stopped run continues exactly as one
that never stopped (spec H.11 lists what the reference loses).

Faults: a step that cannot be restored (truncated or empty files, partial writes) raises one
:class:`CheckpointError` naming the step, the file and the cause; an older step is restored only on request
(``restore(step=N)``, the trainer's ``--config.checkpoint.restore_step=N``), never silently. The resolved config
saved with each step is compared on resume by :func:`config_changes`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


# Checkpoints are numbered by epochs done and named like the LoRA exports and sample grids: epoch_000120.
STEP_PREFIX, STEP_DIGITS = "epoch", 6


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}_{step:0{STEP_DIGITS}d}"


def step_dir(ckpt: "Checkpointer", step: int) -> epath.Path:
    return ckpt.directory / step_name(step)


class CheckpointError(RuntimeError):
    """A checkpoint step cannot be restored, or does not belong to this run's config."""


class Checkpointer:
    """Every process constructs it and calls ``save``/``restore`` (orbax coordinates the hosts; each writes its
    own shards). ``directory``: a local path or any URL etils.epath and orbax reach (gs://bucket/run/...)."""

    def __init__(self, directory, max_to_keep: int | None = 3, use_ocdbt: bool = True):
        directory = epath.Path(directory)
        # A relative local path is made absolute (orbax needs it); a URL is used as given.
        self.directory = directory if "://" in os.fspath(directory) else directory.absolute()
        # use_ocdbt (config checkpoint.use_ocdbt): orbax's default one-database-per-process layout. The local GCS
        # emulator the tests use mishandles its conditional writes once a checkpoint holds a few dozen arrays
        # ("Malformed StorageGeneration"), so the bucket test runs with the plain per-array layout; restore
        # reads either.
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, step_prefix=STEP_PREFIX, step_format_fixed_length=STEP_DIGITS),
            item_handlers={"state": ocp.StandardCheckpointHandler(use_ocdbt=bool(use_ocdbt)),
                           "host": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, host: dict[str, Any]) -> None:
        if step in self.all_steps():  # a run continued from an older step (restore_step) reaches a newer one
            log.warning("checkpoint: replacing the existing step %d in %s", step, self.directory)
            self.manager.delete(step)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        host=ocp.args.JsonSave(host)), force=True)
        self.manager.wait_until_finished()
        log.info("checkpoint: saved step %d to %s", step, self.directory)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs with .sharding)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"checkpoint step {step} not found in {self.directory}; steps there: {steps}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - re-raised as one error naming step, file and cause
            raise self._restore_error(step, steps, e) from e
        log.info("checkpoint: restored step %d from %s", step, self.directory)
        return out.state, out.host

    def read_host(self, step: int | None = None) -> tuple[int, dict[str, Any]]:
        """``(step, host JSON)`` without touching the device state: enough to compare configs first."""
        step = self.latest_step() if step is None else step
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"checkpoint step {step} not found in {self.directory}; steps there: {steps}")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - re-raised as one error naming step, file and cause
            raise self._restore_error(step, steps, e) from e
        return step, out.host

    def _restore_error(self, step: int, steps: list[int], e: BaseException) -> CheckpointError:
        folder = step_dir(self, step)
        bad = diagnose_step(folder)
        # tensorstore names the database folder and then the file it failed on
        named = [f for f in re.findall(r'local file "([^"]+)"', str(e)) if not f.endswith("/")]
        if named and not bad:
            bad = [f"{named[0]}: unreadable"]
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        older = [s for s in steps if s < step]
        hint = (f"restore an older step with --config.checkpoint.restore_step=N (steps: {older}), or move "
                f"{folder} away" if older else f"no older step to restore; move {folder} away to start over")
        files = "; ".join(bad) if bad else f"no empty or unparsable file found under {folder}"
        return CheckpointError(f"checkpoint step {step} in {self.directory} cannot be restored: {files}. "
                               f"Cause: {type(e).__name__}: {cause}. Nothing was restored; {hint}.")

    def close(self) -> None:
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _files_under(folder):
    """Every file below ``folder`` (epath's rglob refuses ``**`` on buckets, so walk by iterdir)."""
    for p in folder.iterdir():
        if p.is_dir():
            yield from _files_under(p)
        else:
            yield p


def diagnose_step(step_dir) -> list[str]:
    """Files of an orbax step folder that are empty, or JSON metadata that does not parse (with the reason)."""
    problems = []
    for f in sorted(_files_under(epath.Path(step_dir))):
        rel = f.relative_to(step_dir).as_posix()
        if "ocdbt.process_" in rel:  # per-process scratch copies, merged into the top-level database on save
            continue
        if f.stat().length == 0:
            problems.append(f"{f}: empty file")
        elif f.name in ("_METADATA", "_CHECKPOINT_METADATA", "metadata", "_sharding") or \
                f.parent.name == "array_metadatas":
            try:
                json.loads(f.read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
                problems.append(f"{f}: truncated or malformed JSON ({e})")
    return problems


# Config fields that may differ between a checkpoint and the resuming run: they change neither the state's shape
# nor what the run computes (prefixes end with "."). Every other difference stops the resume. model.dir and
# data.root may be spelled differently: their resolved paths are compared as dataset.model_dir / dataset.root.
SAFE_TO_CHANGE = ("log.", "eval.", "checkpoint.", "num_epochs", "run_dir", "resume", "compile_cache_dir",
                  "host_malloc",
                  "distributed.", "mesh.", "model.dir", "data.root",
                  "model.attention_impl", "model.remat_policy", "model.dit.scan_layers", "train.micro_batch_size",
                  "train.max_empty_epochs", "sample.rollout_batch_size", "reward.batch_size", "reward.on_error",
                  "data.text_cache", "data.on_duplicate", "data.allow_outside_root")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of nested dicts, after a JSON round trip (tuples become lists, as in the checkpoint)."""
    tree = json.loads(json.dumps(tree, default=str))
    out = {}

    def walk(t, p):
        if isinstance(t, dict) and t:
            for k, v in t.items():
                walk(v, f"{p}{k}.")
        else:
            out[p[:-1]] = t

    walk(tree, prefix)
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(blocking, safe)``: "field: checkpoint X, now Y" for every differing field of two flat configs."""
    blocking, safe = [], []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a == b:
            continue
        line = f"{key}: checkpoint {a!r}, now {b!r}"
        is_safe = any(key == p or (p.endswith(".") and key.startswith(p)) for p in SAFE_TO_CHANGE)
        (safe if is_safe else blocking).append(line)
    return blocking, safe
