"""Run the tiny toy trainer in one process of an N-process job (or alone); used by test_multiprocess.py.

Usage: python tests/mp_train_worker.py RUN_DIR NUM_EPOCHS OUT_NPZ [NUM_PROCESSES PROCESS_ID PORT]
Devices per process come from XLA_FLAGS (--xla_force_host_platform_device_count). Process 0 writes theta,
theta_old and EMA as npz to OUT_NPZ.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from test_train import tiny_config  # noqa: E402

from edit_r1_jax import train  # noqa: E402


def main():
    run_dir, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    c = tiny_config(run_dir)
    c.num_epochs = epochs
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    c.sample.rollout_batch_size = 8  # divisible by the 8 data-parallel devices
    if len(sys.argv) > 4:
        c.distributed.update(coordinator=f"127.0.0.1:{sys.argv[6]}", num_processes=int(sys.argv[4]),
                             process_id=int(sys.argv[5]))
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    summary = train.run(c)
    state = summary["state"]
    flat = {}
    for name in ("theta", "theta_old", "ema"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(state[name])[0]:
            flat[name + "/" + "/".join(str(getattr(p, "key", p)) for p in path)] = np.asarray(
                jax.experimental.multihost_utils.process_allgather(leaf, tiled=True))
    if jax.process_index() == 0:
        np.savez(out, step=int(state["step"]), devices=jax.device_count(), processes=jax.process_count(), **flat)


if __name__ == "__main__":
    import jax.experimental.multihost_utils  # noqa: F401

    main()
