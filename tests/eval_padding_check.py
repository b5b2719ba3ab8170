"""Run by test_eval_padding.py in a subprocess with 8 host CPU devices: evaluation of 7 and of 1 held-out rows
on an 8-device mesh (batches padded with masked rows). Prints one JSON line."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from test_train import tiny_config  # noqa: E402

from edit_r1_jax import config as config_lib, engine, metrics, tasks, train  # noqa: E402
from edit_r1_jax.parallel import mesh as mesh_lib  # noqa: E402


def main():
    assert jax.device_count() == 8, jax.devices()
    c = tiny_config(sys.argv[1])
    c.sample.rollout_batch_size = 8
    mesh = mesh_lib.make_mesh(dict(c.mesh))
    out = {}
    with jax.set_mesh(mesh):
        writer = metrics.MetricWriter(sys.argv[1], tensorboard=False)
        task = tasks.build(c, mesh, sys.argv[1], writer)
        state = engine.init_state(task.init_lora(), engine.make_optimizer(c), jax.random.key(c.seed))
        for name, (n, bs) in {"7_in_8": (7, 8), "7_in_1s": (7, 1), "7_in_3s": (7, 3), "1_in_8": (1, 8),
                              "1_in_1": (1, 1)}.items():
            c.eval.update(num_samples=n, batch_size=bs)
            config_lib.validate(c, 1, 8)  # no divisibility demanded of eval sizes any more
            out[name] = train.evaluate(c, task, state, 1, writer)["eval/reward_mean"]
    print(json.dumps(out))

if __name__ == "__main__":
    main()
