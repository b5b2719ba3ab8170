# Shared helpers for tools/tpu/pod.sh, tools/gpu/submit.sh, tools/gpu/ssh_launch.sh, tools/gpu/slurm.sbatch.
# Sourced, not run. Every command goes through `run` so that --dry-run prints exactly what would run:
# one command per line, prefixed "+ ", arguments shell-quoted only where needed (the line can be pasted).

DRY_RUN=${DRY_RUN:-0}

die() {  # die MESSAGE: usage error, exit 2
  echo "${PROG:-$0}: error: $*" >&2
  echo "${PROG:-$0}: run with --help for usage" >&2
  exit 2
}

q() {  # q ARG: ARG quoted for a POSIX shell (unchanged when it is plain)
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./=:,@%+^-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.+)$ ]]; then  # --flag=VALUE: quote the value only (easier to read)
    printf '%s' "${BASH_REMATCH[1]}"
    q "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

qjoin() {  # qjoin ARG...: the arguments quoted and joined by spaces
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

run() {  # run CMD ARG...: print "+ CMD ARG..." and run it (only print it under --dry-run)
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(qjoin "$@")"
    return 0
  fi
  printf '+ %s\n' "$(qjoin "$@")" >&2
  "$@"
}

note() {  # note TEXT: an informational line ("# TEXT"), printed in dry runs too
  printf '# %s\n' "$*"
}

require() {  # require VALUE FLAG: fail naming FLAG when VALUE is empty
  [[ -n $1 ]] || die "missing required argument $2"
}

need_value() {  # need_value FLAG NEXT_ARG_COUNT: a flag that takes a value must have one
  [[ $2 -ge 2 ]] || die "$1 needs a value"
}

# build_train_args CONFIG MODEL_DIR REWARD_DIR DATA_ROOT RUN_DIR OVERRIDE...: sets TRAIN_ARGS (array) to the
# arguments of `python -m edit_r1_jax.train`. Overrides must look like --config.FIELD=VALUE.
build_train_args() {
  local config=$1 model=$2 reward=$3 data=$4 run_dir=$5
  shift 5
  require "$config" --config
  TRAIN_ARGS=(-m edit_r1_jax.train --config "$config")
  [[ -n $model ]] && TRAIN_ARGS+=("--config.model.dir=$model")
  [[ -n $reward ]] && TRAIN_ARGS+=("--config.reward.mllm_dir=$reward")
  [[ -n $data ]] && TRAIN_ARGS+=("--config.data.root=$data")
  [[ -n $run_dir ]] && TRAIN_ARGS+=("--config.run_dir=$run_dir")
  local o
  for o in "$@"; do
    [[ $o == --config.*=* ]] || die "training override '$o' must look like --config.FIELD=VALUE"
    TRAIN_ARGS+=("$o")
  done
  return 0
}
