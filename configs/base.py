"""Defaults shared by every run: the Edit-R1 FLUX.1-Kontext recipe (spec section G).

Batch sizes are global (over all devices and hosts), unlike the reference's per-GPU numbers: the paper run
(24 GPUs x 3) is ``group_size=12, groups_per_batch=6`` (72 images per sampling batch), 4 sampling batches per
epoch (288 images, 24 groups), one optimizer step per epoch over micro-batches of 72.
"""

from ml_collections import ConfigDict

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def get_config(variant: str = "") -> ConfigDict:
    c = ConfigDict()
    # a model family of edit_r1_jax.editors ("kontext": FLUX.1-Kontext, "qwen_image_edit": Qwen-Image-Edit-2509)
    # or "toy" (pixel-space shapes task)
    c.task = "kontext"
    c.seed = 42
    c.run_dir = "runs/kontext"
    c.num_epochs = 100000
    c.resume = True  # continue from the latest checkpoint in run_dir/checkpoints if there is one
    # Compiled XLA programs kept across starts (a restart or preemption skips the recompile): "" = jax's
    # JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/edit_r1_jax/xla; a folder or bucket URL; "none" = off
    c.compile_cache_dir = ""
    # XLA:CPU's large per-call buffers (edit_r1_jax/host_memory.py): "keep" = glibc keeps freed memory for reuse and
    # calls run on the calling thread, so no call faults in fresh pages; "system" = glibc and jax as they are;
    # "auto" = keep where jax runs on the CPU only (the toy and the CPU benchmarks got faster), else system
    c.host_malloc = "auto"

    # allow_replicated_fallback: a mesh the device topology cannot lay out, or a parameter dim its mesh axes do
    # not divide, raises at start-up; True falls back (device order as listed / replicated) with a warning.
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, allow_replicated_fallback=False))
    c.distributed = ConfigDict(dict(coordinator="", num_processes=0, process_id=-1))  # empty: from env / auto

    c.model = ConfigDict()
    c.model.dir = ""  # converted folder of c.task's family (tools.convert_weights kontext / qwen-image-edit)
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "bfloat16"  # frozen base weights; LoRA stays float32
    c.model.remat_policy = "dots_with_no_batch_dims_saveable"
    c.model.attention_impl = ""  # "" = cudnn on GPU, xla elsewhere (logged)
    c.model.dit = ConfigDict()  # FluxConfig overrides (toy sizes)

    c.lora = ConfigDict(dict(rank=32, alpha=64.0, targets=LORA_TARGETS, init_std=0.0))  # 0 -> 1/rank

    # allow_outside_root: image paths may leave data.root (../, absolute); on_duplicate: "error" or "warn" for
    # repeated (prompt, image) rows
    c.data = ConfigDict(dict(root="", resolution=512, text_cache=True, allow_outside_root=False,
                             on_duplicate="error"))
    # Kontext: T5 / CLIP token lengths; Qwen-Image-Edit: prompt-embedding tokens after the template (spec G: 256)
    c.text = ConfigDict(dict(t5_length=128, clip_length=77, max_length=256))

    c.sample = ConfigDict()
    c.sample.num_steps = 6
    c.sample.solver = "dpm2"
    c.sample.eta = 0.0  # noise_level 0.7 of the reference is unused with deterministic dpm2
    c.sample.guidance = 2.5
    c.sample.group_size = 12  # K: rollouts per source row
    c.sample.groups_per_batch = 6  # M: distinct rows per sampling batch
    c.sample.num_batches_per_epoch = 4
    c.sample.rollout_batch_size = 72  # images per jitted rollout call (global)

    c.train = ConfigDict()
    c.train.micro_batch_size = 72  # global; accumulation runs inside one jit over micro-batches x timesteps
    c.train.steps_per_epoch = 1
    c.train.timestep_fraction = 0.99  # T_train = int(num_steps * fraction) grid points per sample
    c.train.timestep_sampling = "grid"  # "grid" (reference) or "uniform"
    c.train.nft_beta = 1.0
    c.train.kl_weight = 1e-4
    c.train.adv_clip_max = 5.0
    c.train.adv_mode = "all"
    c.train.global_std = True
    c.train.learning_rate = 3e-4
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.weight_decay = 1e-4
    c.train.max_grad_norm = 1.0
    c.train.decay_type = 1  # old-policy soft update (spec B.8); the EMA policy (spec B.7) is always kept
    c.train.max_empty_epochs = 3  # this many epochs in a row without one valid sample stop the run

    c.filter = ConfigDict()
    c.filter.enabled = False  # the reference's ban_prompt
    c.filter.rule = "paper"  # "paper": drop groups that are low-variance AND high-mean; "reference": see docs
    c.filter.std_thres = 0.05
    c.filter.mean_thres = 0.9

    c.reward = ConfigDict()
    c.reward.weights = ConfigDict({"mllm": 1.0})
    c.reward.mllm_dir = ""  # converted Qwen2.5-VL (python -m tools.convert_weights qwen2.5-vl ...)
    c.reward.jpeg_roundtrip = False
    c.reward.on_error = "raise"  # or "mask": drop the sample from the loss and count it
    c.reward.batch_size = 24
    # The MLLM reward's prompt: a file path or the template text itself ({prompt}, optional {requirement}: str.format
    # fields). Empty = the built-in text, which is the reference implementation's paraphrase of the paper's reward
    # prompt, NOT the paper's official wording; name a file with the official wording for comparable rewards.
    c.reward.prompt_template = ""

    c.eval = ConfigDict(dict(every=10, num_steps=15, solver="flow", num_samples=72, batch_size=72))
    # restore_step: -1 = the latest step; N = that older step (e.g. when the latest is corrupt).
    # allow_config_change: resume although fields that change the state or the run's meaning differ.
    # use_ocdbt: see checkpoint.Checkpointer.
    c.checkpoint = ConfigDict(dict(every=30, max_to_keep=3, restore_step=-1, allow_config_change=False,
                                   use_ocdbt=True))
    # sync_phase_times: block after each phase so time/rollout, time/decode are device times (costs the overlap
    # of host and device work; off by default, when they are dispatch times and the wait lands in time/reward)
    c.log = ConfigDict(dict(image_every=10, num_images=8, tensorboard=True, progress=True, sync_phase_times=False))
    c.warmup = ConfigDict(dict(steps=0, learning_rate=1e-3, batch_size=32))  # supervised start (toy only)
    return c
