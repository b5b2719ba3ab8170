"""Qwen2.5-VL (vision tower + Qwen2 language model) in Flax NNX: the MLLM judge of the Edit-R1 reward."""
