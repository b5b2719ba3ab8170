"""edit_r1_jax: DiffusionNFT reinforcement fine-tuning of FLUX.1-Kontext with an MLLM reward, in JAX."""

__version__ = "0.1.0"
