#!/usr/bin/env bash
# shellcheck disable=SC2034  # PROG/DRY_RUN are read by launch_common.sh
# Launch training on GPU hosts over plain ssh: one process per host (all its GPUs), rendezvous through
# EDIT_R1_COORDINATOR / EDIT_R1_NUM_PROCESSES / EDIT_R1_PROCESS_ID (read by edit_r1_jax.train).
set -euo pipefail
PROG="tools/gpu/ssh_launch.sh"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../launch_common.sh
source "$ROOT/tools/launch_common.sh"

usage() {
  cat <<'USAGE'
usage: tools/gpu/ssh_launch.sh (--hosts h1,h2,... | --hostfile FILE) --config configs/NAME.py[:variant]
                               [options] [--] [--config.FIELD=VALUE ...]
       tools/gpu/ssh_launch.sh (--hosts ... | --hostfile FILE) --stop

For host i (0-based, in the given order) runs over ssh, in the background with nohup:
  cd DIR && env EDIT_R1_COORDINATOR=HOST0:PORT EDIT_R1_NUM_PROCESSES=N EDIT_R1_PROCESS_ID=i \
      PYTHON -m edit_r1_jax.train TRAIN_ARGS > LOG.i.log
Host 0 runs the coordinator. Every host must see the repository at DIR (shared filesystem or a copy) and the
converted weights / dataset at the paths given. Prints each command ("+ ssh ..."); --dry-run only prints.

  --hosts LIST           comma-separated hosts ([user@]host); or --hostfile FILE (one per line, # comments)
  --port P               coordinator port on host 0 (default 12355)
  --dir DIR              repository on the hosts (default: this checkout's path)
  --python PATH          (default DIR/.venv/bin/python)
  --log PREFIX           per-host log PREFIX.i.log, pid in PREFIX.i.pid (default /tmp/edit_r1_train)
  --env KEY=VALUE        extra environment (repeatable); XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.92
  --ssh-option OPT       extra `ssh -o OPT` (repeatable; BatchMode=yes is always set)
  --config CFG  --model-dir D  --reward-dir D  --data-root D  --run-dir D
  --stop                 kill the processes started with the same --log on every host
  --dry-run  -h|--help
USAGE
}

HOSTS_ARG="" HOSTFILE="" PORT=12355 DIR=$ROOT PYTHON="" LOG=/tmp/edit_r1_train ENVS=() SSH_OPTS=(-o BatchMode=yes)
CONFIG="" MODEL="" REWARD="" DATA="" RUN_DIR="" OVERRIDES=() STOP=0
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --stop) STOP=1 ;;
    --hosts|--hostfile|--port|--dir|--python|--log|--env|--ssh-option|--config|--model-dir|--reward-dir|\
    --data-root|--run-dir)
      need_value "$1" $#
      case $1 in
        --hosts) HOSTS_ARG=$2 ;; --hostfile) HOSTFILE=$2 ;; --port) PORT=$2 ;; --dir) DIR=$2 ;;
        --python) PYTHON=$2 ;; --log) LOG=$2 ;; --env) ENVS+=("$2") ;; --ssh-option) SSH_OPTS+=(-o "$2") ;;
        --config) CONFIG=$2 ;; --model-dir) MODEL=$2 ;; --reward-dir) REWARD=$2 ;; --data-root) DATA=$2 ;;
        --run-dir) RUN_DIR=$2 ;;
      esac
      shift ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --config.*=*) OVERRIDES+=("$1") ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

HOSTS=()
if [[ -n $HOSTS_ARG && -n $HOSTFILE ]]; then die "give --hosts or --hostfile, not both"; fi
if [[ -n $HOSTS_ARG ]]; then
  IFS=, read -r -a HOSTS <<< "$HOSTS_ARG"
elif [[ -n $HOSTFILE ]]; then
  [[ -f $HOSTFILE ]] || die "--hostfile '$HOSTFILE' does not exist"
  while read -r line; do
    line=${line%%#*}
    line=${line//[[:space:]]/}
    [[ -n $line ]] && HOSTS+=("$line")
  done < "$HOSTFILE"
else
  die "missing required argument --hosts or --hostfile"
fi
[[ ${#HOSTS[@]} -gt 0 ]] || die "no hosts given"
for h in "${HOSTS[@]}"; do
  [[ $h =~ ^([A-Za-z0-9._-]+@)?[A-Za-z0-9._:-]+$ ]] || die "host '$h' is not a [user@]hostname"
done
[[ $PORT =~ ^[0-9]+$ ]] || die "--port '$PORT': a number"
N=${#HOSTS[@]}
PYTHON=${PYTHON:-$DIR/.venv/bin/python}

if [[ $STOP == 1 ]]; then
  for i in "${!HOSTS[@]}"; do
    pid=$(q "$LOG.$i.pid")
    run ssh "${SSH_OPTS[@]}" "${HOSTS[$i]}" "if test -s $pid; then kill \$(cat $pid) 2>/dev/null || true; rm -f $pid; fi"
  done
  exit 0
fi

build_train_args "$CONFIG" "$MODEL" "$REWARD" "$DATA" "$RUN_DIR" "${OVERRIDES[@]}"
envs=()
for e in "${ENVS[@]}"; do
  [[ $e =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]] || die "--env '$e': expected KEY=VALUE"
  envs+=("$e")
done
[[ " ${envs[*]} " == *" XLA_PYTHON_CLIENT_MEM_FRACTION="* ]] || envs+=(XLA_PYTHON_CLIENT_MEM_FRACTION=0.92)
envs+=(PYTHONUNBUFFERED=1)

COORD="${HOSTS[0]#*@}:$PORT"
note "$N host(s), coordinator $COORD"
for i in "${!HOSTS[@]}"; do
  log=$(q "$LOG.$i.log") pid=$(q "$LOG.$i.pid")
  remote="cd $(q "$DIR") && nohup env $(qjoin "EDIT_R1_COORDINATOR=$COORD" "EDIT_R1_NUM_PROCESSES=$N" \
    "EDIT_R1_PROCESS_ID=$i" "${envs[@]}") $(qjoin "$PYTHON" "${TRAIN_ARGS[@]}") > $log 2>&1 < /dev/null & echo \$! > $pid"
  run ssh "${SSH_OPTS[@]}" "${HOSTS[$i]}" "$remote"
done
note "logs: ssh ${HOSTS[0]} tail -F $LOG.0.log"
