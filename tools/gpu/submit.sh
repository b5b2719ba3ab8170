#!/usr/bin/env bash
# shellcheck disable=SC2034  # PROG/DRY_RUN are read by launch_common.sh
# Submit tools/gpu/slurm.sbatch with the node / GPU counts and the training arguments filled in.
set -euo pipefail
PROG="tools/gpu/submit.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../launch_common.sh
source "$ROOT/tools/launch_common.sh"

usage() {
  cat <<'USAGE'
usage: tools/gpu/submit.sh --nodes N --config configs/NAME.py[:variant] [options] [--] [--config.FIELD=VALUE ...]

Submits `sbatch ... tools/gpu/slurm.sbatch TRAIN_ARGS`: N nodes x G GPUs, one training process per GPU
(jax.distributed reads the SLURM variables). Prints each command ("+ sbatch ..."); --dry-run only prints.

  --nodes N              nodes (required)
  --gpus-per-node G      GPUs per node (default 8); also the tasks per node
  --partition P          --account A   --qos Q   --time HH:MM:SS (default 24:00:00)   --job-name NAME (edit_r1)
  --cpus-per-task C      (default 8)
  --python PATH          python with the package installed (default: ROOT/.venv/bin/python if it exists, else python)
  --log-dir DIR          per-task logs (default ROOT/runs/slurm_logs)
  --config CFG           configs/NAME.py[:variant] (required)
  --model-dir D  --reward-dir D  --data-root D  --run-dir D     shortcuts for the matching --config.* fields
  --dry-run  -h|--help

Example:
  tools/gpu/submit.sh --nodes 3 --partition gpu --config configs/kontext_mllm.py \
      --model-dir /data/kontext --reward-dir /data/qwen7b --data-root /data/edit -- --config.mesh.fsdp=8
USAGE
}

NODES="" GPUS=8 PARTITION="" ACCOUNT="" QOS="" TIME="24:00:00" JOB_NAME="edit_r1" CPUS=8 PYTHON="" LOG_DIR=""
CONFIG="" MODEL="" REWARD="" DATA="" RUN_DIR="" OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --nodes|--gpus-per-node|--partition|--account|--qos|--time|--job-name|--cpus-per-task|--python|--log-dir|\
    --config|--model-dir|--reward-dir|--data-root|--run-dir)
      need_value "$1" $#
      case $1 in
        --nodes) NODES=$2 ;; --gpus-per-node) GPUS=$2 ;; --partition) PARTITION=$2 ;; --account) ACCOUNT=$2 ;;
        --qos) QOS=$2 ;; --time) TIME=$2 ;; --job-name) JOB_NAME=$2 ;; --cpus-per-task) CPUS=$2 ;;
        --python) PYTHON=$2 ;; --log-dir) LOG_DIR=$2 ;; --config) CONFIG=$2 ;; --model-dir) MODEL=$2 ;;
        --reward-dir) REWARD=$2 ;; --data-root) DATA=$2 ;; --run-dir) RUN_DIR=$2 ;;
      esac
      shift ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --config.*=*) OVERRIDES+=("$1") ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

require "$NODES" --nodes
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes '$NODES': a positive integer"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node '$GPUS': a positive integer"
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task '$CPUS': a positive integer"
build_train_args "$CONFIG" "$MODEL" "$REWARD" "$DATA" "$RUN_DIR" "${OVERRIDES[@]}"
if [[ -z $PYTHON ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python; fi
fi
LOG_DIR=${LOG_DIR:-$ROOT/runs/slurm_logs}

SB=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" "--ntasks-per-node=$GPUS" "--gpus-per-node=$GPUS"
    "--cpus-per-task=$CPUS" "--time=$TIME" "--output=$LOG_DIR/%x-%j.out" "--chdir=$ROOT"
    "--export=ALL,EDIT_R1_ROOT=$ROOT,EDIT_R1_PYTHON=$PYTHON,EDIT_R1_LOG_DIR=$LOG_DIR")
[[ -n $PARTITION ]] && SB+=("--partition=$PARTITION")
[[ -n $ACCOUNT ]] && SB+=("--account=$ACCOUNT")
[[ -n $QOS ]] && SB+=("--qos=$QOS")

note "$NODES node(s) x $GPUS GPU(s) = $((NODES * GPUS)) processes, one per GPU"
run mkdir -p "$LOG_DIR"
# TRAIN_ARGS starts with "-m edit_r1_jax.train"; slurm.sbatch adds those itself.
run "${SB[@]}" "$ROOT/tools/gpu/slurm.sbatch" "${TRAIN_ARGS[@]:2}"
