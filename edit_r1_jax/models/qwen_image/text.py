"""Qwen-Image-Edit-2509 prompt embeddings: what diffusers 0.42.1's ``QwenImageEditPlusPipeline`` hands its
transformer as ``prompt_embeds`` / ``prompt_embeds_mask``, computed with our Flax Qwen2.5-VL.

Per row (source image, instruction), as ``__call__`` and ``_get_qwen_prompt_embeds`` of the pipeline do:

1. the source image is resized (PIL Lanczos, the pipeline's ``VaeImageProcessor.resize``) to the condition size
   ``calculate_dimensions(384 * 384, width / height)``: an area of about 384^2, sides multiples of 32;
2. the text ``PROMPT_TEMPLATE.format("Picture 1: <|vision_start|><|image_pad|><|vision_end|>" + instruction)``
   is tokenised with the pipeline's processor tokenizer, ``<|image_pad|>`` expanded to the image's token
   count, and the image preprocessed as the processor's (PIL) image processor does (``processor.preprocess_host``);
3. Qwen2.5-VL runs once; the last layer's hidden states (after the final norm) are kept, the first
   ``DROP_TOKENS`` (64: the system prompt and ``<|im_start|>user\\n``) dropped, and the rest (image tokens,
   instruction, ``<|im_end|>\\n<|im_start|>assistant\\n``) zero-padded to ``max_length`` with a mask.

Differences from the pipeline, on purpose:
* 3-D M-RoPE positions for the image tokens (the released model's); under transformers 5.24 the pipeline calls
  its text encoder without ``mm_token_type_ids`` and so gets 1-D positions (see ENVIRONMENT.md).
* a fixed length: the edit pipeline pads to the longest row of its (size-1) batch and never truncates; here rows
  are padded to ``max_length`` and longer rows keep their first ``max_length`` tokens, as ``QwenImagePipeline.
  encode_prompt`` slices ``[:, :max_sequence_length]`` (logged). The model is causal, so the kept tokens are
  exactly the pipeline's first ``max_length`` ones; the tokens past them are not even run.
* batched (right padding; a row's result does not depend on its neighbours) and validated per row.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from edit_r1_jax import weights
from edit_r1_jax.models.qwen2_5_vl import params as qparams
from edit_r1_jax.models.qwen2_5_vl.model import get_rope_index
from edit_r1_jax.models.qwen2_5_vl.processor import ImageProcessorConfig, PromptBuilder, preprocess_host
from edit_r1_jax.parallel import distributed, rules

log = logging.getLogger(__name__)

# QwenImageEditPlusPipeline's constants (diffusers 0.42.1); tests/test_qwen_image_text.py checks them against it.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
DROP_TOKENS = 64  # prompt_template_encode_start_idx
IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
CONDITION_IMAGE_AREA = 384 * 384
_VERSION = "qwen-image-edit-plus-prompt/1"  # bump when the computation changes (cache keys)


def condition_size(height: int, width: int, area: int = CONDITION_IMAGE_AREA) -> tuple[int, int]:
    """(height, width) of the condition image the VLM sees: diffusers' ``calculate_dimensions(area, w / h)``
    (sides rounded to multiples of 32 with Python's round, as there)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(h / 32) * 32, round(w / 32) * 32


def _tokenizer_dir(model_dir: Path) -> Path:
    # The pipeline tokenises with processor.tokenizer; the converter copies processor/ and tokenizer/ as they are.
    for name in ("processor", "tokenizer", "text_encoder"):
        d = model_dir / name
        if (d / "tokenizer.json").exists() or (d / "vocab.json").exists():
            return d
    raise FileNotFoundError(f"{model_dir}: no tokenizer files (tokenizer.json or vocab.json) in processor/, "
                            "tokenizer/ or text_encoder/: is it a folder converted by `qwen-image-edit`?")


def _preprocessor_file(model_dir: Path) -> Path:
    for name in ("processor", "text_encoder"):
        f = model_dir / name / "preprocessor_config.json"
        if f.exists():
            return f
    raise FileNotFoundError(f"{model_dir}: no preprocessor_config.json in processor/ or text_encoder/ (the image "
                            "processor's sizes and normalisation are read from it)")


class QwenImagePromptEncoder:
    """``encoder(images, prompts) -> {"text": float32 [B, max_length, D], "mask": int32 [B, max_length]}``.

    ``images``: uint8 HxWx3 source images (any size, one per prompt); ``prompts``: the instructions. Rows run
    in micro-batches of ``batch_size`` (the last one repeats its last row so every call has the same shapes).
    """

    def __init__(self, model, tokenizer, image_cfg: ImageProcessorConfig, *, max_length: int = 256,
                 batch_size: int = 8, mesh=None, fingerprint: str = ""):
        if int(max_length) < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.image_cfg = model, tokenizer, image_cfg
        self.max_length, self.batch_size, self.mesh = int(max_length), int(batch_size), mesh
        self._fingerprint = fingerprint
        cfg = model.config
        self.prompts = PromptBuilder(tokenizer)
        if self.prompts.image_token_id != cfg.image_token_id:
            raise ValueError(f"tokenizer <|image_pad|> id {self.prompts.image_token_id} != text encoder "
                             f"image_token_id {cfg.image_token_id}")
        prefix = len(tokenizer.encode(PROMPT_TEMPLATE.split("{}")[0], add_special_tokens=False))
        if prefix != DROP_TOKENS:  # the pipeline drops 64 tokens blindly; say so when they are not the prefix
            log.warning("the prompt template's system prefix is %d tokens with this tokenizer, the pipeline drops "
                        "%d: the embeddings keep/lose template tokens exactly as the pipeline's do", prefix,
                        DROP_TOKENS)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        self.graphdef, self.state = nnx.split(model)
        self.dim = cfg.text_config.hidden_size

    @classmethod
    def from_pretrained(cls, model_dir, *, max_length: int = 256, dtype=jnp.float32, mesh=None,
                        batch_size: int = 8, model=None) -> "QwenImagePromptEncoder":
        """From a folder converted by ``python -m tools.convert_weights qwen-image-edit`` (its ``text_encoder/``,
        the processor's tokenizer and ``preprocessor_config.json``). ``mesh``: put the weights on it by their
        logical axes; else the default device. ``model``: an already loaded Qwen2.5-VL of this folder's
        ``text_encoder/`` (the reward's, when it is the same checkpoint) used instead of a second copy; its own
        dtype then applies."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        te = model_dir / "text_encoder"
        for f in (te / "config.json", te / weights.PARAMS_FILE):
            if not f.exists():
                raise FileNotFoundError(f"{f} not found: is {model_dir} a folder converted by `qwen-image-edit` "
                                        "(without --skip-text)?")
        tok_dir, pre = _tokenizer_dir(model_dir), _preprocessor_file(model_dir)
        # Our converted folders hold a non-transformers config.json that transformers 5 would take for a
        # (pre-5.0) Mistral tokenizer and "fix" its regex; Qwen's pre-tokenizer is loaded as written.
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), fix_mistral_regex=False)
        image_cfg = ImageProcessorConfig.from_dir(pre.parent)
        if model is not None:
            dtype = model.config.dtype
        fp = _fingerprint(te, tok_dir, pre, max_length, dtype)
        if model is None:
            model = qparams.load_model(te, dtype=dtype, mesh=mesh)
        log.info("Qwen-Image prompt encoder: %s (tokenizer %s, max_length %d, %s)", te, tok_dir, max_length,
                 jnp.dtype(dtype).name)
        return cls(model, tokenizer, image_cfg, max_length=max_length, batch_size=batch_size, mesh=mesh,
                   fingerprint=fp)

    def fingerprint(self) -> str:
        """Content identity (cache key): text encoder config + params digest, tokenizer and processor files,
        max_length, dtype and this module's computation version. Never file times."""
        if not self._fingerprint:
            raise ValueError("this encoder was built from a model object, not a converted folder: no fingerprint")
        return self._fingerprint

    # ------------------------------------------------------------------------------------------------------
    def prepare(self, image, prompt: str, row: int = 0) -> tuple[list[int], tuple[int, int, int]]:
        """Validate one row and build its token ids -> (ids, image grid (1, gh, gw)); no pixels yet (they are
        made per micro-batch, so memory stays bounded). ValueError names ``row``."""
        from edit_r1_jax.models.qwen2_5_vl.processor import grid_for

        if not isinstance(prompt, str):
            raise ValueError(f"row {row}: prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"row {row}: empty prompt")
        shape, dtype = np.shape(image), getattr(image, "dtype", None)
        if dtype != np.uint8 or len(shape) != 3 or shape[-1] != 3:
            raise ValueError(f"row {row}: image must be a uint8 HxWx3 array, got {dtype} {tuple(shape)}")
        h, w = shape[:2]
        if h == 0 or w == 0:
            raise ValueError(f"row {row}: image is empty ({h}x{w})")
        ch, cw = condition_size(h, w)
        if ch < 1 or cw < 1:
            raise ValueError(f"row {row}: image {h}x{w} is too narrow: its {CONDITION_IMAGE_AREA}-pixel condition "
                             f"image would be {ch}x{cw} (the pipeline's resize fails too)")
        try:
            grid = grid_for(ch, cw, self.image_cfg)
            ids = self.prompts.expand(PROMPT_TEMPLATE.format(IMAGE_PROMPT.format(1) + prompt), [grid],
                                      self.image_cfg.merge_size)
        except ValueError as e:
            raise ValueError(f"row {row}: {e}") from e
        return ids, grid

    def condition_pixels(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """uint8 HxWx3 source image -> (patches [P, C*T*p*p] float32, grid): the pipeline's Lanczos resize to the
        condition size, then the processor's image preprocessing."""
        from PIL import Image

        a = np.asarray(image)
        ch, cw = condition_size(*a.shape[:2])
        cond = np.asarray(Image.fromarray(a).resize((cw, ch), resample=Image.LANCZOS))
        return preprocess_host(cond, self.image_cfg)

    def __call__(self, images: Sequence[np.ndarray], prompts: Sequence[str], *,
                 batch_size: int | None = None) -> dict[str, np.ndarray]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a sequence of str, got one str")
        n = len(prompts)
        if len(images) != n:
            raise ValueError(f"{len(images)} images for {n} prompts")
        out_text = np.zeros((n, self.max_length, self.dim), np.float32)
        out_mask = np.zeros((n, self.max_length), np.int32)
        if n == 0:
            return {"text": out_text, "mask": out_mask}
        rows = [self.prepare(images[i], prompts[i], i) for i in range(n)]  # every row checked before any work
        keep_max = DROP_TOKENS + self.max_length
        long = [i for i, (ids, _) in enumerate(rows) if len(ids) > keep_max]
        if long:
            log.warning("%d of %d prompts are longer than max_length %d after the %d dropped template tokens "
                        "(rows %s...): their first %d tokens are kept", len(long), n, self.max_length, DROP_TOKENS,
                        long[:8], self.max_length)
        mb = min(n, int(batch_size or self.batch_size))
        shards = self._batch_shards()
        mb = math.ceil(mb / shards) * shards
        starts = range(0, n, mb)
        if len(starts) > 1:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="qwen-image prompt embeddings", unit="batch", total=len(starts))
        for start in starts:
            take = np.minimum(np.arange(start, start + mb), n - 1)
            text, lengths = self._encode(take, rows, images)
            real = take[:min(mb, n - start)]
            t = text[:len(real)]
            out_text[real, :t.shape[1]] = t
            out_mask[real] = (np.arange(self.max_length)[None] < lengths[:len(real), None]).astype(np.int32)
        return {"text": out_text, "mask": out_mask}

    # ------------------------------------------------------------------------------------------------------
    def _batch_shards(self) -> int:
        if self.mesh is None:
            return 1
        return int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp") if a in self.mesh.shape]))

    def _encode(self, take: np.ndarray, rows, images) -> tuple[np.ndarray, np.ndarray]:
        """One micro-batch (row indices ``take``) -> (hidden [mb, max_length, D] numpy, kept lengths [mb])."""
        cfg = self.model.config
        merge = cfg.vision_config.spatial_merge_size
        keep_max = DROP_TOKENS + self.max_length
        keep = np.asarray([min(len(rows[i][0]), keep_max) for i in take])
        if keep.min() <= DROP_TOKENS:
            bad = int(take[int(np.argmin(keep))])
            raise ValueError(f"row {bad}: prompt of {keep.min()} tokens is not longer than the {DROP_TOKENS} "
                             "dropped template tokens")
        # One padded length (and image-token count) for every call: one text program per micro-batch size.
        Lp = keep_max
        mb = len(take)
        ids = np.full((mb, Lp), self.pad_id, np.int32)
        mask = np.zeros((mb, Lp), np.int32)
        pos = np.zeros((3, mb, Lp), np.int32)
        # Vision inputs grouped by grid (one program per grid); image tokens gathered in sequence order.
        groups: dict[tuple, list[int]] = {}
        for r, i in enumerate(take):
            groups.setdefault(rows[i][1], []).append(r)
        offsets, base = {}, 0
        for g, members in groups.items():
            n_tok = g[0] * g[1] * g[2] // merge ** 2
            for j, r in enumerate(members):
                offsets[r] = base + j * n_tok
            base += len(members) * n_tok
        gather = []
        for r, i in enumerate(take):
            row_ids, grid = rows[i]
            full = np.asarray(row_ids, np.int32)[None]
            # positions of the whole row (an image run cut by truncation keeps its 3-D positions)
            p = get_rope_index(full, None, [grid], image_token_id=cfg.image_token_id, spatial_merge_size=merge)
            k = keep[r]
            ids[r, :k], mask[r, :k], pos[:, r, :k] = full[0, :k], 1, p[:, 0, :k]
            n_img = int(np.sum(full[0, :k] == cfg.image_token_id))
            gather.extend(range(offsets[r], offsets[r] + n_img))
        # kept image tokens of a row <= its kept tokens after the drop <= max_length
        gather = np.asarray(gather + [0] * (mb * self.max_length - len(gather)), np.int32)
        vision, pixels = [], {}
        for g, members in groups.items():
            for r in members:
                if take[r] not in pixels:  # a repeated padding row is preprocessed once
                    pv, got = self.condition_pixels(images[take[r]])
                    if tuple(got) != tuple(g):
                        raise RuntimeError(f"row {take[r]}: internal: grid {got} != planned {g}")
                    pixels[take[r]] = pv
            patches = np.stack([pixels[take[r]] for r in members])
            vision.append(self._call(_vision_fn, (self.graphdef, g), self._put(patches, replicated=True)))
        emb = _gather_fn(tuple(vision), self._put(gather, replicated=True))
        hidden = self._call(_text_fn, (self.graphdef, DROP_TOKENS), emb, self._put(ids), self._put(mask),
                            self._put(pos, axis=1))
        return distributed.gather_global(hidden), keep - DROP_TOKENS

    def _put(self, a: np.ndarray, *, replicated: bool = False, axis: int = 0):
        """Host array (the same on every process) -> an array on the mesh: batch-sharded along ``axis`` or
        replicated; unchanged without a mesh."""
        if self.mesh is None:
            return a
        if replicated:
            spec = PartitionSpec()
        else:
            axes = [None] * a.ndim
            axes[axis] = "batch"
            spec = rules.partition_spec(tuple(axes), a.shape, self.mesh)
        return jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, spec), lambda i: a[i])

    def _call(self, fn, static, *args):
        if self.mesh is None:
            return fn(*static, self.state, *args)
        with jax.set_mesh(self.mesh):
            return fn(*static, self.state, *args)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _vision_fn(graphdef, grid, state, patches):
    """[n, P, C] patches of one grid -> [n * tokens, D] language-space image tokens."""
    model = nnx.merge(graphdef, state)
    out = model.encode_images(patches, grid)
    return out.reshape(-1, out.shape[-1])


@jax.jit
def _gather_fn(vision, gather):
    """The image tokens of every grid group -> [len(gather), D] in sequence order (a small program per grid mix,
    so that the text program's shapes never depend on the images)."""
    emb = vision[0] if len(vision) == 1 else jnp.concatenate(vision, axis=0)
    return jnp.take(emb, gather, axis=0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _text_fn(graphdef, drop, state, image_embeds, ids, mask, pos):
    """Last-layer hidden states of the kept tokens, the first ``drop`` removed, padding zeroed (as the pipeline
    pads with zeros), float32."""
    model = nnx.merge(graphdef, state)
    h = model.hidden_states(ids, mask, pos, image_embeds)[:, drop:]
    return jnp.where(mask[:, drop:, None] > 0, h, 0).astype(jnp.float32)


def prompt_encoder_fingerprint(model_dir, max_length: int = 256, dtype="float32") -> str:
    """``QwenImagePromptEncoder.from_pretrained(model_dir, ...).fingerprint()`` without loading the model."""
    model_dir = Path(model_dir)
    return _fingerprint(model_dir / "text_encoder", _tokenizer_dir(model_dir), _preprocessor_file(model_dir),
                        max_length, jnp.dtype(dtype))


def _fingerprint(te_dir: Path, tok_dir: Path, preprocessor: Path, max_length: int, dtype) -> str:
    from edit_r1_jax.embed_text import weights_digest

    h = hashlib.sha256()
    h.update(f"{_VERSION};max_length={int(max_length)};dtype={jnp.dtype(dtype).name};drop={DROP_TOKENS};"
             f"area={CONDITION_IMAGE_AREA};".encode())
    h.update(PROMPT_TEMPLATE.encode() + IMAGE_PROMPT.encode())
    h.update((te_dir / "config.json").read_bytes())
    h.update(weights_digest(te_dir / weights.PARAMS_FILE))
    files = sorted(f for f in tok_dir.iterdir() if f.is_file()
                   and f.name not in ("config.json", weights.PARAMS_FILE))
    if preprocessor.parent != tok_dir:
        files.append(preprocessor)
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()
