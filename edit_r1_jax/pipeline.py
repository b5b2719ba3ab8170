"""``KontextEditor``: FLUX.1-Kontext image editing with converted DiT + VAE + text encoders (spec A.1-A.5).

Flow (= diffusers ``FluxKontextPipeline`` with ``_auto_resize=False``, ``max_area = resolution**2``, Euler ODE):

    pixels uint8 [B,R,R,3] -> [-1,1] -> VAE encode (mean) -> (z - shift) * scale -> pack -> reference tokens
    noise [B,L,4C] (packed ``randn`` of shape [B,C,R/f,R/f]) -> Euler over ``schedule.sigmas(N, L)`` with
        v = kontext_velocity(DiT, z, ref, T5 embeds, CLIP pooled, sigma, kontext ids, text ids, guidance)
        z <- z + (sigma_next - sigma) * v         (float32 update, like FlowMatchEulerDiscreteScheduler)
    -> unpack -> z / scale + shift -> VAE decode -> clamp(x/2 + 1/2, 0, 1) float32 [B,R,R,3]

``denoise`` runs all steps as one jitted ``lax.scan`` (training rollouts); ``denoise_steps`` is a Python loop over
a jitted step with an optional progress callback (the CLI's tqdm bar). Both give the same numbers.

On a mesh (``from_pretrained(mesh=...)``, used by ``python -m edit_r1_jax.evaluate``): the DiT is read slice by slice
onto the mesh by its logical axes (``models.flux.params.load_transformer``, as the trainer), the VAE replicated, and
each batch (pixels, noise, text embeddings) sharded over the batch mesh axes, padded to a multiple of their size
with copies of the last row whose outputs are dropped; every process must pass the same whole batch.

Converted model directory (``python -m tools.convert_weights kontext``)::

    transformer/     DiT (params.safetensors + config.json)
    vae/             AutoencoderKL
    text_encoder/    CLIP-L text (+ tokenizer/)
    text_encoder_2/  T5 encoder (+ tokenizer/)
    scheduler/       scheduler_config.json (base/max image seq len and shifts)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from edit_r1_jax.data.images import to_model_range
from edit_r1_jax.diffusion import latents as L
from edit_r1_jax.diffusion import schedule
from edit_r1_jax.models.flux.autoencoder import AutoencoderKL
from edit_r1_jax.models.flux.autoencoder_params import load_vae
from edit_r1_jax.models.flux.modeling import FluxConfig, FluxTransformer, kontext_velocity
from edit_r1_jax.models import scan
from edit_r1_jax.models.lora import LoRAConfig, LoRAParam, lora_from_flat
from edit_r1_jax.weights import load_state, read_config

log = logging.getLogger(__name__)

__all__ = ["KontextEditor", "ScheduleConfig", "euler_scan", "load_transformer", "load_lora_file"]


class ScheduleConfig(dict):
    """The scheduler fields the sigma schedule needs (defaults: FLUX's scheduler_config.json)."""

    DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)

    def __init__(self, d: dict | None = None):
        super().__init__(self.DEFAULTS)
        if d:
            self.update({k: d[k] for k in self.DEFAULTS if k in d and d[k] is not None})
            if d.get("use_dynamic_shifting") is False:
                raise ValueError("scheduler config has use_dynamic_shifting=false; FLUX uses the dynamic shift")
            if d.get("time_shift_type", "exponential") != "exponential":
                raise ValueError(f"unsupported time_shift_type {d.get('time_shift_type')!r}")

    def sigmas(self, num_steps: int, image_seq_len: int) -> np.ndarray:
        return schedule.sigmas(num_steps, image_seq_len, self["base_image_seq_len"], self["max_image_seq_len"],
                               self["base_shift"], self["max_shift"])


def euler_scan(velocity: Callable, z0, sigmas):
    """Euler ODE ``z <- z + (s_next - s) * velocity(z, s)`` over ``sigmas [N+1]`` as one ``lax.scan``.

    ``velocity(z, sigma_scalar) -> v``; the update is computed in float32 and cast back to ``z0.dtype``.
    Returns the final latent.
    """
    sig = jnp.asarray(sigmas, jnp.float32)

    def body(z, pair):
        s, s_next = pair[0], pair[1]
        v = velocity(z, s)
        z = (z.astype(jnp.float32) + (s_next - s) * v.astype(jnp.float32)).astype(z0.dtype)
        return z, None

    z, _ = jax.lax.scan(body, z0, jnp.stack([sig[:-1], sig[1:]], axis=1))
    return z


# ------------------------------------------------------------------------------------------ loading
def load_transformer(model_dir: str | Path, dtype=jnp.float32, param_dtype=jnp.float32,
                     lora: LoRAConfig | None = None, shardings=None) -> FluxTransformer:
    """The converted DiT (``params.safetensors`` + ``config.json``); LoRA adapters (if ``lora``) start at zero."""
    cfg = FluxConfig.from_diffusers(read_config(model_dir), dtype=dtype, param_dtype=param_dtype, lora=lora)
    model = nnx.eval_shape(lambda: FluxTransformer(cfg, rngs=nnx.Rngs(0)))
    if lora is None:
        nnx.update(model, load_state(model_dir, nnx.state(model), shardings))
        return model
    base = load_state(model_dir, nnx.state(model, nnx.Param), shardings)
    nnx.update(model, base)
    # zero adapters (the model equals the base model until LoRA weights are put in with lora_from_flat)
    zeros = jax.tree.map(lambda v: v.replace(jnp.zeros(v.get_value().shape, v.get_value().dtype)),
                         nnx.state(model, LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, zeros)
    return model


def _load_transformer_on_mesh(model_dir, mesh, dtype, lora: LoRAConfig | None) -> FluxTransformer:
    """The DiT read slice by slice onto ``mesh`` by its logical axes (the trainer's loader); zero adapters."""
    from edit_r1_jax.models.flux import params as flux_params

    _, graphdef, base, lora_state = flux_params.load_transformer(model_dir, mesh=mesh, dtype=dtype,
                                                                 param_dtype=jnp.float32, lora=lora)
    # zero adapters (exactly the base model until the file's LoRA weights are put in), keeping their shardings
    lora_state = jax.tree.map(jnp.zeros_like, lora_state)
    return nnx.merge(graphdef, lora_state, base)  # split_policy's order: LoRAParam first


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
class KontextEditor:
    """Holds the DiT, the VAE, optional text encoders and the schedule config; see the module docstring."""

    def __init__(self, transformer: FluxTransformer, vae: AutoencoderKL, text_encoders=None,
                 schedule_config: dict | None = None, mesh=None):
        self.mesh = mesh
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = text_encoders
        self.schedule_config = ScheduleConfig(schedule_config)
        self._dit_graph, self._dit_state = nnx.split(transformer)
        self._vae_graph, self._vae_state = nnx.split(vae)
        self._jit_cache: dict[str, Callable] = {}

    # -- construction
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype=jnp.float32, lora: str | Path | None = None,
                        load_text_encoders: bool = True, t5_length: int = 128, clip_length: int = 77, mesh=None):
        """``mesh``: load the DiT sharded by its logical axes and the VAE replicated on it, and run every edit
        with the batch sharded over the batch mesh axes (see the module docstring). None: default device."""
        d = Path(model_dir)
        for sub in ("transformer", "vae"):
            if not (d / sub).is_dir():
                raise FileNotFoundError(f"{d / sub} not found: is {d} a converted Kontext directory "
                                        f"(python -m tools.convert_weights kontext)?")
        lora_cfg, lora_flat = None, None
        if lora is not None:
            lora_flat, lora_cfg = load_lora_file(lora)
        if mesh is None:
            transformer = load_transformer(d / "transformer", dtype=dtype, lora=lora_cfg)
        else:
            transformer = _load_transformer_on_mesh(d / "transformer", mesh, dtype, lora_cfg)
        if lora_flat is not None:
            template = nnx.state(transformer, LoRAParam)
            # Stacked layers share one graph, so an adapter the file gives for some layers of a stack exists on all
            # of them; the layers without weights get zero adapters (A = B = 0: exactly the base layer).
            wanted = scan.unstack_flat(template)
            absent = sorted(set(wanted) - set(lora_flat))
            if absent:
                log.info("LoRA %s has no weights for %d per-layer tensors of stacked layers (e.g. %s): zero there",
                         lora, len(absent), absent[0])
                lora_flat = {**{k: np.zeros(wanted[k].shape, np.float32) for k in absent}, **lora_flat}
            lora_state = lora_from_flat(lora_flat, template)
            if mesh is not None:  # small: placed from host values by the adapters' logical axes
                from edit_r1_jax.parallel import rules

                lora_state = jax.device_put(lora_state, rules.state_shardings(template, mesh))
            nnx.update(transformer, lora_state)
        if mesh is None:
            vae = load_vae(d / "vae", dtype=dtype)
        else:  # replicated, each process filling its own devices from the file (as kontext_task.py)
            from edit_r1_jax.models.flux import autoencoder_params as vae_params

            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            vae_cfg = vae_params.config_from_dict(read_config(d / "vae"))
            vae_sh = jax.tree.map(lambda _: replicated, vae_params.abstract_state(vae_cfg))
            vae = load_vae(d / "vae", dtype=dtype, shardings=vae_sh)
        text = None
        if load_text_encoders:
            from edit_r1_jax.models.text.encoders import TextEncoders

            text = TextEncoders.from_pretrained(d, t5_length=t5_length, clip_length=clip_length)
        sched_file = d / "scheduler" / "scheduler_config.json"
        sched = json.loads(sched_file.read_text()) if sched_file.exists() else None
        return cls(transformer, vae, text, sched, mesh=mesh)

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
    def vae_scale_factor(self) -> int:
        return self.vae.cfg.scale_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.cfg.latent_channels

    def token_grid(self, resolution: int) -> tuple[int, int]:
        m = self.vae_scale_factor * 2
        if resolution % m:
            raise ValueError(f"resolution {resolution} is not a multiple of {m} (VAE factor x patch 2)")
        n = resolution // m
        return n, n

    # -- jitted pieces
    def _jit(self, name, fn, **kw):
        if name not in self._jit_cache:
            self._jit_cache[name] = jax.jit(fn, **kw)
        return self._jit_cache[name]

    def encode_reference(self, pixels) -> jax.Array:
        """``[B,H,W,3]`` float in [-1,1] -> packed normalised reference latents ``[B, H*W/(4f^2), 4C]``."""
        g = self._vae_graph

        def fn(state, x):
            vae = nnx.merge(g, state)
            return L.pack(vae.encode_normalized(x).astype(jnp.float32))

        return self._jit("encode", fn)(self._vae_state, jnp.asarray(pixels, jnp.float32))

    def decode(self, tokens, h_tokens: int, w_tokens: int) -> jax.Array:
        """Packed normalised latents -> images float32 in [0, 1], ``[B, H, W, 3]``."""
        g = self._vae_graph

        def fn(state, t):
            vae = nnx.merge(g, state)
            z = L.unpack(t, 2 * h_tokens, 2 * w_tokens)
            x = vae.decode_normalized(z).astype(jnp.float32)
            return jnp.clip(x / 2 + 0.5, 0.0, 1.0)

        return self._jit(f"decode_{h_tokens}x{w_tokens}", fn)(self._vae_state, jnp.asarray(tokens))

    def _velocity_fn(self, state, ref, embeds, pooled, img_ids, txt_ids, guidance):
        g = self._dit_graph

        def velocity(z, s):
            model = nnx.merge(g, state)
            sigma = jnp.full((z.shape[0],), s, jnp.float32)
            gvec = None if guidance is None else jnp.full((z.shape[0],), guidance, jnp.float32)
            return kontext_velocity(model, z, ref, embeds, pooled, sigma, img_ids, txt_ids, gvec)

        return velocity

    def denoise(self, noise, ref_tokens, prompt_embeds, pooled, sigmas, guidance: float | None, h_tokens: int,
                w_tokens: int) -> jax.Array:
        """All Euler steps as one jitted ``lax.scan``; returns the final packed latents (float32)."""
        img_ids = jnp.asarray(L.kontext_ids(h_tokens, w_tokens))
        txt_ids = jnp.asarray(L.text_ids(prompt_embeds.shape[1]))

        def fn(state, z0, ref, e, p, sig, gscale):
            vel = self._velocity_fn(state, ref, e, p, img_ids, txt_ids, gscale)
            return euler_scan(vel, z0, sig)

        gs = None if guidance is None else jnp.float32(guidance)
        return self._jit(f"denoise_{h_tokens}x{w_tokens}_{guidance is None}", fn)(
            self._dit_state, jnp.asarray(noise, jnp.float32), jnp.asarray(ref_tokens, jnp.float32),
            jnp.asarray(prompt_embeds, jnp.float32), jnp.asarray(pooled, jnp.float32), jnp.asarray(sigmas, jnp.float32),
            gs)

    def denoise_steps(self, noise, ref_tokens, prompt_embeds, pooled, sigmas, guidance: float | None,
                      h_tokens: int, w_tokens: int, callback: Callable[[int], Any] | None = None) -> jax.Array:
        """Same as :meth:`denoise` but a Python loop over one jitted Euler step (``callback(i)`` after each)."""
        img_ids = jnp.asarray(L.kontext_ids(h_tokens, w_tokens))
        txt_ids = jnp.asarray(L.text_ids(prompt_embeds.shape[1]))

        def fn(state, z, ref, e, p, s, s_next, gscale):
            v = self._velocity_fn(state, ref, e, p, img_ids, txt_ids, gscale)(z, s)
            return (z.astype(jnp.float32) + (s_next - s) * v.astype(jnp.float32)).astype(z.dtype)

        step = self._jit(f"step_{h_tokens}x{w_tokens}_{guidance is None}", fn)
        sig = np.asarray(sigmas, np.float32)
        z = jnp.asarray(noise, jnp.float32)
        args = (jnp.asarray(ref_tokens, jnp.float32), jnp.asarray(prompt_embeds, jnp.float32),
                jnp.asarray(pooled, jnp.float32))
        gs = None if guidance is None else jnp.float32(guidance)
        for i in range(len(sig) - 1):
            z = step(self._dit_state, z, *args, jnp.float32(sig[i]), jnp.float32(sig[i + 1]), gs)
            if callback is not None:
                jax.block_until_ready(z)
                callback(i)
        return z

    # -- the whole edit
    def make_noise(self, batch: int, h_tokens: int, w_tokens: int, seed: int = 0) -> np.ndarray:
        """Packed standard-normal noise ``[B, h*w, 4C]`` (``randn [B, 2h, 2w, C]`` packed), float32."""
        key = jax.random.key(seed)
        z = jax.random.normal(key, (batch, 2 * h_tokens, 2 * w_tokens, self.latent_channels), jnp.float32)
        return np.asarray(L.pack(z))

    def edit(self, pixels: np.ndarray, prompts: Sequence[str] | None = None, *, prompt_embeds=None, pooled=None,
             num_steps: int = 28, guidance: float | None = 2.5, seed: int = 0, noise=None, scan: bool = True,
             callback: Callable[[int], Any] | None = None) -> np.ndarray:
        """Edit ``pixels`` (``uint8 [B,R,R,3]`` or float in [-1,1]) with ``prompts`` (or precomputed embeddings).

        Returns float32 images in [0, 1], ``[B, R, R, 3]``. ``noise``: packed initial noise (default: from ``seed``).
        ``scan=False`` uses the per-step loop (``callback`` gets the step index).
        """
        pixels = np.asarray(pixels)
        if pixels.ndim == 3:
            pixels = pixels[None]
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] != pixels.shape[2]:
            raise ValueError(f"expected square RGB images [B,R,R,3], got {pixels.shape}")
        x = to_model_range(pixels) if pixels.dtype == np.uint8 else pixels.astype(np.float32)
        b, res = x.shape[0], x.shape[1]
        h, w = self.token_grid(res)
        if prompt_embeds is None:
            if prompts is None:
                raise ValueError("pass prompts or prompt_embeds + pooled")
            if self.text_encoders is None:
                raise ValueError("this editor has no text encoders: pass prompt_embeds and pooled")
            if len(prompts) != b:
                raise ValueError(f"{len(prompts)} prompts for {b} images")
            prompt_embeds, pooled = self.text_encoders.encode(prompts)
        elif pooled is None:
            raise ValueError("prompt_embeds given without pooled")
        if not self.transformer.config.guidance_embeds:
            guidance = None
        if noise is None:
            noise = self.make_noise(b, h, w, seed)
        sigmas = self.schedule_config.sigmas(num_steps, h * w)
        if self.mesh is None:
            return self._edit(x, noise, prompt_embeds, pooled, sigmas, guidance, h, w, scan, callback)
        from edit_r1_jax.parallel import distributed

        # pad to a multiple of the batch mesh axes with copies of the last row (rows never interact: the
        # padding changes no real row's result), shard, and drop the padding's outputs
        pad = -b % self.batch_multiple
        host = [np.asarray(a, np.float32) for a in (x, noise, prompt_embeds, pooled)]
        if pad:
            host = [np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) for a in host]
        sharded = [distributed.shard_host_batch(self.mesh, a) for a in host]
        with jax.set_mesh(self.mesh):
            out = self._edit(*sharded, sigmas, guidance, h, w, scan, callback)
        return distributed.gather_global(out)[:b]

    def _edit(self, x, noise, prompt_embeds, pooled, sigmas, guidance, h, w, scan, callback):
        ref = self.encode_reference(x)
        if scan:
            z = self.denoise(noise, ref, prompt_embeds, pooled, sigmas, guidance, h, w)
        else:
            z = self.denoise_steps(noise, ref, prompt_embeds, pooled, sigmas, guidance, h, w, callback)
        return np.asarray(self.decode(z, h, w)) if self.mesh is None else self.decode(z, h, w)
