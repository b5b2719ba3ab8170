"""The paper's FLUX.1-Kontext run (spec G): MLLM reward, DiffusionNFT, 6-step dpm2 rollouts at 512^2.

Variants: ``configs/kontext_mllm.py`` (filter off, as ``kontext_mllm_reward``) and
``configs/kontext_mllm.py:ban_prompt`` (low-variance group filter on, as ``kontext_mllm_reward_ban_prompt``).
Set ``--config.model.dir``, ``--config.reward.mllm_dir`` and ``--config.data.root``.
"""

from configs import base


def get_config(variant: str = ""):
    c = base.get_config()
    c.run_dir = "runs/kontext_mllm" + (f"_{variant}" if variant else "")
    if variant == "ban_prompt":
        c.filter.enabled = True
    elif variant:
        raise ValueError(f"configs/kontext_mllm.py: unknown variant {variant!r}; known: ban_prompt")
    return c
