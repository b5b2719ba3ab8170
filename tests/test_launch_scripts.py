"""Launch scripts (tools/tpu/pod.sh, tools/gpu/*): --help, --dry-run output, argument errors. No network.

``gcloud``/``ssh``/``sbatch``/``srun`` are replaced by stubs on PATH that record any call: a dry run must print
the commands and call none of them.
"""

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POD = ROOT / "tools/tpu/pod.sh"
SUBMIT = ROOT / "tools/gpu/submit.sh"
SBATCH = ROOT / "tools/gpu/slurm.sbatch"
SSH = ROOT / "tools/gpu/ssh_launch.sh"
TPU = ["--name", "edit-r1", "--zone", "us-east5-a"]


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for tool in ("gcloud", "ssh", "sbatch", "srun", "scp"):
        p = bin_dir / tool
        p.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_dir, calls


def sh(stubs, script, *args, check=True):
    bin_dir, calls = stubs
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("TPU_ZONE", None), env.pop("TPU_PROJECT", None)
    p = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
        assert not calls.exists(), f"dry run called a tool: {calls.read_text()}"
    return p


def commands(out: str) -> list[list[str]]:
    """The '+ ' lines of a dry run, split like the shell would."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def flag(cmd, name):
    vals = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(vals) == 1, (name, cmd)
    return vals[0]


@pytest.mark.parametrize("script,sub", [(POD, []), (POD, ["launch"]), (SUBMIT, []), (SSH, []), (SBATCH, [])])
def test_help(stubs, script, sub):
    p = sh(stubs, script, *sub, "--help")
    assert p.stdout.startswith("usage:")
    assert "--dry-run" in p.stdout


@pytest.mark.parametrize("tpu_type,chips,workers,runtime", [
    ("v5p-64", 32, 8, "v2-alpha-tpuv5"), ("v6e-64", 64, 16, "v2-alpha-tpuv6e"), ("v6e-8", 8, 1, "v2-alpha-tpuv6e")])
def test_pod_create(stubs, tpu_type, chips, workers, runtime):
    p = sh(stubs, POD, "create", *TPU, "--type", tpu_type, "--spot", "--dry-run")
    assert f"# {tpu_type}: {chips} chips, {workers} worker VM(s)" in p.stdout
    [cmd] = commands(p.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "edit-r1"]
    assert flag(cmd, "--accelerator-type") == tpu_type
    assert flag(cmd, "--version") == runtime
    assert flag(cmd, "--zone") == "us-east5-a"
    assert "--spot" in cmd


def test_pod_create_queued_and_delete(stubs):
    [cmd] = commands(sh(stubs, POD, "create", *TPU, "--type", "v5p-128", "--queued", "--dry-run").stdout)
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert flag(cmd, "--node-id") == "edit-r1" and flag(cmd, "--runtime-version") == "v2-alpha-tpuv5"
    [cmd] = commands(sh(stubs, POD, "delete", *TPU, "--dry-run").stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "edit-r1"] and "--quiet" in cmd


def test_pod_setup_and_stage(stubs):
    [cmd] = commands(sh(stubs, POD, "setup", *TPU, "--repo", "https://example.com/x.git", "--ref", "v1",
                        "--dry-run").stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "edit-r1"]
    assert "--worker=all" in cmd
    remote = flag(cmd, "--command")
    assert "git clone -q https://example.com/x.git" in remote and "git fetch -q origin v1" in remote
    assert "'jax[tpu]" in remote and "-e ." in remote
    [cmd] = commands(sh(stubs, POD, "stage", *TPU, "--model", "gs://b/kontext", "--data", "gs://b/data",
                        "--dry-run").stdout)
    remote = flag(cmd, "--command")
    assert "--worker=all" in cmd
    assert 'gcloud storage rsync --recursive gs://b/kontext "$HOME"/edit_r1_data/model' in remote
    assert 'gcloud storage rsync --recursive gs://b/data "$HOME"/edit_r1_data/data' in remote


def test_pod_setup_wheel(stubs, tmp_path):
    wheel = tmp_path / "edit_r1_jax-0.1.0-py3-none-any.whl"
    wheel.write_text("")
    cmds = commands(sh(stubs, POD, "setup", *TPU, "--wheel", str(wheel), "--dry-run").stdout)
    scps = [c for c in cmds if c[4] == "scp"]
    assert [c[5] for c in scps] == [str(wheel), "--recurse"]
    assert all("--worker=all" in c for c in cmds)
    assert wheel.name in flag(cmds[-1], "--command")


def test_pod_launch(stubs):
    p = sh(stubs, POD, "launch", *TPU, "--config", "configs/kontext_mllm.py:ban_prompt", "--staged",
           "~/edit_r1_data", "--run-dir", "gs://b/runs", "--env", "FOO=bar", "--dry-run", "--",
           "--config.mesh.data=8", "--config.mesh.fsdp=4")
    [cmd] = commands(p.stdout)
    assert "--worker=all" in cmd
    remote = flag(cmd, "--command")
    train = "nohup " + remote.split("nohup ", 1)[1]
    words = shlex.split(train.split(">")[0])
    i = words.index("-m")
    assert words[i + 1] == "edit_r1_jax.train"
    assert words[i + 2:i + 4] == ["--config", "configs/kontext_mllm.py:ban_prompt"]
    assert "--config.mesh.data=8" in words and "--config.mesh.fsdp=4" in words
    assert "--config.run_dir=gs://b/runs" in words
    assert "--config.compile_cache_dir=gs://b/runs/xla_cache" in words  # jax writes from process 0 only: shared
    assert "nohup" in words and "FOO=bar" in words
    assert '--config.model.dir="$HOME"/edit_r1_data/model' in train  # expanded on the worker, not here
    assert '> "$HOME"/edit_r1_train.log 2>&1' in remote


def _pod_train_words(stubs, *args):
    [cmd] = commands(sh(stubs, POD, "launch", *TPU, "--config", "configs/kontext_mllm.py", "--dry-run", *args).stdout)
    train = "nohup " + flag(cmd, "--command").split("nohup ", 1)[1]
    return shlex.split(train.split(">")[0])


def test_pod_launch_compile_cache(stubs):
    """Only a bucket run dir brings a shared compile cache; an explicit field is passed once, unchanged; a local
    run dir leaves the trainer's default (each worker's ~/.cache)."""
    words = _pod_train_words(stubs, "--run-dir", "gs://b/runs/", "--", "--config.compile_cache_dir=gs://c/xla")
    assert [w for w in words if w.startswith("--config.compile_cache_dir")] == ["--config.compile_cache_dir=gs://c/xla"]
    words = _pod_train_words(stubs, "--run-dir", "gs://b/runs/")
    assert [w for w in words if w.startswith("--config.compile_cache_dir")] == [
        "--config.compile_cache_dir=gs://b/runs/xla_cache"]
    words = _pod_train_words(stubs, "--run-dir", "/mnt/runs")
    assert not [w for w in words if w.startswith("--config.compile_cache_dir")]


def test_pod_logs(stubs):
    [cmd] = commands(sh(stubs, POD, "logs", *TPU, "--worker", "all", "--follow", "--dry-run").stdout)
    assert "--worker=all" in cmd and flag(cmd, "--command").startswith("tail -n 100 -F ")
    [cmd] = commands(sh(stubs, POD, "logs", *TPU, "--dry-run").stdout)
    assert "--worker=0" in cmd


@pytest.mark.parametrize("script,args,missing", [
    (POD, ["create", "--zone", "z", "--type", "v5p-64"], "--name"),
    (POD, ["create", "--name", "a", "--type", "v5p-64"], "--zone"),
    (POD, ["create", "--name", "a", "--zone", "z"], "--type"),
    (POD, ["launch", "--name", "a", "--zone", "z"], "--config"),
    (POD, ["setup", "--name", "a", "--zone", "z"], "--repo"),
    (POD, [], "SUBCOMMAND"),
    (SUBMIT, ["--config", "configs/kontext_mllm.py"], "--nodes"),
    (SUBMIT, ["--nodes", "2"], "--config"),
    (SSH, ["--config", "configs/kontext_mllm.py"], "--hosts"),
    (SSH, ["--hosts", "a,b"], "--config"),
    (SBATCH, [], "--config"),
])
def test_missing_argument(stubs, script, args, missing):
    p = sh(stubs, script, *args, "--dry-run", check=False)
    assert p.returncode == 2
    assert f"missing required argument {missing}" in p.stderr
    assert p.stdout.count("+ ") == 0


@pytest.mark.parametrize("script,args,message", [
    (POD, ["create", *TPU, "--type", "v5p-60"], "multiples of 8"),
    (POD, ["create", *TPU, "--type", "tpu9-8"], "expected v5p-N"),
    (POD, ["launch", *TPU, "--config", "c.py", "--", "--mesh=1"], "must look like --config.FIELD=VALUE"),
    (SUBMIT, ["--nodes", "0", "--config", "c.py"], "--nodes '0'"),
])
def test_bad_argument(stubs, script, args, message):
    p = sh(stubs, script, *args, "--dry-run", check=False)
    assert p.returncode == 2 and message in p.stderr


def test_submit(stubs):
    p = sh(stubs, SUBMIT, "--nodes", "3", "--gpus-per-node", "8", "--partition", "gpu", "--config",
           "configs/kontext_mllm.py", "--model-dir", "/data/k", "--dry-run", "--", "--config.mesh.fsdp=8")
    assert "24 processes" in p.stdout
    cmd = [c for c in commands(p.stdout) if c[0] == "sbatch"][0]
    assert flag(cmd, "--nodes") == "3"
    assert flag(cmd, "--gpus-per-node") == "8" and flag(cmd, "--ntasks-per-node") == "8"
    assert flag(cmd, "--partition") == "gpu"
    i = cmd.index(str(SBATCH))
    assert cmd[i + 1:] == ["--config", "configs/kontext_mllm.py", "--config.model.dir=/data/k",
                           "--config.mesh.fsdp=8"]


def test_sbatch_script(stubs):
    text = SBATCH.read_text()
    for directive in ("#SBATCH --nodes=", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"):
        assert directive in text
    p = sh(stubs, SBATCH, "--dry-run", "--config", "configs/kontext_mllm.py", "--config.train.micro_batch_size=24")
    [srun] = [c for c in commands(p.stdout) if c[0] == "srun"]
    i = srun.index("-m")
    assert srun[i + 1:] == ["edit_r1_jax.train", "--config", "configs/kontext_mllm.py",
                            "--config.train.micro_batch_size=24"]
    assert any(c[:2] == ["export", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92"] for c in commands(p.stdout))


def test_ssh_launch(stubs, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nalice@gpu-a\ngpu-b\n\ngpu-c  # last\n")
    p = sh(stubs, SSH, "--hostfile", str(hostfile), "--port", "2222", "--dir", "/shared/edit_r1_jax",
           "--config", "configs/kontext_mllm.py", "--data-root", "/shared/data", "--dry-run",
           "--config.mesh.data=24")
    cmds = commands(p.stdout)
    assert [c[-2] for c in cmds] == ["alice@gpu-a", "gpu-b", "gpu-c"]
    for i, c in enumerate(cmds):
        assert c[0] == "ssh"
        words = shlex.split(c[-1].split(">")[0])
        assert words[:2] == ["cd", "/shared/edit_r1_jax"]
        assert "EDIT_R1_COORDINATOR=gpu-a:2222" in words
        assert "EDIT_R1_NUM_PROCESSES=3" in words
        assert f"EDIT_R1_PROCESS_ID={i}" in words
        j = words.index("-m")
        assert words[j - 1] == "/shared/edit_r1_jax/.venv/bin/python"
        assert words[j + 1:] == ["edit_r1_jax.train", "--config", "configs/kontext_mllm.py",
                                 "--config.data.root=/shared/data", "--config.mesh.data=24"]
        assert f"/tmp/edit_r1_train.{i}.log" in c[-1]
    stop = commands(sh(stubs, SSH, "--hosts", "gpu-a,gpu-b", "--stop", "--dry-run").stdout)
    assert len(stop) == 2 and "kill" in stop[1][-1] and "/tmp/edit_r1_train.1.pid" in stop[1][-1]


def test_without_dry_run_the_tools_are_called(stubs):
    """The counter-check of the stubs: a real run calls gcloud with the printed arguments."""
    bin_dir, calls = stubs
    p = sh(stubs, POD, "delete", *TPU, check=False)
    assert p.returncode == 0, p.stderr
    assert calls.read_text().split() == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "edit-r1",
                                         "--zone=us-east5-a", "--quiet"]
