"""The CPU demo's before/after figures: NFT on the toy task vs the same run with learning rate 0.

    python bench/toy_demo.py [--long] [--run-dir runs/toy_demo] [--epochs N]

Runs configs/toy.py (supervised warm start, then DiffusionNFT on the verifier reward) and configs/toy.py:lr0
from the same warm start (with --long: configs/toy.py:long and :long,lr0, the 120-epoch pair), and prints
JSON: held-out verifier reward and edit success rate of the warm-started policy (epoch 0) and after NFT, for
both runs, with wall-clock times. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configs import toy  # noqa: E402
from edit_r1_jax import train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/toy_demo")
    p.add_argument("--epochs", type=int, default=None, help="override toy num_epochs")
    p.add_argument("--long", action="store_true", help="the 120-epoch variant (configs/toy.py:long)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    root = Path(args.run_dir)
    if root.exists():
        shutil.rmtree(root)
    results = {}
    for variant in ("", "lr0"):
        c = toy.get_config(",".join(v for v in ("long" if args.long else "", variant) if v))
        c.run_dir = str(root / (variant or "nft"))
        c.log.progress = False
        if args.epochs:
            c.num_epochs = args.epochs
        if variant:  # same warm start as the NFT run, no need to train it twice
            shutil.copytree(root / "nft" / "warm_base", Path(c.run_dir) / "warm_base")
        t0 = time.time()
        out = train.run(c)
        evals = out["eval"]
        first, last = evals[min(evals)], evals[max(evals)]
        results[variant or "nft"] = {
            "epochs": int(c.num_epochs), "seconds": round(time.time() - t0, 1),
            "warm_start_reward": round(first["eval/reward_mean"], 4),
            "warm_start_success": round(first["eval/success_rate"], 4),
            "final_reward": round(last["eval/reward_mean"], 4),
            "final_success": round(last["eval/success_rate"], 4),
            "eval_reward_by_epoch": {int(k): round(v["eval/reward_mean"], 4) for k, v in evals.items()}}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
