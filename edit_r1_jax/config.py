"""Config validation, once at start-up, with messages that name the field (no silent batch-size search)."""

from __future__ import annotations

import math

from ml_collections import ConfigDict

from edit_r1_jax import host_memory

SOLVERS = ("flow", "dance", "ddim", "dpm1", "dpm2")
ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")


class ConfigError(ValueError):
    pass


def derived(c: ConfigDict) -> dict[str, int]:
    """Sizes the loop needs, computed from the config: one place, one meaning."""
    per_batch = c.sample.group_size * c.sample.groups_per_batch
    per_epoch = per_batch * c.sample.num_batches_per_epoch
    per_step = per_epoch // c.train.steps_per_epoch
    return dict(
        samples_per_batch=per_batch,
        samples_per_epoch=per_epoch,
        samples_per_step=per_step,
        micro_batches_per_step=per_step // c.train.micro_batch_size,
        train_timesteps=int(c.sample.num_steps * c.train.timestep_fraction),
    )


def validate(c: ConfigDict, num_processes: int = 1, data_parallel: int = 1) -> dict[str, int]:
    """Check every constraint; raise one ConfigError listing all violations. Returns ``derived(c)``."""
    errors: list[str] = []

    def need(cond: bool, msg: str):
        if not cond:
            errors.append(msg)

    s, t = c.sample, c.train
    try:
        host_memory.check(c.get("host_malloc", "auto"), "host_malloc")
    except ValueError as e:
        errors.append(str(e))

    def number(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False):
        """A finite number within [lo, hi] (open ends where asked); the message names the field."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            errors.append(f"{name}={value!r} must be a number")
            return
        if not math.isfinite(v):
            errors.append(f"{name}={value} must be finite")
            return
        if lo is not None and (v <= lo if lo_open else v < lo):
            errors.append(f"{name}={value} must be {'>' if lo_open else '>='} {lo}")
        if hi is not None and (v >= hi if hi_open else v > hi):
            errors.append(f"{name}={value} must be {'<' if hi_open else '<='} {hi}")

    # Optimizer and loss hyper-parameters: a NaN or a negative learning rate would train (uphill, or into NaN)
    # and exit 0, so they are refused here, before anything is loaded.
    number("train.learning_rate", t.learning_rate, lo=0)  # 0 is the lr0 control run
    number("train.adam_b1", t.adam_b1, lo=0, hi=1, hi_open=True)
    number("train.adam_b2", t.adam_b2, lo=0, hi=1, hi_open=True)
    number("train.adam_eps", t.adam_eps, lo=0, lo_open=True)
    number("train.weight_decay", t.weight_decay, lo=0)
    number("train.max_grad_norm", t.max_grad_norm, lo=0, lo_open=True)
    number("train.kl_weight", t.kl_weight, lo=0)
    number("train.adv_clip_max", t.adv_clip_max, lo=0, lo_open=True)
    number("train.nft_beta", t.nft_beta)
    number("train.timestep_fraction", t.timestep_fraction)
    number("sample.eta", s.eta, lo=0)
    number("sample.guidance", s.guidance, lo=0)
    number("filter.std_thres", c.filter.std_thres, lo=0)
    number("filter.mean_thres", c.filter.mean_thres)
    number("warmup.learning_rate", c.warmup.learning_rate, lo=0)
    for name, w in dict(c.reward.weights).items():
        number(f"reward.weights.{name}", w)
    # Counts and intervals. Intervals of 0 would divide by zero after an epoch of work; max_to_keep=0 would log
    # "saved" and keep nothing. eval.every and log.image_every may be 0 (= off).
    for name, value, lo in (("num_epochs", c.num_epochs, 1), ("checkpoint.every", c.checkpoint.every, 1),
                            ("checkpoint.max_to_keep", c.checkpoint.max_to_keep, 1),
                            ("train.max_empty_epochs", t.max_empty_epochs, 1),
                            ("eval.every", c.eval.every, 0), ("eval.num_steps", c.eval.num_steps, 1),
                            ("eval.num_samples", c.eval.num_samples, 1), ("eval.batch_size", c.eval.batch_size, 1),
                            ("log.image_every", c.log.image_every, 0), ("log.num_images", c.log.num_images, 0),
                            ("warmup.steps", c.warmup.steps, 0), ("warmup.batch_size", c.warmup.batch_size, 1),
                            ("checkpoint.restore_step", c.checkpoint.restore_step, -1)):
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(f"{name}={value!r} must be an integer")
        elif value < lo:
            errors.append(f"{name}={value} must be >= {lo}" + (" (-1 = the latest step)"
                                                               if name == "checkpoint.restore_step" else ""))
    need(c.data.on_duplicate in ("error", "warn"), f"data.on_duplicate={c.data.on_duplicate!r}: 'error' or 'warn'")
    from edit_r1_jax import editors

    tasks = ("toy",) + editors.names()
    need(c.task in tasks, f"task={c.task!r}: one of {', '.join(tasks)} (a model family of edit_r1_jax.editors)")
    for name in ("group_size", "groups_per_batch", "num_batches_per_epoch", "num_steps", "rollout_batch_size"):
        need(int(s[name]) >= 1, f"sample.{name}={s[name]} must be >= 1")
    for name in ("micro_batch_size", "steps_per_epoch"):
        need(int(t[name]) >= 1, f"train.{name}={t[name]} must be >= 1")
    need(s.solver in SOLVERS, f"sample.solver={s.solver!r}: one of {SOLVERS}")
    need(c.eval.solver in SOLVERS, f"eval.solver={c.eval.solver!r}: one of {SOLVERS}")
    need(not (s.solver.startswith("dpm") and s.eta != 0), f"sample.eta={s.eta}: dpm solvers are deterministic")
    need(t.adv_mode in ADV_MODES, f"train.adv_mode={t.adv_mode!r}: one of {ADV_MODES}")
    need(t.timestep_sampling in ("grid", "uniform"), f"train.timestep_sampling={t.timestep_sampling!r}")
    need(0 < t.timestep_fraction <= 1, f"train.timestep_fraction={t.timestep_fraction} must be in (0, 1]")
    need(t.decay_type in (0, 1, 2), f"train.decay_type={t.decay_type}: 0, 1 or 2")
    need(t.nft_beta > 0, f"train.nft_beta={t.nft_beta} must be > 0 (it divides the loss)")
    need(c.filter.rule in ("paper", "reference"), f"filter.rule={c.filter.rule!r}: 'paper' or 'reference'")
    need(c.reward.on_error in ("raise", "mask"), f"reward.on_error={c.reward.on_error!r}: 'raise' or 'mask'")
    need(len(c.reward.weights) > 0, "reward.weights is empty: name at least one reward")
    if c.reward.get("prompt_template"):  # a missing file or a template without {prompt} fails here, not after loading
        from edit_r1_jax.models.qwen2_5_vl.processor import resolve_template

        try:
            resolve_template(c.reward.prompt_template)
        except (FileNotFoundError, ValueError) as e:
            errors.append(f"reward.prompt_template={c.reward.prompt_template!r}: {e}")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))

    d = derived(c)
    per_batch, per_epoch = d["samples_per_batch"], d["samples_per_epoch"]
    need(int(s.num_steps * t.timestep_fraction) >= 1,
         f"train.timestep_fraction={t.timestep_fraction} x sample.num_steps={s.num_steps} leaves no timestep")
    need(per_batch % s.rollout_batch_size == 0,
         f"sample.group_size*sample.groups_per_batch={per_batch} must be divisible by "
         f"sample.rollout_batch_size={s.rollout_batch_size}")
    need(per_epoch % t.steps_per_epoch == 0,
         f"samples per epoch {per_epoch} (group_size*groups_per_batch*num_batches_per_epoch) must be divisible "
         f"by train.steps_per_epoch={t.steps_per_epoch}")
    need(d["samples_per_step"] % t.micro_batch_size == 0,
         f"samples per optimizer step {d['samples_per_step']} must be divisible by "
         f"train.micro_batch_size={t.micro_batch_size}")
    for name, value in (("sample.rollout_batch_size", s.rollout_batch_size),
                        ("train.micro_batch_size", t.micro_batch_size)):
        need(value % data_parallel == 0,
             f"{name}={value} must be divisible by the data-parallel device count {data_parallel} "
             f"(mesh data x fsdp)")
    need(s.rollout_batch_size % num_processes == 0,
         f"sample.rollout_batch_size={s.rollout_batch_size} must be divisible by the process count {num_processes}")
    # eval.num_samples and eval.batch_size are free: evaluate() pads a batch to the batch shards with masked rows
    need(int(c.eval.batch_size) >= 1, f"eval.batch_size={c.eval.batch_size} must be >= 1")
    if c.task != "toy":
        need(bool(c.model.dir), f"model.dir is empty: point it at a converted {c.task} directory")
        need(bool(c.data.root), "data.root is empty: point it at a dataset folder (spec F)")
        if "mllm" in c.reward.weights:
            need(bool(c.reward.mllm_dir), "reward.mllm_dir is empty but reward.weights names 'mllm'")
        need(c.data.resolution % 16 == 0, f"data.resolution={c.data.resolution} must be a multiple of 16")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return d
