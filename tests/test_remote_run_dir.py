"""A run directory on a bucket: the toy trainer with run_dir=gs://bucket/run on a real local GCS server
(gcp-storage-emulator, in memory on 127.0.0.1; epath reaches it through gcsfs, orbax through tensorstore) writes
checkpoints, metrics, TensorBoard events, grids and LoRA exports there, and a second run resumes from them."""

import json
import os
import socket

import pytest

from edit_r1_jax import checkpoint as ckpt_lib
from edit_r1_jax import train

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_bucket():
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    url = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    try:
        yield "gs://bucket"
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_gs_run_dir_checkpoints_and_resumes(gcs_bucket, tmp_path, monkeypatch):
    from etils import epath
    from test_train import tiny_config

    monkeypatch.chdir(tmp_path)  # a stray local folder named "gs:" would show up here
    run = f"{gcs_bucket}/run"
    c = tiny_config(run)
    c.log.tensorboard = True
    c.checkpoint.use_ocdbt = False  # the emulator mishandles OCDBT's conditional writes (checkpoint.py says more)
    first = train.run(c, max_epochs=1)
    assert int(first["state"]["step"]) == 1
    root = epath.Path(run)
    assert [p.name for p in (root / "checkpoints").iterdir()] == [ckpt_lib.step_name(1)]  # named by epochs done
    assert (root / "warm_base" / "params.safetensors").exists()
    assert (root / "lora" / ckpt_lib.step_name(1) / "lora.safetensors").exists()
    assert json.loads((root / "lora" / ckpt_lib.step_name(1) / "config.json").read_text())["lora"]["rank"] == 4
    assert any(p.name.startswith("events.out") for p in (root / "tensorboard").iterdir())
    assert (root / "samples" / "train_000001.png").read_bytes()[:4] == b"\x89PNG"
    assert len((root / "metrics.jsonl").read_text().splitlines()) >= 1
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(tmp_path, "gs:"))

    resumed = train.run(c)  # num_epochs=2: resumes after epoch 0 from the bucket
    assert int(resumed["state"]["step"]) == 2
    steps = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert steps == [ckpt_lib.step_name(1), ckpt_lib.step_name(2)]
    lines = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "optimizer_step" in x] == [1, 2]  # the first run's line kept, the second added


def test_gs_compile_cache_is_reused_by_the_next_start(gcs_bucket):
    """compile_cache_dir=gs://...: jax writes the compiled program to the bucket and a fresh process loads it."""
    from etils import epath
    from test_compile_cache import _start

    first = _start(f"{gcs_bucket}/xla")
    assert first["hits"] == 0 and first["misses"] >= 1, first
    assert any(epath.Path(f"{gcs_bucket}/xla").iterdir()), "nothing was written to the bucket"
    second = _start(f"{gcs_bucket}/xla")
    assert second["hits"] >= 1 and second["misses"] == 0, second
