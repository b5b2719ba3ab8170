"""Peak host memory of the streaming DiT converter vs the checkpoint size. Not a test.

    python bench/convert_memory.py [--width 1024] [--double 2] [--single 4]

Saves a random diffusers FluxTransformer2DModel (sharded safetensors + index, float32), then converts it with
``python -m tools.convert_weights flux-transformer`` in a fresh process and reports, as JSON, that process's peak
anonymous resident memory (sampled every 5 ms) above the level just before conversion (imports done), next to the
checkpoint size and the largest tensor. The converter holds one source tensor and its transformed copy at a time, so the increase
should be a small multiple of the largest tensor, independent of the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys, json, threading, time
sys.path.insert(0, {root!r})
import jax, numpy, safetensors  # imports first: their memory is not the converter's
from tools.convert_weights.__main__ import main
def status():
    out = {{}}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out
before = status()
peak = dict(before)
done = False
def watch():
    while not done:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
th = threading.Thread(target=watch, daemon=True); th.start()
main(["flux-transformer", "--src", {src!r}, "--dst", {dst!r}])
done = True; th.join()
print(json.dumps({{"before": before, "peak": peak}}))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    args = p.parse_args(argv)
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    tmp = Path(tempfile.mkdtemp(prefix="convert_mem_"))
    heads = args.width // 128
    model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
                                   num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768,
                                   guidance_embeds=True, in_channels=64)
    model.save_pretrained(tmp / "src", max_shard_size="200MB")
    del model
    total, largest, largest_name = 0, 0, ""
    for f in (tmp / "src").glob("*.safetensors"):
        with safe_open(str(f), "numpy") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                n = 4
                for d in sl.get_shape():
                    n *= d
                total += n
                if n > largest:
                    largest, largest_name = n, k
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    code = CHILD.format(root=str(ROOT), src=str(tmp / "src"), dst=str(tmp / "dst"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    child = json.loads(out.stdout.strip().splitlines()[-1])
    b, pk = child["before"], child["peak"]
    result = {"checkpoint_mib": round(total / 2**20, 1), "largest_tensor": largest_name,
              "largest_tensor_mib": round(largest / 2**20, 1),
              "anon_before_mib": round(b["RssAnon"], 1), "anon_peak_mib": round(pk["RssAnon"], 1),
              "anon_increase_mib": round(pk["RssAnon"] - b["RssAnon"], 1),
              "file_mapped_peak_mib": round(pk["RssFile"], 1),
              "note": "RssAnon is the converter's own memory; RssFile counts mmapped checkpoint pages, "
                      "which the kernel reclaims under pressure"}
    result["anon_increase_over_largest_tensor"] = round(result["anon_increase_mib"] / result["largest_tensor_mib"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
