"""Throughput of our VAE encode/decode and text encoders vs diffusers / transformers on the same CPU config.

    python bench/encoders.py [--preset small|flux] [--iters 5] [--out FILE]

``small`` (default, fits a 2-core CPU in ~2 min): FLUX VAE architecture (128/256/512/512, 16 latent ch) at
128x128, CLIP-L text (12 layers, 768) at 77 tokens, a T5 v1.1-base-sized encoder (12 layers, d_model 768, gated
GELU) at 128 tokens. ``flux``: the real FLUX sizes (VAE at 512x512, T5-XXL: needs ~20 GB RAM per framework).
Weights are random (throughput does not depend on values); both sides run float32, batch ``--batch``.
Prints one JSON object (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
START_LOAD = os.getloadavg()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from machine import add_host_malloc_flag, machine_info, paired_times, use_host_malloc  # noqa: E402

PRESETS = {
    "small": dict(vae_res=128, t5=dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12), batch=2),
    "flux": dict(vae_res=512, t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64), batch=1),
}


def _pair(ours, ref, iters: int) -> tuple[float, float]:
    """(ours, reference) median wall time, timed in rounds of a random order (machine.paired_times)."""
    t = paired_times({"ours": ours, "ref": ref}, iters)
    return statistics.median(t["ours"]), statistics.median(t["ref"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--out", default=None)
    add_host_malloc_flag(ap)
    args = ap.parse_args(argv)
    use_host_malloc(args)
    p = PRESETS[args.preset]
    b = args.batch or p["batch"]
    torch.set_grad_enabled(False)
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"preset": args.preset, "batch": b, "iters": args.iters, "dtype": "float32",
               "cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
               "torch": torch.__version__, "jax_backend": jax.default_backend(), "rows": []}

    def row(name, shape, ours_s, ref_s, items):
        r = {"name": name, "input": shape, "ours_ms": round(ours_s * 1e3, 2), "ref_ms": round(ref_s * 1e3, 2),
             "ours_items_per_s": round(items / ours_s, 3), "ref_items_per_s": round(items / ref_s, 3),
             "speedup_vs_ref": round(ref_s / ours_s, 3)}
        results["rows"].append(r)
        print(json.dumps(r), file=sys.stderr)

    # ------------------------------------------------------------------ VAE
    from diffusers import AutoencoderKL as TorchVAE

    from edit_r1_jax.models.flux.autoencoder import AutoencoderKL, AutoencoderKLConfig

    res = p["vae_res"]
    tv = TorchVAE(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False).eval()
    ours_vae = AutoencoderKL(AutoencoderKLConfig(), rngs=nnx.Rngs(0))
    g, st = nnx.split(ours_vae)
    enc = jax.jit(lambda s, x: nnx.merge(g, s).encode(x))
    dec = jax.jit(lambda s, z: nnx.merge(g, s).decode(z))
    x = np.random.default_rng(0).uniform(-1, 1, (b, res, res, 3)).astype(np.float32)
    z = np.random.default_rng(1).standard_normal((b, res // 8, res // 8, 16)).astype(np.float32)
    xt, zt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
    row("vae_encode", [b, res, res, 3], *_pair(lambda: enc(st, x).block_until_ready(),
        lambda: tv.encode(xt).latent_dist.mean, args.iters), b)
    row("vae_decode", [b, res // 8, res // 8, 16], *_pair(lambda: dec(st, z).block_until_ready(),
        lambda: tv.decode(zt).sample, args.iters), b)
    del tv, ours_vae, st

    # ----------------------------------------------------------------- CLIP
    from transformers import CLIPTextConfig as HFClipCfg, CLIPTextModel as HFClip

    from edit_r1_jax.models.text.clip import CLIPTextConfig, CLIPTextModel

    hc = HFClip(HFClipCfg(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77)).eval()
    oc = CLIPTextModel(CLIPTextConfig(), rngs=nnx.Rngs(0))
    g, st = nnx.split(oc)
    clip_fn = jax.jit(lambda s, ids: nnx.merge(g, s)(ids))
    ids = np.random.default_rng(2).integers(0, 49407, (b, 77)).astype(np.int32)
    ids[:, -1] = 49407
    idt = torch.from_numpy(ids.astype(np.int64))
    row("clip_l_text", [b, 77], *_pair(lambda: jax.block_until_ready(clip_fn(st, ids)),
        lambda: hc(idt).pooler_output, args.iters), b)
    del hc, oc, st

    # ------------------------------------------------------------------- T5
    from transformers import T5Config as HFT5Cfg, T5EncoderModel as HFT5

    from edit_r1_jax.models.text.t5 import T5Config, T5EncoderModel

    tcfg = p["t5"]
    ht = HFT5(HFT5Cfg(vocab_size=32128, feed_forward_proj="gated-gelu", **tcfg)).eval()
    ot = T5EncoderModel(T5Config(**tcfg), rngs=nnx.Rngs(0))
    g, st = nnx.split(ot)
    t5_fn = jax.jit(lambda s, ids: nnx.merge(g, s)(ids))
    ids = np.random.default_rng(3).integers(0, 32000, (b, 128)).astype(np.int32)
    idt = torch.from_numpy(ids.astype(np.int64))
    row(f"t5_encoder_{tcfg['num_layers']}x{tcfg['d_model']}", [b, 128],
        *_pair(lambda: t5_fn(st, ids).block_until_ready(),
        lambda: ht(idt).last_hidden_state, args.iters), b)

    results["machine"] = machine_info(START_LOAD)
    out = json.dumps(results, indent=2)
    print(out)
    if args.out:
        Path(args.out).write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
