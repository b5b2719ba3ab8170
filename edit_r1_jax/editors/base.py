"""The model-family protocol (``Family``, ``Conditioner``) and what every family shares: the VAE's encode/decode
of packed latents, its loading onto a mesh, the LoRA config.

Shapes: images NHWC in [-1, 1]; a VAE latent ``[B, H/f, W/f, C]`` (normalised by the family's VAE), packed 2x2
into tokens ``[B, (H/2f)(W/2f), 4C]`` (``diffusion.latents.pack``). The conditioning ``cond`` of one batch is a dict:
``"ref"`` (packed reference latents) plus the family's text entries (``Conditioner.names``).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.diffusion import latents

__all__ = ["Family", "Conditioner", "encode_reference", "decode_latents", "replicated_shardings", "PlanBlocks",
           "PlanActivations"]


class Conditioner:
    """Text (and, for a VLM encoder, image) conditioning of one family.

    ``names``: the ``cond`` entries it makes, e.g. ("text", "pooled"); ``uses_image``: whether an embedding depends
    on the source image (then a cache is keyed by instruction *and* image); ``fingerprint()``: content identity of
    the encoder and its settings (the cache's validity); ``__call__(prompts, images)`` -> {name: np.ndarray [B, ...]}
    with ``images`` uint8 ``[B, H, W, 3]`` (ignored where ``uses_image`` is False)."""

    names: tuple[str, ...] = ()
    uses_image: bool = False

    def fingerprint(self) -> str:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What the cache index records next to the fingerprint (lengths, dtype)."""
        return {}

    def __call__(self, prompts: Sequence[str], images=None) -> dict[str, np.ndarray]:
        raise NotImplementedError


class Family:
    """One model family. Subclasses set the class attributes and implement the methods that raise here."""

    name: str = ""
    convert_hint: str = ""  # the converter command that makes a folder of this family
    cond_names: tuple[str, ...] = ()  # text entries of ``cond`` besides "ref"
    conditioner_uses_image: bool = False  # the embeddings depend on the source image (cache keyed by it too)

    # -- folders
    def detect(self, model_dir: Path) -> bool:
        """Whether ``model_dir`` is a converted folder of this family (from what its converter wrote)."""
        raise NotImplementedError

    def check_dir(self, model_dir, what: str = "--model", *, text_encoders: bool = True) -> Path:
        """Raise ``folders.FolderError`` naming what is missing; ``text_encoders=False``: DiT and VAE only."""
        raise NotImplementedError

    # -- transformer
    def transformer_config(self, model_dir, **overrides):
        raise NotImplementedError

    def load_transformer(self, model_dir, *, mesh=None, seed: int = 0, **overrides):
        """``(config, graphdef, base_state, lora_state)`` with the base read onto ``mesh`` by its logical axes."""
        raise NotImplementedError

    def abstract_transformer(self, cfg):
        """The transformer for ``cfg`` under ``nnx.eval_shape`` (no allocation): the planner's view."""
        raise NotImplementedError

    @staticmethod
    def velocity(model, z, sigma, cond: Mapping[str, Any], img_ids, txt_ids, guidance):
        """v(z, sigma | cond) of the generated tokens ``[B, N, C]`` (engine.Policy.call)."""
        raise NotImplementedError

    # -- VAE
    def vae_config(self, model_dir, **overrides):
        raise NotImplementedError

    def abstract_vae(self, cfg):
        raise NotImplementedError

    def _load_vae(self, model_dir, dtype, shardings):
        raise NotImplementedError

    def latent_channels(self, vae_cfg) -> int:
        raise NotImplementedError

    def load_vae(self, model_dir, *, dtype=jnp.float32, mesh=None):
        """The VAE, replicated on ``mesh`` (each process filling its own devices from the file: a device_put of
        arrays committed to one device would be a cross-host transfer), or on the default device."""
        d = Path(model_dir) / "vae"
        shardings = None
        if mesh is not None:
            shardings = replicated_shardings(self.abstract_vae(self.vae_config(model_dir)), mesh)
        return self._load_vae(d, jnp.dtype(dtype), shardings)

    # -- geometry, schedule
    def grid(self, vae_cfg, resolution: int) -> tuple[int, int]:
        """Packed-token grid ``(h, w)`` of a square ``resolution`` image."""
        m = vae_cfg.scale_factor * 2
        if resolution % m:
            raise ValueError(f"resolution {resolution} is not a multiple of {m} (VAE factor x patch 2)")
        return resolution // m, resolution // m

    def position_ids(self, grid: tuple[int, int], text_length: int, cfg=None) -> tuple[np.ndarray, np.ndarray]:
        """``(img_ids [N + Nr, 3], txt_ids [T, 3])`` for a generated image and its reference on ``grid``
        (``cfg``: the transformer config, where the layout depends on it)."""
        raise NotImplementedError

    def text_length(self, text_cfg) -> int:
        """Text tokens of ``cond["text"]`` from the ``text`` config section (or an object with its fields)."""
        raise NotImplementedError

    def scheduler_config(self, model_dir) -> dict:
        raise NotImplementedError

    def sigmas(self, scheduler_config: Mapping, num_steps: int, image_tokens: int) -> np.ndarray:
        raise NotImplementedError

    def guidance(self, cfg, value: float | None) -> float | None:
        """The guidance-embedding value the transformer takes (None: the model has none)."""
        return None

    # -- conditioning
    def conditioner(self, model_dir, text_cfg, *, dtype=jnp.float32, mesh=None, shared=None) -> Conditioner:
        """The text conditioning, loaded (``shared``: an already loaded model the family may reuse)."""
        raise NotImplementedError

    def conditioner_fingerprint(self, model_dir, text_cfg, compute_dtype: str = "float32") -> str:
        """``conditioner(...).fingerprint()`` without loading the encoder (the cache check at start-up)."""
        raise NotImplementedError

    # -- the policy the loop samples and trains
    def policy(self, graphdef, cfg, vae_cfg, resolution: int, text_length: int, guidance: float | None = None):
        """The static DiT call for a square ``resolution`` and ``text_length`` tokens of ``cond["text"]``."""
        from edit_r1_jax import engine

        h, w = self.grid(vae_cfg, resolution)
        img_ids, txt_ids = self.position_ids((h, w), int(text_length), cfg)
        return engine.Policy(graphdef, type(self).velocity, img_ids, txt_ids, self.guidance(cfg, guidance),
                             (h * w, 4 * self.latent_channels(vae_cfg)))

    # -- planner: what edit_r1_jax/plan.py sizes, from a run config alone (no folder read, nothing allocated)
    plan_transformer_name: str = ""  # the plan's row labels and notes
    plan_vae_name: str = ""
    plan_text_encoder_name: str = ""
    # the reward model size ("7b") the text encoder is the same checkpoint as (one copy on the devices when
    # reward.mllm_dir is model.dir/text_encoder, see tasks._shared_encoder), or None
    plan_text_encoder_reward: str | None = None

    def plan_transformer_config(self, config):
        """The full-size transformer config of a run: the family's published sizes (its config dataclass
        defaults) with ``config.model.dit`` overrides, ``config.model.dtype`` / ``param_dtype`` and the LoRA of
        ``config.lora``."""
        raise NotImplementedError

    def plan_vae_config(self, dtype="float32"):
        """The full-size VAE config (its defaults = the published VAE) in ``dtype``; ``abstract_vae`` of it is
        what the plan counts."""
        raise NotImplementedError

    def plan_vae_top_width(self, vae_cfg) -> int:
        """Channels of the decoder's full-resolution level (the plan bounds a decode by 4 float32 tensors
        ``[R, R, width]`` per image)."""
        raise NotImplementedError

    def plan_text_encoders(self, dtype="bfloat16") -> tuple:
        """The text encoder(s) resident on the devices when ``data.text_cache`` is False, as abstract modules
        (``nnx.eval_shape``)."""
        raise NotImplementedError

    def plan_tokens(self, config) -> dict[str, int]:
        """Tokens per sample at ``config.data.resolution``: ``image`` (generated), ``reference`` (the source,
        same grid) and ``text`` (``cond["text"]`` length). Both families run [noisy; reference; text]."""
        h, w = self.grid(self.plan_vae_config(), int(config.data.resolution))
        return dict(image=h * w, reference=h * w, text=self.text_length(config.text))

    plan_sample_note: str = ""  # what one sample keeps between rollout and training, for the plan's row

    def plan_sample_bytes(self, tcfg, config) -> tuple[int, str]:
        """Bytes one sample keeps between rollout and training: x0 and reference latents (float32), the text
        embeddings (compute dtype) and the family's other ``cond`` entries (``plan_cond_extra_bytes``)."""
        tok = self.plan_tokens(config)
        cdt = jnp.dtype(config.model.dtype).itemsize
        n = (tok["image"] + tok["reference"]) * tcfg.in_channels * 4 + tok["text"] * tcfg.joint_attention_dim * cdt
        return n + self.plan_cond_extra_bytes(tcfg, tok), self.plan_sample_note

    def plan_cond_extra_bytes(self, tcfg, tokens: Mapping[str, int]) -> int:
        """Bytes per sample of the ``cond`` entries besides ``ref`` and ``text``."""
        raise NotImplementedError

    def plan_activations(self, tcfg) -> "PlanActivations":
        """The training-activation model of ``tcfg``'s transformer (per-token coefficients per block kind and
        remat policy, calibrated against ``jax.ad_checkpoint`` saved residuals; see plan.py)."""
        raise NotImplementedError


def config_field(cfg, name, default):
    """``cfg.name`` of a config section, a plain dict or None (then ``default``)."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def lora_config(c):
    """The ``lora`` config section as a ``LoRAConfig`` (init_std 0 = 1/rank)."""
    from edit_r1_jax.models.lora import LoRAConfig

    return LoRAConfig(rank=int(c.lora.rank), alpha=float(c.lora.alpha), targets=tuple(c.lora.targets),
                      init_std=None if not c.lora.init_std else float(c.lora.init_std))


def replicated_shardings(abstract_state, mesh):
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda _: replicated, abstract_state)


@functools.partial(jax.jit, static_argnums=0)
def encode_reference(vae_graph, vae_state, pixels):
    """``[B, H, W, 3]`` in [-1, 1] -> packed normalised reference latents ``[B, N, 4C]`` float32."""
    vae = nnx.merge(vae_graph, vae_state)
    return latents.pack(vae.encode_normalized(pixels.astype(jnp.float32)).astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def decode_latents(vae_graph, h_tokens: int, w_tokens: int, vae_state, tokens):
    """Packed normalised latents ``[B, h*w, 4C]`` -> images float32 in [0, 1] ``[B, 2fh, 2fw, 3]``."""
    vae = nnx.merge(vae_graph, vae_state)
    x = vae.decode_normalized(latents.unpack(tokens, 2 * h_tokens, 2 * w_tokens)).astype(jnp.float32)
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Planner data (edit_r1_jax/plan.py): per-family activation models.


@dataclasses.dataclass(frozen=True)
class PlanBlocks:
    """One set of identical (stacked) transformer blocks.

    ``saved[policy] = (e, h, r, attn)``: per token per block, ``e`` embed-width and ``h`` heads/mlp-width (split
    over the tensor axis) elements of the compute dtype, ``r`` elements per LoRA rank unit; ``attn``: "probs"
    (float32 logits + compute-dtype probabilities of the ``[H/t, L, L]`` attention matrix are saved with XLA
    attention), "scores" (float32 logits only) or None."""

    kind: str
    prefix: str  # parameter path of the stacked blocks ("transformer_blocks"): per layer "<prefix>.<i>.<rest>"
    count: int
    saved: Mapping[str, tuple[float, float, float, str | None]]


@dataclasses.dataclass(frozen=True)
class PlanActivations:
    """A transformer's activation model: width, heads, LoRA rank, its block sets, and what is saved outside
    the blocks: ``outside`` [L, D]-sized compute-dtype residuals per sample, ``outside_text`` [T, text width]
    ones (text input norm), ``outside_attn[policy]`` bytes per element of an ``[H/t, L, L]`` tensor per sample
    with XLA attention (a key mask broadcast over the attention matrix that the layer scan hoists out of its
    body), and ``once`` bytes independent of the batch (float32 copies of embedder weights)."""

    dim: int
    heads: int
    rank: int
    blocks: tuple[PlanBlocks, ...]
    outside: float
    outside_text: float = 0.0
    text_width: int = 0
    outside_attn: Mapping[str, float] = dataclasses.field(default_factory=dict)
    once: int = 0
