"""``TextEncoders``: tokenize + encode instructions with CLIP-L (pooled) and T5 (hidden states), as FLUX does.

Tokenization follows diffusers' FluxPipeline: both tokenizers pad to ``max_length`` and truncate (CLIP 77,
T5 128 here -- spec A.2); no attention mask is passed to either encoder (pads are attended by T5; CLIP is causal
and pooled at the EOS position). Outputs are float32 whatever the compute dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.models.text.params import load_clip, load_t5

log = logging.getLogger(__name__)

__all__ = ["TextEncoders", "load_tokenizer", "check_prompts"]

TOKENIZER_DIR = "tokenizer"


def load_tokenizer(component_dir: str | Path):
    """transformers AutoTokenizer from ``component_dir/tokenizer`` (or ``component_dir`` itself)."""
    from transformers import AutoTokenizer

    d = Path(component_dir)
    tdir = d / TOKENIZER_DIR if (d / TOKENIZER_DIR).is_dir() else d
    try:
        return AutoTokenizer.from_pretrained(str(tdir))
    except Exception as e:  # noqa: BLE001 - re-raised with the folder named
        raise FileNotFoundError(f"cannot load a tokenizer from {tdir}: {e}") from e


def check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("pass a list of instructions, not a single string")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"instruction {i} is {type(p).__name__}, not str")
        if not p.strip():
            raise ValueError(f"instruction {i} is empty")
        out.append(p)
    return out


def _jitted(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids):
        return nnx.merge(graphdef, state)(ids)

    return lambda ids: run(state, ids)


class TextEncoders:
    """``encode(prompts) -> (prompt_embeds [B, t5_length, d_t5], pooled [B, d_clip])`` as float32 numpy."""

    def __init__(self, clip_model, t5_model, clip_tokenizer, t5_tokenizer, clip_length: int = 77,
                 t5_length: int = 128):
        self.clip, self.t5 = clip_model, t5_model
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.clip_length, self.t5_length = clip_length, t5_length
        self._clip_fn = _jitted(clip_model)
        self._t5_fn = _jitted(t5_model)

    @classmethod
    def from_dirs(cls, clip_dir, t5_dir, clip_length: int = 77, t5_length: int = 128, dtype=jnp.float32):
        return cls(load_clip(clip_dir, dtype=dtype), load_t5(t5_dir, dtype=dtype), load_tokenizer(clip_dir),
                   load_tokenizer(t5_dir), clip_length, t5_length)

    @classmethod
    def from_pretrained(cls, model_dir, **kw):
        """From a converted Kontext directory (``text_encoder/``, ``text_encoder_2/``)."""
        d = Path(model_dir)
        return cls.from_dirs(d / "text_encoder", d / "text_encoder_2", **kw)

    @staticmethod
    def _warn_truncated(tokenizer, prompts, length: int, name: str) -> None:
        full = tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
        for i, ids in enumerate(full):
            if len(ids) > length:
                log.warning("%s: instruction %d has %d tokens, truncated to %d: %r", name, i, len(ids), length,
                            prompts[i][:80])

    def tokenize_clip(self, prompts: Sequence[str]) -> np.ndarray:
        self._warn_truncated(self.clip_tokenizer, prompts, self.clip_length, "CLIP")
        out = self.clip_tokenizer(list(prompts), padding="max_length", max_length=self.clip_length,
                                  truncation=True, return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)

    def tokenize_t5(self, prompts: Sequence[str]) -> np.ndarray:
        self._warn_truncated(self.t5_tokenizer, prompts, self.t5_length, "T5")
        out = self.t5_tokenizer(list(prompts), padding="max_length", max_length=self.t5_length, truncation=True,
                                return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)

    def encode_ids(self, clip_ids, t5_ids):
        _, pooled = self._clip_fn(jnp.asarray(clip_ids))
        embeds = self._t5_fn(jnp.asarray(t5_ids))
        return np.asarray(embeds, np.float32), np.asarray(pooled, np.float32)

    def encode(self, prompts: Sequence[str], batch_size: int = 16):
        prompts = check_prompts(prompts)
        embeds, pooled = [], []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            e, p = self.encode_ids(self.tokenize_clip(chunk), self.tokenize_t5(chunk))
            embeds.append(e)
            pooled.append(p)
        return np.concatenate(embeds), np.concatenate(pooled)
