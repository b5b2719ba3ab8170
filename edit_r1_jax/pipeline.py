"""``Editor``: image editing with a converted model of any family of ``edit_r1_jax.editors`` (spec A.1-A.5).

Flow (= diffusers ``FluxKontextPipeline`` with ``_auto_resize=False``, ``max_area = resolution**2``, or
``QwenImageEditPlusPipeline`` at ``resolution**2`` for both the output and the VAE's reference, Euler ODE):

    pixels uint8 [B,R,R,3] -> [-1,1] -> VAE encode (mean) -> normalise -> pack -> reference tokens
    noise [B,L,4C] (packed ``randn`` of shape [B,R/f,R/f,C]) -> Euler over the family's sigmas with
        v = family velocity (DiT on [noisy; reference] tokens, text conditioning, position ids)
        z <- z + (sigma_next - sigma) * v         (float32 update, like FlowMatchEulerDiscreteScheduler)
    -> unpack -> denormalise -> VAE decode -> clamp(x/2 + 1/2, 0, 1) float32 [B,R,R,3]

The Euler steps are ``diffusion.rollout`` with the ``flow`` solver at eta 0 (the training rollouts' code): all
steps as one jitted ``lax.scan`` (``scan=True``), or one jitted step per Python iteration with a progress callback
(the CLI's bar). Both give the same numbers.

On a mesh (``from_pretrained(mesh=...)``, used by ``python -m edit_r1_jax.evaluate``): the DiT is read slice by slice
onto the mesh by its logical axes (the trainer's loader), the VAE replicated, and each batch (pixels, noise, text
conditioning) sharded over the batch mesh axes, padded to a multiple of their size with copies of the last row
whose outputs are dropped; every process must pass the same whole batch.

``KontextEditor`` is the same class (the name the Kontext-only version had).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax import editors
from edit_r1_jax.data.images import to_model_range
from edit_r1_jax.diffusion import latents as L
from edit_r1_jax.diffusion import rollout as rollout_lib
from edit_r1_jax.models import scan
from edit_r1_jax.models.lora import LoRAConfig, lora_from_flat

log = logging.getLogger(__name__)

__all__ = ["Editor", "KontextEditor", "load_lora_file"]


def _peft_to_ours(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT / diffusers LoRA keys (``[transformer.]X.lora_A[.default].weight`` [r, in]) -> ours (``X.lora_a`` [in, r])."""
    out = {}
    for k, v in flat.items():
        k2 = k[len("transformer."):] if k.startswith("transformer.") else k
        k2 = k2[len("base_model.model."):] if k2.startswith("base_model.model.") else k2
        for src, dst in ((".lora_A.default.weight", ".lora_a"), (".lora_B.default.weight", ".lora_b"),
                         (".lora_A.weight", ".lora_a"), (".lora_B.weight", ".lora_b")):
            if k2.endswith(src):
                out[k2[: -len(src)] + dst] = np.asarray(v).T
                break
        else:
            out[k2] = np.asarray(v)
    return out


def load_lora_file(path: str | Path) -> tuple[dict[str, np.ndarray], LoRAConfig]:
    """Read LoRA weights: our flat safetensors (``*.lora_a`` [in, r] / ``*.lora_b`` [r, out]), a PEFT adapter folder
    (``adapter_model.safetensors`` + ``adapter_config.json``), a diffusers/PEFT LoRA ``.safetensors``, or a folder
    holding one of those (e.g. a trainer checkpoint step folder).

    ``alpha`` comes from ``adapter_config.json`` (``lora_alpha``) or the file metadata (``lora_adapter_metadata``
    JSON as diffusers / ``models.flux.params.peft_metadata`` write it, or plain ``lora_alpha`` / ``alpha``);
    without either, ``alpha = rank`` (scale 1) and a warning is logged.
    """
    from safetensors import safe_open

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"LoRA file not found: {p}")
    adapter_cfg = {}
    if p.is_dir():
        if (p / "adapter_config.json").exists():
            adapter_cfg = json.loads((p / "adapter_config.json").read_text())
        elif (p / "config.json").exists():  # our trainer's LoRA checkpoint: lora.safetensors + config.json
            c = json.loads((p / "config.json").read_text())
            c = c["lora"] if isinstance(c.get("lora"), dict) else c
            if "alpha" in c:
                adapter_cfg = {"lora_alpha": c["alpha"]}
        cands = [p / "adapter_model.safetensors", p / "lora.safetensors"] + sorted(p.glob("*.safetensors"))
        found = next((c for c in cands if c.exists()), None)
        if found is None:
            raise FileNotFoundError(f"no LoRA .safetensors in {p}")
        p = found
    elif (p.parent / "adapter_config.json").exists():
        adapter_cfg = json.loads((p.parent / "adapter_config.json").read_text())
    with safe_open(str(p), framework="numpy") as f:
        meta = f.metadata() or {}
        flat = {k: f.get_tensor(k) for k in f.keys()}
    flat = _peft_to_ours(flat)
    a_keys = [k for k in flat if k.endswith(".lora_a")]
    if not a_keys:
        raise ValueError(f"{p} holds no LoRA tensors (expected *.lora_a / lora_A keys)")
    rank = int(flat[a_keys[0]].shape[1])
    if "lora_adapter_metadata" in meta:  # diffusers' save_lora_weights / our PEFT exporter
        packed = json.loads(meta["lora_adapter_metadata"])
        for k, v in packed.items():
            adapter_cfg.setdefault(k.split(".")[-1], v)
    alpha = adapter_cfg.get("lora_alpha", meta.get("lora_alpha", meta.get("alpha")))
    if alpha is None:
        log.warning("LoRA %s carries no alpha; using alpha = rank = %d (scale 1)", p, rank)
        alpha = rank
    # exact module paths as targets: LoRA goes on precisely the modules the file has weights for (in stacked
    # layers on every layer of that stack, zero where the file has none: see KontextEditor.from_pretrained)
    targets = tuple(sorted(k[: -len(".lora_a")] for k in a_keys))
    return flat, LoRAConfig(rank=rank, alpha=float(alpha), targets=targets)


# ------------------------------------------------------------------------------------------- editor
@functools.partial(jax.jit, static_argnames=("policy",))
def _denoise(policy, base, lora, z0, cond, sigmas):
    """Euler ODE from ``z0`` over ``sigmas`` (the training rollouts' scan, deterministic)."""
    def velocity(params, z, sigma):
        return policy.velocity(base, params[0], z, sigma, params[1])

    return rollout_lib.rollout(velocity, (lora, cond), z0, sigmas, "flow", 0.0)


class Editor:
    """The family's DiT (+ LoRA), VAE, optional text conditioning and schedule; see the module docstring."""

    def __init__(self, family, cfg, graphdef, base, lora_state, vae, conditioner=None, scheduler_config=None,
                 mesh=None, text_cfg=None):
        self.family, self.config, self.mesh = family, cfg, mesh
        self._graphdef, self._dit_state, self._lora = graphdef, base, lora_state
        self.vae = vae
        self._vae_graph, self._vae_state = nnx.split(vae)
        self.conditioner = conditioner
        self.scheduler_config = scheduler_config
        self.text_cfg = dict(text_cfg or {})

    # -- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype=jnp.float32, lora: str | Path | None = None,
                        load_text_encoders: bool = True, t5_length: int = 128, clip_length: int = 77,
                        max_length: int = 256, mesh=None, family=None):
        """``family``: a name or ``editors.Family`` (default: detected from the folder). ``mesh``: load the DiT
        sharded by its logical axes and the VAE replicated on it, and run every edit with the batch sharded over
        the batch mesh axes (see the module docstring). None: default device."""
        d = Path(model_dir)
        family = editors.get(family) if isinstance(family, str) else family or editors.detect(d)
        family.check_dir(d, "--model", text_encoders=load_text_encoders)
        lora_cfg, lora_flat = None, None
        if lora is not None:
            lora_flat, lora_cfg = load_lora_file(lora)
        cfg, graphdef, base, lora_state = family.load_transformer(d, mesh=mesh, dtype=dtype, param_dtype=jnp.float32,
                                                                  lora=lora_cfg)
        # zero adapters (exactly the base model until the file's LoRA weights are put in), keeping their shardings
        lora_state = jax.tree.map(jnp.zeros_like, lora_state)
        if lora_flat is not None:
            # Stacked layers share one graph, so an adapter the file gives for some layers of a stack exists on all
            # of them; the layers without weights get zero adapters (A = B = 0: exactly the base layer).
            wanted = scan.unstack_flat(lora_state)
            absent = sorted(set(wanted) - set(lora_flat))
            if absent:
                log.info("LoRA %s has no weights for %d per-layer tensors of stacked layers (e.g. %s): zero there",
                         lora, len(absent), absent[0])
                lora_flat = {**{k: np.zeros(wanted[k].shape, np.float32) for k in absent}, **lora_flat}
            shardings = jax.tree.map(lambda x: x.sharding, lora_state)
            lora_state = jax.device_put(lora_from_flat(lora_flat, lora_state), shardings)
        vae = family.load_vae(d, dtype=dtype, mesh=mesh)
        text_cfg = {"t5_length": t5_length, "clip_length": clip_length, "max_length": max_length}
        cond = family.conditioner(d, text_cfg, dtype=dtype) if load_text_encoders else None
        return cls(family, cfg, graphdef, base, lora_state, vae, cond, family.scheduler_config(d), mesh=mesh,
                   text_cfg=text_cfg)

    @property
    def text_encoders(self):
        """The Kontext conditioner's T5 + CLIP (``TextEncoders``), for callers that encode once themselves."""
        return getattr(self.conditioner, "encoders", None)

    @property
    def batch_multiple(self) -> int:
        """Batches are padded to a multiple of this: the size of the batch mesh axes (1 without a mesh)."""
        if self.mesh is None:
            return 1
        from edit_r1_jax.parallel import rules

        n = 1
        for axes in rules.partition_spec(("batch",), mesh=self.mesh):
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                n *= self.mesh.shape[a]
        return n

    # -- geometry
    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self.vae.cfg)

    def token_grid(self, resolution: int) -> tuple[int, int]:
        return self.family.grid(self.vae.cfg, resolution)

    # -- pieces
    def encode_reference(self, pixels) -> jax.Array:
        """``[B,H,W,3]`` float in [-1,1] -> packed normalised reference latents ``[B, H*W/(4f^2), 4C]``."""
        return editors.encode_reference(self._vae_graph, self._vae_state, jnp.asarray(pixels, jnp.float32))

    def decode(self, tokens, h_tokens: int, w_tokens: int) -> jax.Array:
        """Packed normalised latents -> images float32 in [0, 1], ``[B, H, W, 3]``."""
        return editors.decode_latents(self._vae_graph, h_tokens, w_tokens, self._vae_state, jnp.asarray(tokens))

    def policy(self, resolution: int, text_length: int, guidance: float | None):
        return self.family.policy(self._graphdef, self.config, self.vae.cfg, resolution, text_length, guidance)

    def make_noise(self, batch: int, h_tokens: int, w_tokens: int, seed: int = 0) -> np.ndarray:
        """Packed standard-normal noise ``[B, h*w, 4C]`` (``randn [B, 2h, 2w, C]`` packed), float32."""
        key = jax.random.key(seed)
        z = jax.random.normal(key, (batch, 2 * h_tokens, 2 * w_tokens, self.latent_channels), jnp.float32)
        return np.asarray(L.pack(z))

    def encode_text(self, prompts: Sequence[str], pixels_uint8=None) -> dict[str, np.ndarray]:
        if self.conditioner is None:
            raise ValueError("this editor has no text encoder: pass the conditioning (prompt_embeds/pooled or cond)")
        return self.conditioner(list(prompts), pixels_uint8)

    # -- the whole edit
    def edit(self, pixels: np.ndarray, prompts: Sequence[str] | None = None, *, cond: dict | None = None,
             prompt_embeds=None, pooled=None, num_steps: int = 28, guidance: float | None = 2.5, seed: int = 0,
             noise=None, scan: bool = True, callback: Callable[[int], Any] | None = None) -> np.ndarray:
        """Edit ``pixels`` (``uint8 [B,R,R,3]`` or float in [-1,1]) with ``prompts`` or precomputed conditioning:
        ``cond`` (the family's text entries, e.g. Qwen-Image-Edit's {"text", "mask"}) or, for Kontext,
        ``prompt_embeds`` + ``pooled``.

        Returns float32 images in [0, 1], ``[B, R, R, 3]``. ``noise``: packed initial noise (default: from ``seed``).
        ``scan=False`` runs one jitted step per iteration (``callback`` gets the step index). ``guidance``: the
        guidance-embedding value, ignored by a model without one.
        """
        pixels = np.asarray(pixels)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] != pixels.shape[2]:
            raise ValueError(f"expected square RGB images [B,R,R,3], got {pixels.shape}")
        x = to_model_range(pixels) if pixels.dtype == np.uint8 else pixels.astype(np.float32)
        b, res = x.shape[0], x.shape[1]
        h, w = self.token_grid(res)
        if prompt_embeds is not None:
            if pooled is None:
                raise ValueError("prompt_embeds given without pooled")
            cond = {"text": prompt_embeds, "pooled": pooled}
        if cond is None:
            if prompts is None:
                raise ValueError("pass prompts or the conditioning (cond, or prompt_embeds + pooled)")
            if len(prompts) != b:
                raise ValueError(f"{len(prompts)} prompts for {b} images")
            u8 = pixels if pixels.dtype == np.uint8 else np.rint((x + 1) * 127.5).clip(0, 255).astype(np.uint8)
            cond = self.encode_text(prompts, u8)
        missing = [n for n in self.family.cond_names if n not in cond]
        if missing:
            raise ValueError(f"conditioning lacks {missing} (a {self.family.name} model needs "
                             f"{list(self.family.cond_names)})")
        cond = {n: np.asarray(cond[n]) for n in self.family.cond_names}
        if noise is None:
            noise = self.make_noise(b, h, w, seed)
        sigmas = np.asarray(self.family.sigmas(self.scheduler_config, num_steps, h * w), np.float32)
        policy = self.policy(res, cond["text"].shape[1], guidance)
        if self.mesh is None:
            return np.asarray(self._edit(policy, x, noise, cond, sigmas, h, w, scan, callback))
        from edit_r1_jax.parallel import distributed

        # pad to a multiple of the batch mesh axes with copies of the last row (rows never interact: the
        # padding changes no real row's result), shard, and drop the padding's outputs
        pad = -b % self.batch_multiple
        host = {"x": x, "noise": noise, **cond}
        host = {k: np.asarray(a, np.float32 if a.dtype.kind == "f" else a.dtype) for k, a in host.items()}
        if pad:
            host = {k: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for k, a in host.items()}
        sharded = {k: distributed.shard_host_batch(self.mesh, a) for k, a in host.items()}
        x, noise = sharded.pop("x"), sharded.pop("noise")
        with jax.set_mesh(self.mesh):
            out = self._edit(policy, x, noise, sharded, sigmas, h, w, scan, callback)
        return distributed.gather_global(out)[:b]

    def _edit(self, policy, x, noise, cond, sigmas, h, w, scan, callback):
        full = {"ref": self.encode_reference(x), **{k: jnp.asarray(v) for k, v in cond.items()}}
        z = jnp.asarray(noise, jnp.float32)
        if scan:
            z = _denoise(policy, self._dit_state, self._lora, z, full, sigmas)
        else:
            for i in range(len(sigmas) - 1):
                z = _denoise(policy, self._dit_state, self._lora, z, full, sigmas[i:i + 2])
                if callback is not None:
                    jax.block_until_ready(z)
                    callback(i)
        return self.decode(z, h, w)


KontextEditor = Editor
