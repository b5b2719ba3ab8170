"""Benchmark evaluation (GEdit-Bench, ImgEdit-Bench Basic) with a local Qwen2.5-VL judge.

benchmarks.py  readers of the published on-disk layouts -> ``Row`` records (+ named problems)
prompts.py     judge prompt templates: the user's files (official wording) or built-in defaults (labelled)
parsing.py     judge answer -> scores, never inventing a number
judge.py       the Qwen2.5-VL judge (generation, and the digit-logit expected score)
aggregate.py   per-group / per-type / overall averages as each benchmark defines them
report.py      summary JSON, markdown tables, bar chart PNG, side-by-side comparison
The CLI is ``python -m edit_r1_jax.evaluate``.
"""
