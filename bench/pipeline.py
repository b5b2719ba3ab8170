"""How long the devices wait for the host during an epoch of the toy task (python bench/pipeline.py).

Runs the toy trainer (configs/toy.py, warm start shortened, no eval) for a few epochs twice: once as it runs by
default (inputs prefetched in a thread, rollout i+1 dispatched before rewards i are read back) and once with
``log.sync_phase_times`` (each phase blocked on, so time/rollout and time/decode are device times). Prints one
JSON line per mode: mean per-epoch phase seconds over the epochs after the first (which compiles), and
``host_wait_fraction`` = time/data / time/epoch, the share of the epoch in which the host had not yet produced
the next inputs. Figures depend on the machine and its load: measure on an idle one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(epochs: int = 4):
    from configs import toy
    from edit_r1_jax import train

    for sync in (False, True):
        c = toy.get_config()
        c.run_dir = tempfile.mkdtemp(prefix="edit_r1_pipeline_")
        c.num_epochs = epochs
        c.warmup.steps = 20
        c.eval.every = 0
        c.log.update(image_every=0, tensorboard=False, progress=False, sync_phase_times=sync)
        c.checkpoint.every = 10**6
        train.run(c)
        lines = [json.loads(x) for x in open(os.path.join(c.run_dir, "metrics.jsonl")) if '"optimizer_step"' in x][1:]
        phases = sorted({k for x in lines for k in x if k.startswith("time/")})
        mean = {k: round(sum(x.get(k, 0.0) for x in lines) / len(lines), 4) for k in phases}
        print(json.dumps({"sync_phase_times": sync, "epochs_measured": len(lines), **mean,
                          "host_wait_fraction": round(mean["time/data"] / mean["time/epoch"], 4)}))


if __name__ == "__main__":
    main()
