"""One process of the paper path (tiny converted Kontext + text cache + tiny Qwen2.5-VL reward, filter on) in an
N-process job, started the way tools/gpu/ssh_launch.sh starts it: EDIT_R1_COORDINATOR / EDIT_R1_NUM_PROCESSES /
EDIT_R1_PROCESS_ID in the environment (none of them: a single process). Used by test_multiprocess_kontext.py.

Usage: python tests/mp_kontext_worker.py FIXTURES_JSON RUN_DIR NUM_EPOCHS OUT_NPZ
Process 0 writes per-epoch rows, rollouts (x0, gathered), rewards, advantages (r), mask, banned rows, the
epoch's train/* metrics (losses) from metrics.jsonl, and the final LoRA.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.experimental.multihost_utils  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from edit_r1_jax import train  # noqa: E402


def kontext_config(fx: dict, run_dir: str, epochs: int):
    from configs import kontext_mllm

    c = kontext_mllm.get_config("ban_prompt")
    c.run_dir = run_dir
    c.num_epochs = epochs
    c.model.update(dir=fx["model"], dtype="float32", param_dtype="float32", remat_policy="none")
    c.data.update(root=fx["data"], resolution=fx["resolution"])
    c.text.t5_length = fx["t5_length"]
    c.reward.mllm_dir = fx["qwen"]
    c.reward.batch_size = 4  # two reward micro-batches per rollout call
    c.lora.rank = 4
    c.sample.update(num_steps=2, group_size=2, groups_per_batch=4, num_batches_per_epoch=1, rollout_batch_size=8)
    c.train.micro_batch_size = 8
    c.filter.update(std_thres=fx["std_thres"], mean_thres=0.0)
    c.eval.update(every=0)
    c.checkpoint.update(every=1, max_to_keep=5)
    c.log.update(tensorboard=False, progress=False, image_every=1)
    return c


def main():
    fx = json.loads(open(sys.argv[1]).read())
    run_dir, epochs, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    c = kontext_config(fx, run_dir, epochs)
    record = []
    real = train.advantages

    def recording(c_, batches, sampler):  # the real function; its inputs and outputs are kept for the test
        adv, filt, m = real(c_, batches, sampler)
        x0 = np.concatenate([np.asarray(jax.experimental.multihost_utils.process_allgather(b["x0"], tiled=True))
                             for b in batches])
        record.append(dict(x0=x0, rows=np.concatenate([b["rows_all"] for b in batches]),
                           rewards=np.concatenate([b["rewards_all"] for b in batches]),
                           r=np.asarray(adv.r), mask=np.asarray(filt.mask), banned=sorted(sampler.banned)))
        return adv, filt, m

    train.advantages = recording
    summary = train.run(c)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(summary["state"]["theta"])[0]:
        flat["theta/" + "/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(
            jax.experimental.multihost_utils.process_allgather(leaf, tiled=True))
    if jax.process_index() == 0:
        # One metrics line per epoch, keyed by "step" (epochs done); evaluation lines carry no train/ keys.
        lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
        lines = [x for x in lines if "train/policy_loss" in x]
        arrays = {f"e{i}_{k}": np.asarray(v) for i, rec in enumerate(record) for k, v in rec.items()}
        train_keys = sorted(k for k in lines[0] if k.startswith("train/")) if lines else []
        np.savez(out, step=int(summary["state"]["step"]), devices=jax.device_count(), processes=jax.process_count(),
                 epochs=np.asarray([x["step"] - 1 for x in lines]),
                 **{k: np.asarray([x[k] for x in lines]) for k in train_keys}, **arrays, **flat)


if __name__ == "__main__":
    main()
