# shellcheck shell=bash
# UltraRefiner-rs: helpers shared by slurm/submit.sh and the slurm/*.sbatch templates (SPEC §14).
# Sourced after slurm/site.env; it is not meant to be run on its own. Every default below applies only when
# site.env (or the environment) left the variable unset, so site.env always wins.

# Canonical dataset order of the array mapping: task t -> dataset UR_ALL_DATASETS[t / 5], fold t % 5.
# Task ids are stable: restricting --datasets/--folds never renumbers a task.
UR_ALL_DATASETS=(BUSI BUSBRA BUS BUS_UC BUS_UCLM)
UR_NFOLDS=5
UR_EX_TEMPFAIL=75 # SPEC §11.1.6: "stopped on a signal, resume me"

: "${BIN_DIR:=target/release}"
: "${CONFIG:=paper}"
: "${DEVICE:=cuda:0}"
: "${RAW_ROOT:=dataset/raw}"
: "${DATA_ROOT:=dataset/processed}"
: "${AUG_ROOT:=dataset/augmented}"
: "${CHECKPOINT_ROOT:=checkpoints}"
: "${SAM_CHECKPOINT:=medsam-vit-b}"
: "${PHASE2_RUN:=}"
: "${PHASE3_SAM_CHECKPOINT:=}"
: "${NUM_WORKERS:=${SLURM_CPUS_PER_TASK:-16}}"
: "${REQUEUE_ON_TERM:=0}"
: "${PARTITION:=}"
: "${ACCOUNT:=}"
: "${QOS:=}"

ur_die() {
  echo "error: $*" >&2
  exit 2
}

# Index of a canonical dataset name in UR_ALL_DATASETS (prints nothing and fails for an unknown name).
ur_dataset_index() {
  local i
  for i in "${!UR_ALL_DATASETS[@]}"; do
    if [[ "${UR_ALL_DATASETS[$i]}" == "$1" ]]; then
      echo "$i"
      return 0
    fi
  done
  return 1
}

ur_task_dataset() {
  local t=$1
  if ! [[ "$t" =~ ^[0-9]+$ ]] || ((10#$t >= ${#UR_ALL_DATASETS[@]} * UR_NFOLDS)); then
    ur_die "array task id '$t' is outside 0..$((${#UR_ALL_DATASETS[@]} * UR_NFOLDS - 1))"
  fi
  echo "${UR_ALL_DATASETS[10#$t / UR_NFOLDS]}"
}

ur_task_fold() {
  echo "$((10#$1 % UR_NFOLDS))"
}

# Phase 2 run name (SPEC §8.9): dataset names sorted (byte order) and joined with '_'.
# PHASE2_RUN in site.env overrides it (e.g. a <RUN>_fold<k> or <RUN>_oof run).
ur_phase2_run() {
  if [[ -n "$PHASE2_RUN" ]]; then
    echo "$PHASE2_RUN"
    return
  fi
  printf '%s\n' "$@" | LC_ALL=C sort -u | paste -sd_ -
}

# Run directories and their summary.json (SPEC §11.1.5, §11.2-§11.4 default layouts).
ur_phase1_dir() { echo "$CHECKPOINT_ROOT/transunet/$1/fold_$2"; }
ur_phase2_dir() { echo "$CHECKPOINT_ROOT/sam_finetuned/$1"; }
ur_phase3_dir() { echo "$CHECKPOINT_ROOT/ultra_refiner/$1/fold_$2"; }

# Status of a run directory: complete | running | failed (summary.json, SPEC §11.1.5) | missing (no directory) |
# started (a directory without summary.json) | unknown (no readable status).
ur_run_status() {
  local f="$1/summary.json" status
  if [[ ! -d "$1" ]]; then
    echo missing
    return
  fi
  if [[ ! -f "$f" ]]; then
    echo started
    return
  fi
  status=$(tr -d '\n' <"$f" | grep -o '"status"[[:space:]]*:[[:space:]]*"[a-z]*"' | head -n1 | sed 's/.*"\([a-z]*\)"$/\1/' || true)
  case "$status" in
  complete | running | failed) echo "$status" ;;
  *) echo unknown ;;
  esac
}

# Path of a release binary; a clear error when it has not been built.
ur_bin() {
  local bin="$BIN_DIR/$1"
  [[ -x "$bin" ]] || ur_die "binary '$bin' not found or not executable: build it first (make build-cuda) or set BIN_DIR in slurm/site.env"
  echo "$bin"
}

# Job id to requeue: the array-task form <array job>_<task> for array jobs, else the plain job id.
ur_requeue_target() {
  if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "${SLURM_JOB_ID:-}"
  fi
}

UR_CHILD_PID=
UR_PENDING_SIG=
UR_GOT_TERM=0
ur_forward_signal() {
  if [[ "$1" == TERM ]]; then UR_GOT_TERM=1; fi
  if [[ -z "$UR_CHILD_PID" ]]; then
    UR_PENDING_SIG=$1 # arrived before the binary started: delivered right after it starts
    return 0
  fi
  echo "[ur] batch shell got SIG$1, forwarding it to pid $UR_CHILD_PID" >&2
  kill -s "$1" "$UR_CHILD_PID" 2>/dev/null || true
}

# Run a training binary in the background so that the batch shell can forward SIGUSR1/SIGTERM to it
# (`#SBATCH --signal=B:USR1@600` only signals the batch shell). The binary stops at the next step boundary and exits
# with 75; this function then runs `scontrol requeue` so that the task comes back and continues with --resume auto.
# After a SIGTERM (scancel, time limit, preemption) it does not requeue unless REQUEUE_ON_TERM=1: scancel must stop
# a task for good, and Slurm's own preemption policy decides about preempted jobs.
# Returns the binary's status; once a requeue has been accepted it ends the whole job script with status 0.
ur_run_with_requeue() {
  local rc=0 target
  echo "[ur] $(date -u '+%Y-%m-%dT%H:%M:%SZ') host=$(hostname) job=${SLURM_JOB_ID:-none} restart=${SLURM_RESTART_COUNT:-0}" >&2
  echo "[ur] running: $*" >&2
  UR_CHILD_PID=
  UR_PENDING_SIG=
  # Traps first (the binary starts with default handlers: bash resets caught signals in children).
  trap 'ur_forward_signal USR1' USR1
  trap 'ur_forward_signal TERM' TERM
  "$@" &
  UR_CHILD_PID=$!
  if [[ -n "$UR_PENDING_SIG" ]]; then
    kill -s "$UR_PENDING_SIG" "$UR_CHILD_PID" 2>/dev/null || true
  fi
  while :; do
    rc=0
    wait "$UR_CHILD_PID" || rc=$?
    # wait returns >128 when a trapped signal interrupted it; the binary may still be running.
    if ((rc > 128)) && kill -0 "$UR_CHILD_PID" 2>/dev/null; then
      continue
    fi
    break
  done
  rc=0
  wait "$UR_CHILD_PID" || rc=$? # the binary's own status (bash keeps it after the first wait)
  trap - USR1 TERM
  echo "[ur] binary exited with status $rc" >&2
  if ((rc != UR_EX_TEMPFAIL)); then
    return "$rc"
  fi
  if ((UR_GOT_TERM == 1 && REQUEUE_ON_TERM != 1)); then
    echo "[ur] status 75 after SIGTERM (scancel, time limit or preemption): not requeueing (REQUEUE_ON_TERM=0)" >&2
    return "$rc"
  fi
  target=$(ur_requeue_target)
  if [[ -z "$target" ]]; then
    echo "[ur] status 75 outside Slurm: run the same command again to resume" >&2
    return "$rc"
  fi
  echo "[ur] status 75: scontrol requeue $target" >&2
  if scontrol requeue "$target"; then
    echo "[ur] requeued: the task continues from its latest checkpoint (--resume auto)" >&2
    exit 0 # the whole job ends here; nothing after this command may run in this allocation
  fi
  echo "[ur] scontrol requeue $target failed; re-run slurm/submit.sh to continue this task" >&2
  return "$rc"
}

# A site.env without this hook is fine.
if ! declare -F ur_site_setup >/dev/null; then
  ur_site_setup() { :; }
fi

# Common start of every job: site settings, helpers, site hook (modules), binary check.
# The caller has already entered $SLURM_SUBMIT_DIR (the repository root).
ur_job_banner() {
  echo "[ur] $1 on $(hostname): config=$CONFIG device=$DEVICE checkpoints=$CHECKPOINT_ROOT bin=$BIN_DIR" >&2
}
