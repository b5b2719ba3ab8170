"""The paper path on 2 processes x 4 CPU devices equals 1 process x 8 devices, and resumes across the layouts.

Tiny converted FLUX.1-Kontext pipeline + text cache + tiny Qwen2.5-VL reward (micro-batches of 4), low-variance
filter on, 2 epochs. The processes are started as tools/gpu/ssh_launch.sh starts them (EDIT_R1_* environment);
gloo carries the CPU collectives. Three launches: the 2x4 run and the 1x8 reference at once, then a 1x8 run that
resumes the 2x4 run's epoch-0 checkpoint.

What differs between the layouts, and why (measured): both compile the same partitioned programs over the same
8-device mesh (data=8, one sample per device, same global device order, the same reward micro-batch and
prompt padding). Each layout is bitwise reproducible from run to run, but across the layouts the rollouts x0
differ at float32 rounding level (<= 5e-7 on values ~1, every sample, in both epochs, no growth), so XLA:CPU
does not execute the per-device programs of the 2 x 4 and 1 x 8 jobs bit for bit alike. Not pinned down:
probes of matmul, softmax, layer-norm and convolution programs on 4 vs 8 devices of one process were bitwise
equal, so it is something in the real graph or in the multi-process (gloo) client. The gradient all-reduce also
sums in another order. The reward quantises the decoded images to uint8 levels before the judge (as the
reference client does), which absorbs these differences: 6 of 8 rewards are exactly equal in each epoch, and
the 2 whose decoded images cross a level (a pixel moves by 1/255) move this tiny, deliberately sensitive
judge's score by up to 7e-4.

Tolerances, per epoch: rows drawn equal exactly; x0 within 1e-5 (rounding level, not a data or key error, which
moves x0 by O(1)); at least 4 of 8 rewards equal to 1e-6 and the max |difference| <= 2e-3 (seen: 6 of 8
exactly, max 7e-4, in every comparison; a wrong data share, gather order or prompt moves nearly every sample by
the rewards' spread, ~5e-3); each run's r is the paper's
formula on its own rewards (to 1e-9), and the cross-layout r difference is within the bound that the reward
differences imply through that formula; the filter's mask and ban set are equal across layouts and follow the
paper rule. std_thres sits in a gap of the fixture's group stds that is wider than the reward differences (the
test checks the margin, so a filter decision cannot flip between layouts; a flip sends epoch 1 to other rows and
was what made the old comparison loose). The train/* losses and the final LoRA then differ only through the
r differences and rounding. The losses to 1e-5 relative (seen 1e-7: each epoch's single step starts at
theta = theta_old, where the positive and negative branches coincide and r cancels from the loss value); the
LoRA to 2% of its update (seen 1.2%: r does weigh the gradient, and the unmasked group's r differs by 8e-3).
The resume (1 x 8 from the 2 x 4 run's epoch-0 checkpoint) must draw exactly the rows the uninterrupted run
drew, with the same tolerances, and end at its LoRA to 1e-3 of the update when epoch 1's rewards came out equal
on both layouts (seen 5e-5: the same theta_old, so only rounding-level differences remain). Epoch 1 is itself a
cross-layout comparison, so a decoded pixel may cross a uint8 level there too: seen once (one reward moved by
1.3e-4, the LoRA by 1.01e-3 of the update), and then the cross-layout 2% applies.
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from devices import ROOT, env as device_env

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("mp_kontext_worker.py"))
# The fixture's epoch-0 group stds are 1.1e-3, 1.5e-3, 1.8e-3 (2.1e-3 on 2 x 4) and 3.8e-3 (3.4e-3), epoch 1's
# <= 5e-4 and 5e-3: this threshold is >= 6e-4 from each, more than a group std moves between the layouts
# (<= 3.5e-4 seen). The old 2e-3 sat inside that noise: group 4 was banned on one layout only.
STD_THRES = 2.75e-3
MARGIN = 5e-4
A_MAX = 5.0  # train.adv_clip_max of configs/kontext_mllm.py


@pytest.fixture(scope="session")
def kontext_fixtures(tmp_path_factory):
    from edit_dataset import write_dataset
    from edit_r1_jax.embed_text import build_cache
    from kontext_tiny import RESOLUTION, T5_LENGTH, save_and_convert
    from qwen_fixtures import convert_cli, qwen_tokenizer_dir, save_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("kontext_mp")
    _, model_dir = save_and_convert(tmp)
    data = write_dataset(tmp / "data", (("train", 8), ("test", 2)))
    for split in ("train", "test"):
        build_cache(model_dir, data, split, t5_length=T5_LENGTH)
    tok = qwen_tokenizer_dir(tmp_path_factory.getbasetemp())
    save_tiny_checkpoint(tmp / "qwen_hf", tok)
    qwen = convert_cli(tmp / "qwen_hf", tmp / "qwen")
    # std_thres: groups of 2 rollouts whose scores differ by less than this are "low variance"; mean_thres 0
    # makes every such group filtered (paper rule), so the ban set is decided by the rewards alone.
    fx = dict(model=str(model_dir), data=str(data), qwen=str(qwen), resolution=RESOLUTION, t5_length=T5_LENGTH,
              std_thres=STD_THRES)
    path = tmp / "fixtures.json"
    path.write_text(json.dumps(fx))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(fx, run_dir, epochs, out, devices, nproc=1, pid=0, port=0):
    env = device_env(devices)
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
    print(what, "reward |diff| per sample", d.tolist())
    assert np.sum(d <= 1e-6) >= 4 and d.max() <= 2e-3, (what, d)


def _paper_r(rows, rewards):
    """r written out from the paper (global std, clip to A_max, r = A / (2 A_max) + 1/2); also returns the
    pieces for the cross-layout bound."""
    rewards = np.asarray(rewards, np.float64)
    mu = np.array([rewards[rows == g].mean() for g in rows])
    sigma = rewards.std() + 1e-4
    a = (rewards - mu) / sigma
    return np.clip(np.clip(a, -A_MAX, A_MAX) / (2 * A_MAX) + 0.5, 0, 1), mu, sigma, a


def _assert_close_r(rows, ra, rb, rew_a, rew_b, what):
    """r_a - r_b follows from (A_a - A_b) = ((dR - dmu) - A_b dsigma) / sigma_a and clipping being 1-Lipschitz."""
    pa, mu_a, s_a, _ = _paper_r(rows, rew_a)
    pb, mu_b, s_b, a_b = _paper_r(rows, rew_b)
    np.testing.assert_allclose(ra, pa, rtol=0, atol=1e-9, err_msg=what)
    np.testing.assert_allclose(rb, pb, rtol=0, atol=1e-9, err_msg=what)
    bound = (np.abs(rew_a - rew_b) + np.abs(mu_a - mu_b) + np.abs(a_b) * abs(s_a - s_b)) / s_a / (2 * A_MAX)
    d = np.abs(np.asarray(ra) - np.asarray(rb))
    print(what, "r |diff|", d.tolist(), "bound", bound.tolist())
    assert np.all(d <= bound + 1e-9), (what, d, bound)


def _assert_margin(rows, rewards, what):
    stds = np.array([np.asarray(rewards)[rows == g].std() for g in np.unique(rows)])
    assert np.all(np.abs(stds - STD_THRES) > MARGIN), (
        f"{what}: a group std {stds} is within {MARGIN} of std_thres {STD_THRES}: the fixture's rewards moved; "
        f"pick a std_thres in a wider gap so that the filter decisions cannot flip between layouts")


def _theta(a):
    return {k: v for k, v in a.items() if k.startswith("theta/")}


def _assert_lora_close(a, b, what, rel=0.02):
    ta, tb = _theta(a), _theta(b)
    assert ta and sorted(ta) == sorted(tb)
    delta = np.sqrt(sum(float(np.sum((ta[k] - tb[k]) ** 2)) for k in ta))
    size = np.sqrt(sum(float(np.sum(ta[k] ** 2)) for k in ta if "lora_b" in k))
    print(what, "LoRA |theta_a - theta_b| =", delta, "|lora_b| =", size, "ratio", delta / size)
    assert size > 0 and delta <= rel * size


def _assert_epoch(a, b, ea, eb, what):
    rows = a[f"e{ea}_rows"]
    np.testing.assert_array_equal(rows, b[f"e{eb}_rows"])
    dx = np.abs(a[f"e{ea}_x0"] - b[f"e{eb}_x0"]).max()
    print(what, "x0 max |diff|", float(dx))
    assert dx <= 1e-5, (what, dx)
    ra, rb = a[f"e{ea}_rewards"], b[f"e{eb}_rewards"]
    _assert_close_rewards(ra, rb, what)
    _assert_margin(rows, rb, what)
    _assert_close_r(rows, a[f"e{ea}_r"], b[f"e{eb}_r"], ra, rb, what)
    np.testing.assert_array_equal(a[f"e{ea}_mask"], b[f"e{eb}_mask"])
    np.testing.assert_array_equal(a[f"e{ea}_banned"], b[f"e{eb}_banned"])


def _assert_losses(a, b, ea, eb, what, rel=1e-5):
    keys = sorted(k for k in a if k.startswith("train/") and "loss" in k)
    assert "train/policy_loss" in keys and keys == sorted(k for k in b if k.startswith("train/") and "loss" in k)
    for k in keys:
        x, y = float(a[k][ea]), float(b[k][eb])
        print(what, k, x, y)
        assert np.isfinite(x) and abs(x - y) <= rel * abs(y) + 1e-6, (what, k, x, y)


def test_paper_path_two_processes_match_one_and_resume(kontext_fixtures, tmp_path):
    fx = kontext_fixtures
    port = _free_port()
    procs = [_launch(fx, tmp_path / "two", 2, tmp_path / "two.npz", 4, 2, i, port) for i in range(2)]
    procs.append(_launch(fx, tmp_path / "one", 2, tmp_path / "one.npz", 8))
    _wait(procs)
    a, b = _load(tmp_path / "two.npz"), _load(tmp_path / "one.npz")
    assert (int(a["processes"]), int(a["devices"]), int(b["processes"]), int(b["devices"])) == (2, 8, 1, 8)
    assert int(a["step"]) == int(b["step"]) == 2 and list(a["epochs"]) == [0, 1]
    for e in (0, 1):
        _assert_epoch(a, b, e, e, f"epoch {e}")
        _assert_losses(a, b, e, e, f"epoch {e}")
    _assert_lora_close(a, b, "2x4 vs 1x8")
    # The filter: masked samples and the ban set follow the paper rule on the epoch's rewards, and the sampler
    # never draws a banned row again.
    for x in (a, b):
        banned = set()
        for e in (0, 1):
            mask, ban = _paper_filter(x[f"e{e}_rows"], x[f"e{e}_rewards"], STD_THRES)
            np.testing.assert_array_equal(x[f"e{e}_mask"], mask)
            assert not banned & set(x[f"e{e}_rows"].tolist())
            banned |= ban
            assert set(x[f"e{e}_banned"].tolist()) == banned
        print("filter: masked fraction per epoch", [float(1 - x[f"e{e}_mask"].mean()) for e in (0, 1)],
              "banned", sorted(banned))
    assert 0 < a["e0_mask"].mean() < 1 and a["e1_mask"].mean() < 1  # the filter really masked some rows

    # Resume on 1 x 8 from the 2 x 4 run's epoch-0 checkpoint: the same epoch 1 and the same final LoRA.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    from edit_r1_jax.checkpoint import step_name

    shutil.rmtree(resumed / "checkpoints" / step_name(2))  # keep the epoch-0 checkpoint (1 epoch done)
    if (resumed / "lora" / step_name(2)).exists():
        shutil.rmtree(resumed / "lora" / step_name(2))
    _wait([_launch(fx, resumed, 2, tmp_path / "resumed.npz", 8)])
    r = _load(tmp_path / "resumed.npz")
    assert int(r["step"]) == 2 and list(r["epochs"])[-1] == 1
    _assert_epoch(r, a, 0, 1, "resumed epoch 1")  # sampler state, ban set and theta_old restored exactly
    _assert_losses(r, a, -1, 1, "resumed epoch 1")
    rewards_equal = np.abs(r["e0_rewards"] - a["e1_rewards"]).max() <= 1e-6
    _assert_lora_close(r, a, "resumed vs 2x4", rel=1e-3 if rewards_equal else 0.02)
