#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2088,SC2034  # ~/ and $HOME expand on the workers; PROG/DRY_RUN are read by launch_common.sh
# Cloud TPU VM slice lifecycle for edit_r1_jax: create -> setup -> stage -> launch -> logs -> stop -> delete.
set -euo pipefail
PROG="tools/tpu/pod.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../launch_common.sh
source "$HERE/../launch_common.sh"

usage() {
  cat <<'USAGE'
usage: tools/tpu/pod.sh SUBCOMMAND --name NAME --zone ZONE [--project P] [--dry-run] [options]

Every subcommand prints each command before running it ("+ gcloud ..."); --dry-run prints them and runs
nothing. --zone and --project default to $TPU_ZONE / $TPU_PROJECT.

  create  --type v5p-64|v6e-64|...  [--version RUNTIME] [--spot] [--queued]
          Create the slice (--queued: through a queued resource; --spot: preemptible capacity). RUNTIME defaults
          to v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5-lite (v5litepod), tpu-ubuntu2204-base (v4).
          Sizes: v5p-N / v4-N count TensorCores (2 per chip): N/2 chips, 4 chips per worker VM; v6e-N and
          v5litepod-N count chips: one VM up to 8 chips, 4 chips per worker VM above that.
  setup   --repo URL [--ref REF] | --wheel FILE.whl   [--dir DIR] [--python-version 3.12] [--jax-spec SPEC]
          On every worker: install uv (TPU images ship Python 3.10; the package needs >= 3.11), make DIR/.venv,
          and install 'jax[tpu]' plus the package: `git clone URL DIR` + `pip install -e .` (--repo), or scp the
          wheel and configs/ and `pip install WHEEL` (--wheel). DIR defaults to ~/edit_r1_jax.
  stage   [--model gs://...] [--reward gs://...] [--data gs://...] [--copy gs://SRC=NAME ...] [--dst DIR]
          On every worker: `gcloud storage rsync --recursive` each source into DST/model, DST/reward, DST/data
          (DST/NAME for --copy; rsync so that a re-run after an interruption copies only what is missing).
          DST defaults to ~/edit_r1_data.
  launch  --config configs/NAME.py[:variant] [--staged DIR | --model-dir D --reward-dir D --data-root D]
          [--run-dir DIR] [--env KEY=VALUE ...] [--log FILE] [--dir DIR] [--] [--config.FIELD=VALUE ...]
          On every worker: nohup DIR/.venv/bin/python -m edit_r1_jax.train ... > LOG (one log per worker, on the
          worker's disk; default ~/edit_r1_train.log, pid in LOG.pid). jax.distributed.initialize() finds the
          other workers by itself on TPU VMs. --staged DIR = --model-dir DIR/model --reward-dir DIR/reward
          --data-root DIR/data. Use a gs:// --run-dir so that checkpoints outlive the slice.
  logs    [--worker 0|N|all] [--lines 100] [--follow] [--log FILE]     tail the training log
  stop    [--log FILE]                                                 kill the training process on every worker
  delete  [--queued]                                                   delete the slice (or the queued resource)

Example:
  tools/tpu/pod.sh create --name edit-r1 --zone us-east5-a --type v5p-64 --spot
  tools/tpu/pod.sh setup  --name edit-r1 --zone us-east5-a --repo https://github.com/ORG/edit_r1_jax.git
  tools/tpu/pod.sh stage  --name edit-r1 --zone us-east5-a --model gs://B/kontext --reward gs://B/qwen7b --data gs://B/data
  tools/tpu/pod.sh launch --name edit-r1 --zone us-east5-a --config configs/kontext_mllm.py \
      --staged '~/edit_r1_data' --run-dir gs://B/runs/kontext -- --config.mesh.data=8 --config.mesh.fsdp=4
  tools/tpu/pod.sh logs   --name edit-r1 --zone us-east5-a --follow
  tools/tpu/pod.sh delete --name edit-r1 --zone us-east5-a
USAGE
}

SUB=${1:-}
case $SUB in
  -h|--help|help) usage; exit 0 ;;
  "") usage >&2; die "missing required argument SUBCOMMAND (create, setup, stage, launch, logs, stop, delete)" ;;
  -*) die "missing required argument SUBCOMMAND (create, setup, stage, launch, logs, stop, delete) before '$SUB'" ;;
  create|setup|stage|launch|logs|stop|delete) shift ;;
  *) die "unknown SUBCOMMAND '$SUB' (create, setup, stage, launch, logs, stop, delete)" ;;
esac
PROG="tools/tpu/pod.sh $SUB"

NAME="" ZONE=${TPU_ZONE:-} PROJECT=${TPU_PROJECT:-} TYPE="" VERSION="" SPOT=0 QUEUED=0
REPO="" REF="main" WHEEL="" DIR="~/edit_r1_jax" PYVER="3.12" JAX_SPEC="jax[tpu]>=0.10.2,<0.12"
DST="~/edit_r1_data" COPIES=() CONFIG="" MODEL="" REWARD="" DATA="" RUN_DIR="" STAGED="" ENVS=()
LOG="~/edit_r1_train.log" WORKER="0" LINES=100 FOLLOW=0 OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --follow|-f) FOLLOW=1 ;;
    --name|--zone|--project|--type|--version|--repo|--ref|--wheel|--dir|--python-version|--jax-spec|--dst|\
    --model|--reward|--data|--copy|--config|--model-dir|--reward-dir|--data-root|--run-dir|--staged|--env|\
    --log|--worker|--lines)
      need_value "$1" $#
      case $1 in
        --name) NAME=$2 ;; --zone) ZONE=$2 ;; --project) PROJECT=$2 ;; --type) TYPE=$2 ;;
        --version) VERSION=$2 ;; --repo) REPO=$2 ;; --ref) REF=$2 ;; --wheel) WHEEL=$2 ;; --dir) DIR=$2 ;;
        --python-version) PYVER=$2 ;; --jax-spec) JAX_SPEC=$2 ;; --dst) DST=$2 ;;
        --model) COPIES+=("$2=model") ;; --reward) COPIES+=("$2=reward") ;; --data) COPIES+=("$2=data") ;;
        --copy) COPIES+=("$2") ;; --config) CONFIG=$2 ;; --model-dir) MODEL=$2 ;; --reward-dir) REWARD=$2 ;;
        --data-root) DATA=$2 ;; --run-dir) RUN_DIR=$2 ;; --staged) STAGED=$2 ;; --env) ENVS+=("$2") ;;
        --log) LOG=$2 ;; --worker) WORKER=$2 ;; --lines) LINES=$2 ;;
      esac
      shift ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --config.*=*) OVERRIDES+=("$1") ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

require "$NAME" --name
require "$ZONE" "--zone (or \$TPU_ZONE)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$NAME': lower-case letters, digits and '-', starting with a letter"

LOC=("--zone=$ZONE")
[[ -n $PROJECT ]] && LOC+=("--project=$PROJECT")

rp() {  # rp PATH: PATH for a remote shell command; a leading ~/ becomes "$HOME"/ so the remote shell expands it
  local p=$1
  if [[ $p == "~" ]]; then printf '"$HOME"'
  elif [[ $p == "~/"* ]]; then printf '"$HOME"/%s' "$(q "${p#\~/}")"
  else q "$p"; fi
}

rarg() {  # rarg ARG: like rp, also for --flag=~/path
  local a=$1
  if [[ $a == --*=~* ]]; then printf '%s%s' "$(q "${a%%=*}=")" "$(rp "${a#*=}")"; else rp "$a"; fi
}

on_workers() {  # on_workers WORKER REMOTE_COMMAND: run it over ssh on worker WORKER (0, N or all)
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" "--worker=$1" "--command=$2"
}

slice_info() {  # slice_info TYPE: sets CHIPS, WORKERS, RUNTIME for an accelerator type; fails on unknown ones
  local t=$1 gen size
  [[ $t =~ ^(v5p|v4|v6e|v5litepod)-([0-9]+)$ ]] || die "--type '$t': expected v5p-N, v6e-N, v5litepod-N or v4-N"
  gen=${BASH_REMATCH[1]} size=${BASH_REMATCH[2]}
  case $gen in
    v5p|v4)
      (( size >= 8 && size % 8 == 0 )) || die "--type $t: $gen sizes count TensorCores and are multiples of 8"
      CHIPS=$(( size / 2 )); WORKERS=$(( CHIPS / 4 )) ;;
    v6e|v5litepod)
      (( size >= 1 && (size & (size - 1)) == 0 )) || die "--type $t: $gen sizes are powers of two"
      CHIPS=$size
      if (( size <= 8 )); then WORKERS=1; else WORKERS=$(( size / 4 )); fi ;;
  esac
  case $gen in
    v5p) RUNTIME=v2-alpha-tpuv5 ;; v6e) RUNTIME=v2-alpha-tpuv6e ;;
    v5litepod) RUNTIME=v2-alpha-tpuv5-lite ;; v4) RUNTIME=tpu-ubuntu2204-base ;;
  esac
}

case $SUB in
create)
  require "$TYPE" "--type (e.g. v5p-64)"
  slice_info "$TYPE"
  VERSION=${VERSION:-$RUNTIME}
  note "$TYPE: $CHIPS chips, $WORKERS worker VM(s), runtime $VERSION"
  extra=()
  [[ $SPOT == 1 ]] && extra+=(--spot)
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources create "$NAME" "--node-id=$NAME" "${LOC[@]}" \
      "--accelerator-type=$TYPE" "--runtime-version=$VERSION" "${extra[@]}"
    note "wait for state ACTIVE: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE"
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" "--accelerator-type=$TYPE" "--version=$VERSION" \
      "${extra[@]}"
  fi
  ;;
setup)
  [[ -n $REPO || -n $WHEEL ]] || die "missing required argument --repo URL or --wheel FILE"
  [[ -n $REPO && -n $WHEEL ]] && die "give --repo or --wheel, not both"
  d=$(rp "$DIR")
  uv='curl -LsSf https://astral.sh/uv/install.sh | sh && export PATH="$HOME/.local/bin:$PATH"'
  venv="uv venv -q --allow-existing --python $(q "$PYVER") $d/.venv"
  pip="uv pip install -q --python $d/.venv/bin/python"
  if [[ -n $REPO ]]; then
    on_workers all "set -e; $uv; (test -d $d/.git || git clone -q $(q "$REPO") $d); cd $d; git fetch -q origin $(q "$REF"); git checkout -q --detach FETCH_HEAD; $venv; $pip $(q "$JAX_SPEC") -e ."
  else
    [[ $WHEEL == *.whl ]] || die "--wheel '$WHEEL' is not a .whl file"
    [[ -f $WHEEL ]] || die "--wheel '$WHEEL' does not exist (build it with: python -m pip wheel --no-deps -w dist .)"
    [[ -d configs ]] || die "run from the repository root (configs/ is copied next to the wheel)"
    on_workers all "mkdir -p $d"
    w=$(basename "$WHEEL")
    dest=${DIR#\~/}
    run gcloud compute tpus tpu-vm scp "$WHEEL" "$NAME:$dest/$w" "${LOC[@]}" --worker=all
    run gcloud compute tpus tpu-vm scp --recurse configs "$NAME:$dest/" "${LOC[@]}" --worker=all
    on_workers all "set -e; $uv; $venv; $pip $(q "$JAX_SPEC") $d/$(q "$w")"
  fi
  ;;
stage)
  [[ ${#COPIES[@]} -gt 0 ]] || die "missing required argument: give at least one of --model, --reward, --data, --copy"
  cmd="set -e"
  for c in "${COPIES[@]}"; do
    src=${c%=*} name=${c##*=}
    [[ $c == *=* && -n $name ]] || die "--copy '$c': expected gs://SRC=NAME"
    [[ $src == gs://* ]] || die "source '$src' is not a gs:// URL"
    target="$(rp "$DST")/$(q "$name")"
    cmd+="; mkdir -p $target; gcloud storage rsync --recursive $(q "$src") $target"
  done
  on_workers all "$cmd"
  note "staged under $DST on every worker; launch with --staged '$DST'"
  ;;
launch)
  require "$CONFIG" "--config (e.g. configs/kontext_mllm.py)"
  if [[ -n $STAGED ]]; then
    MODEL=${MODEL:-$STAGED/model} REWARD=${REWARD:-$STAGED/reward} DATA=${DATA:-$STAGED/data}
  fi
  build_train_args "$CONFIG" "$MODEL" "$REWARD" "$DATA" "$RUN_DIR" "${OVERRIDES[@]}"
  # jax writes compiled programs from process 0 only: a bucket run dir also holds the compile cache, so every
  # worker loads the train step after a preemption instead of compiling it (an explicit override wins)
  if [[ $RUN_DIR == gs://* && " ${OVERRIDES[*]} " != *" --config.compile_cache_dir="* ]]; then
    TRAIN_ARGS+=("--config.compile_cache_dir=${RUN_DIR%/}/xla_cache")
    note "compile cache: ${RUN_DIR%/}/xla_cache (shared by the workers; --config.compile_cache_dir=... to change)"
  fi
  envs=(PYTHONUNBUFFERED=1 EDIT_R1_DISTRIBUTED=auto)  # TPU VMs: jax finds the pod via the metadata server
  for e in "${ENVS[@]}"; do
    [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env '$e': expected KEY=VALUE"
    envs+=("$e")
  done
  d=$(rp "$DIR") log=$(rp "$LOG") pid=$(rp "$LOG.pid")
  train=""
  for a in "${TRAIN_ARGS[@]}"; do train+=" $(rarg "$a")"; done
  guard="if test -s $pid && kill -0 \$(cat $pid) 2>/dev/null; then echo \"training already running (pid \$(cat $pid))\" >&2; exit 1; fi"
  on_workers all "$guard; cd $d && nohup env $(qjoin "${envs[@]}") .venv/bin/python$train > $log 2>&1 < /dev/null & echo \$! > $pid"
  note "logs: tools/tpu/pod.sh logs --name $NAME --zone $ZONE --follow"
  ;;
logs)
  [[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker '$WORKER': a worker number or 'all'"
  [[ $LINES =~ ^[0-9]+$ ]] || die "--lines '$LINES': a number"
  follow=""
  [[ $FOLLOW == 1 ]] && follow=" -F"
  on_workers "$WORKER" "tail -n $LINES$follow $(rp "$LOG")"
  ;;
stop)
  pid=$(rp "$LOG.pid")
  on_workers all "if test -s $pid; then kill \$(cat $pid) 2>/dev/null || true; rm -f $pid; fi"
  ;;
delete)
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
  ;;
esac
