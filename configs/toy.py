"""The tiny CPU demo (the trainer's default): coloured-shapes editing in pixel space with a verifier reward.

A 16x16 RGB image is 64 tokens of 12 features (2x2 patches) through the same FLUX DiT code, shrunk. The base
DiT is warm-started by supervised flow matching; DiffusionNFT then trains a LoRA with the programmatic verifier
as reward. Everything else (grouping, advantages, filter, NFT loss, policies, checkpoints) is the real path.
"""

from ml_collections import ConfigDict

from configs import base


VARIANTS = ("long", "lr0")


def get_config(variant: str = ""):
    """``variant``: "" (the quick demo), or a comma list of "long" (the 120-epoch run behind the README's toy
    table) and "lr0" (the same run with learning rate 0, the control)."""
    names = [v for v in variant.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            raise ValueError(f"configs/toy.py: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    c = base.get_config()
    c.task = "toy"
    c.run_dir = "runs/toy" + "".join(f"_{v}" for v in names)
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat_policy = "none"
    # 2 + 2 blocks: the stacked parameters run in a python loop, not under lax.scan. Scanning pays off in compile
    # time at depth (57 FLUX blocks); at depth 2 its stacked, zero-filled residuals only cost time on CPU: warm-start
    # step 0.39 -> 0.34 s here, whole demo 288-335 s -> 271-292 s (cold compile, 2 cores).
    c.model.dit = ConfigDict(dict(num_layers=2, num_single_layers=2, attention_head_dim=32,
                                  num_attention_heads=2, axes_dims_rope=(8, 12, 12), scan_layers=False))
    # A tiny random base needs more adapter capacity than attention alone: the MLPs are adapted too.
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = base.LORA_TARGETS + ("ff.net.0.proj", "ff.net.2", "proj_mlp", "proj_out")
    c.toy = ConfigDict(dict(seed=0, resolution=16, text_length=8, text_dim=32, num_train_rows=256,
                            num_test_rows=64, success_threshold=0.5))
    c.reward.weights = ConfigDict({"toy_edit": 1.0})
    c.sample.num_steps = 6
    # The quick demo fits in five minutes on 2 CPU cores: 300 warm-start steps and 20 epochs. "long" is the fuller
    # run behind the README's toy table (500 steps, 120 epochs).
    c.num_epochs = 20
    c.sample.group_size = 8
    c.sample.groups_per_batch = 8
    c.sample.num_batches_per_epoch = 1
    c.sample.rollout_batch_size = 64
    c.train.steps_per_epoch = 2  # more optimizer steps than the reference's one: the demo must move in minutes
    c.train.micro_batch_size = 32
    c.train.learning_rate = 1e-3
    c.eval = ConfigDict(dict(every=10, num_steps=15, solver="flow", num_samples=64, batch_size=64))
    c.checkpoint.every = 10
    c.log.image_every = 10
    c.log.tensorboard = True
    c.warmup = ConfigDict(dict(steps=300, learning_rate=3e-3, batch_size=32))
    if "long" in names:
        c.num_epochs = 120
        c.eval.every = c.checkpoint.every = c.log.image_every = 20
        c.warmup.steps = 500
    if "lr0" in names:  # the control: same run, learning rate 0; the reward must not rise
        c.train.learning_rate = 0.0
    return c
