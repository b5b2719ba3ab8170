"""The paper's Qwen-Image-Edit-2509 run (UniWorld-V2; spec G, Qwen column): MLLM reward, DiffusionNFT, filter on.

48 devices assumed (3 images per device per rollout, as the reference's 48 GPUs): 24 groups x 12 images per epoch
in 2 sampling batches of 12 groups, one optimizer step over 2 micro-batches (x 5 timesteps), 6-step dpm2 rollouts,
15-step Euler evaluation (1 image per device), LoRA r32 / alpha 64 on the 8 attention projections of every block,
prompt embeddings padded to 256 tokens, no guidance. On another device count scale ``sample.rollout_batch_size``,
``train.micro_batch_size`` and ``eval.batch_size`` (``python -m edit_r1_jax.plan`` prints a fitting set).
Set ``--config.model.dir`` (a folder from ``python -m tools.convert_weights qwen-image-edit``),
``--config.reward.mllm_dir`` and ``--config.data.root``.
"""

from configs import base


def get_config(variant: str = ""):
    if variant:
        raise ValueError(f"configs/qwen_image_edit_mllm.py: unknown variant {variant!r} (none defined)")
    c = base.get_config()
    c.task = "qwen_image_edit"
    c.run_dir = "runs/qwen_image_edit_mllm"
    c.text.max_length = 256
    c.sample.groups_per_batch = 12
    c.sample.num_batches_per_epoch = 2
    c.sample.rollout_batch_size = 144  # 3 per device x 48
    c.train.micro_batch_size = 144  # 2 micro-batches per optimizer step
    c.filter.enabled = True  # ban_prompt is on in the Qwen run
    c.eval.batch_size = 48  # 1 per device (the reference halves its test batch above 32 GPUs)
    c.eval.num_samples = 48
    return c
