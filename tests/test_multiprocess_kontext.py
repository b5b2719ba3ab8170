"""The paper path on 2 processes x 4 CPU devices equals 1 process x 8 devices, and resumes across the layouts.

Tiny converted FLUX.1-Kontext pipeline + text cache + tiny Qwen2.5-VL reward (micro-batches of 4), low-variance
filter on, 2 epochs. The processes are started as tools/gpu/ssh_launch.sh starts them (EDIT_R1_* environment);
gloo carries the CPU collectives. Three launches: the 2x4 run and the 1x8 reference at once, then a 1x8 run that
resumes the 2x4 run's epoch-0 checkpoint.

Tolerances: both layouts compile the same partitioned programs over the same 8-device mesh, but XLA:CPU's
float32 results differ at rounding level between them (the thread partitioning of a 4-device and an 8-device
process differs, and gloo sums the gradient all-reduce in another order). The reward quantises the decoded
images to uint8 levels before the judge (as the reference client does), so a rounding difference that crosses a
level flips a pixel by 1/255, which moves this tiny, deliberately sensitive judge's score by up to ~1e-3 (seen:
2 of 8 samples by 6e-4 in epoch 0, 4 of 8 by up to 7e-4 in epoch 1 after a training step whose gradient
all-reduce rounds differently; the others equal to 1e-6 or exactly). So per epoch: at least 3 of the 8 rewards
equal to 1e-5 (a wrong data share, gather order or prompt would move nearly every sample by the rewards' own
spread, ~5e-3) and the max |difference| <= 3e-3; the sampled rows equal exactly; the filter's mask and ban set follow the paper rule on each run's own
rewards; the LoRA of both runs trained and agrees to 5% of its update (seen: 0.9%) (the filter decisions and r inherit the
flips, so bit-level agreement downstream is not expected). The resume must draw exactly the rows and bans the
uninterrupted run drew.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("mp_kontext_worker.py"))
ROOT = str(Path(__file__).resolve().parent.parent)
PROMPTS = ["make the sky red", "turn the cat into a dog", "add a hat", "remove the tree"]


@pytest.fixture(scope="session")
def kontext_fixtures(tmp_path_factory):
    from edit_r1_jax.embed_text import build_cache
    from kontext_tiny import RESOLUTION, T5_LENGTH, save_and_convert
    from qwen_fixtures import convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("kontext_mp")
    _, model_dir = save_and_convert(tmp)
    data = tmp / "data"
    rng = np.random.default_rng(0)
    (data / "images").mkdir(parents=True)
    for split, n in (("train", 8), ("test", 2)):
        lines = []
        for i in range(n):
            path = f"images/{split}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (80, 96, 3), np.uint8)).save(data / path)
            lines.append(json.dumps({"prompt": PROMPTS[i % 4], "image": path, "requirement": "keep the rest"}))
        (data / f"{split}_metadata.jsonl").write_text("\n".join(lines) + "\n")
        build_cache(model_dir, data, split, t5_length=T5_LENGTH)
    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp())
    save_tiny_checkpoint(tmp / "qwen_hf", tok)
    qwen = convert_cli(tmp / "qwen_hf", tmp / "qwen")
    # std_thres: groups of 2 rollouts whose scores differ by less than this are "low variance"; mean_thres 0
    # makes every such group filtered (paper rule), so the ban set is decided by the rewards alone.
    fx = dict(model=str(model_dir), data=str(data), qwen=str(qwen), resolution=RESOLUTION, t5_length=T5_LENGTH,
              std_thres=2e-3)
    path = tmp / "fixtures.json"
    path.write_text(json.dumps(fx))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fx, run_dir, epochs, out, devices, nproc=1, pid=0, port=0):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT)
    for k in ("EDIT_R1_COORDINATOR", "EDIT_R1_NUM_PROCESSES", "EDIT_R1_PROCESS_ID"):
        env.pop(k, None)
    if nproc > 1:
        env.update(EDIT_R1_COORDINATOR=f"127.0.0.1:{port}", EDIT_R1_NUM_PROCESSES=str(nproc),
                   EDIT_R1_PROCESS_ID=str(pid))
    return subprocess.Popen([sys.executable, WORKER, str(fx), str(run_dir), str(epochs), str(out)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=1500):
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-5000:]


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _paper_filter(rows, rewards, std_thres, mean_thres=0.0):
    """The paper rule written out independently: a group (row id) is filtered iff std < thr and mean > thr."""
    mask, banned = np.ones(len(rows)), set()
    for g in np.unique(rows):
        sel = rows == g
        if rewards[sel].std() < std_thres and rewards[sel].mean() > mean_thres:
            mask[sel], banned = 0.0, banned | {int(g)}
    return mask, banned


def _assert_close_rewards(x, y, what):
    d = np.abs(np.asarray(x) - np.asarray(y))
    print(what, "reward |diff| median", float(np.median(d)), "max", float(d.max()))
    assert np.sum(d <= 1e-5) >= 3 and d.max() <= 3e-3, (what, d)


def _theta(a):
    return {k: v for k, v in a.items() if k.startswith("theta/")}


def _assert_same(a, b):
    for e in (0, 1):
        if e == 1 and not np.array_equal(a["e0_banned"], b["e0_banned"]):
            break  # a filter decision at its threshold flipped: epoch 1 drew other rows
        np.testing.assert_array_equal(a[f"e{e}_rows"], b[f"e{e}_rows"])
        _assert_close_rewards(a[f"e{e}_rewards"], b[f"e{e}_rewards"], f"epoch {e}")
    ta, tb = _theta(a), _theta(b)
    assert ta and sorted(ta) == sorted(tb)
    delta = np.sqrt(sum(float(np.sum((ta[k] - tb[k]) ** 2)) for k in ta))
    size = np.sqrt(sum(float(np.sum(ta[k] ** 2)) for k in ta if "lora_b" in k))
    print("LoRA |theta_2x4 - theta_1x8| =", delta, "|lora_b| =", size)
    assert size > 0 and delta <= 0.05 * size
    for x in (a, b):
        assert np.all(np.isfinite(x["policy_loss"]))


def test_paper_path_two_processes_match_one_and_resume(kontext_fixtures, tmp_path):
    fx = kontext_fixtures
    std_thres = json.loads(Path(fx).read_text())["std_thres"]
    port = _free_port()
    procs = [_launch(fx, tmp_path / "two", 2, tmp_path / "two.npz", 4, 2, i, port) for i in range(2)]
    procs.append(_launch(fx, tmp_path / "one", 2, tmp_path / "one.npz", 8))
    _wait(procs)
    a, b = _load(tmp_path / "two.npz"), _load(tmp_path / "one.npz")
    assert (int(a["processes"]), int(a["devices"]), int(b["processes"]), int(b["devices"])) == (2, 8, 1, 8)
    assert int(a["step"]) == int(b["step"]) == 2 and list(a["epochs"]) == [0, 1]
    _assert_same(a, b)
    # The filter: masked samples and the ban set follow the paper rule on the epoch's rewards, and the sampler
    # never draws a banned row again.
    for x in (a, b):
        banned = set()
        for e in (0, 1):
            mask, ban = _paper_filter(x[f"e{e}_rows"], x[f"e{e}_rewards"], std_thres)
            np.testing.assert_array_equal(x[f"e{e}_mask"], mask)
            assert not banned & set(x[f"e{e}_rows"].tolist())
            banned |= ban
            assert set(x[f"e{e}_banned"].tolist()) == banned
        print("filter: masked fraction per epoch", [float(1 - x[f"e{e}_mask"].mean()) for e in (0, 1)],
              "banned", sorted(banned))

    # Resume on 1 x 8 from the 2 x 4 run's epoch-0 checkpoint: the same epoch 1 and the same final LoRA.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    shutil.rmtree(resumed / "checkpoints" / "1")
    _wait([_launch(fx, resumed, 2, tmp_path / "resumed.npz", 8)])
    r = _load(tmp_path / "resumed.npz")
    assert int(r["step"]) == 2 and list(r["epochs"])[-1] == 1
    np.testing.assert_array_equal(r["e0_rows"], a["e1_rows"])  # sampler state and ban set restored exactly
    assert set(a["e0_banned"].tolist()) <= set(r["e0_banned"].tolist())
    _assert_close_rewards(r["e0_rewards"], a["e1_rewards"], "resumed epoch 1")  # theta_old restored exactly
