#!/usr/bin/env bash
# UltraRefiner-rs: submit the unfinished training tasks to Slurm as a dependency chain (SPEC §14).
# Run `slurm/submit.sh --help` for the full description.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: slurm/submit.sh [--phases 1,2,3] [--datasets LIST] [--folds LIST] [--throttle 8] [--dry-run] [--parallel-p2]

Submits the UltraRefiner training workflow to Slurm (SPEC §14), skipping everything that is already finished:

  phase 0  slurm/prepare.sbatch  one CPU job: `ultrarefiner prepare datasets` + `ultrarefiner augment synthetic`
                                 (only with --phases 0,...; always submitted then: both steps are idempotent)
  phase 1  slurm/phase1.sbatch   array, one task per (dataset, fold): TransUNet
                                 run dir $CHECKPOINT_ROOT/transunet/<DS>/fold_<k>
  phase 2  slurm/phase2.sbatch   one job: SAM refiner on simulated failures of the selected datasets
                                 run dir $CHECKPOINT_ROOT/sam_finetuned/<RUN>, RUN = datasets sorted, joined by '_'
  phase 3  slurm/phase3.sbatch   array, one task per (dataset, fold): end-to-end
                                 run dir $CHECKPOINT_ROOT/ultra_refiner/<DS>/fold_<k>

Array task ids are fixed: t = dataset_index*5 + fold with the dataset order BUSI=0, BUSBRA=1, BUS=2, BUS_UC=3,
BUS_UCLM=4 (t = 0..24), whatever subset is selected. A task whose summary.json says "complete" is reported as
skipped; all others (new, started without a summary.json, "running", "failed") are submitted as one array,
e.g. --array=0,3,7-24%8. Every task runs its binary with --resume auto, so an interrupted run continues from its
latest checkpoint. The jobs are chained:

  phase 1 array -> phase 2 job (--dependency=afterok:<P1>) -> phase 3 array (--dependency=afterok:<P1>:<P2>)

A phase with nothing left to do is left out of the chain (the next phase then does not wait for it).

Options:
  --phases LIST     phases to run, from 0,1,2,3 (default 1,2,3); 0 = data preparation CPU job first
  --datasets LIST   datasets of phases 1 and 3 and of the phase 2 run (default all):
                    BUSI, BUSBRA, BUS, BUS_UC, BUS_UCLM (case-insensitive; `all` = the five)
  --folds LIST      folds of phases 1 and 3, from 0-4 (default all; ranges like 0-2 are accepted)
  --throttle N      at most N tasks of an array run at the same time (default 8): --array=<list>%N
  --parallel-p2     phase 2 does not wait for phase 1 (synthetic Option A data does not need it)
  --dry-run         print the plan and every sbatch command (with array lists and dependencies); submit nothing
  -h, --help        this text
Lists are comma-separated (--datasets BUSI,BUS). `--opt=value` works too.

Configuration: slurm/site.env (partition, account, QoS, modules, binary dir, data roots, checkpoint root, SAM
checkpoint, extra flags per phase); another file with UR_SITE_ENV=path. Any of its variables can also be set in the
environment, e.g. CHECKPOINT_ROOT=/scratch/me/ckpt slurm/submit.sh --dry-run. Relative paths are relative to the
repository root: sbatch is called from there and logs go to logs/ (created when submitting).

Examples:
  slurm/submit.sh --dry-run                       # what would be submitted for all 25 tasks of phases 1-3
  slurm/submit.sh                                 # submit it
  slurm/submit.sh --phases 0,1,2,3 --parallel-p2  # prepare data first; phase 2 alongside phase 1
  slurm/submit.sh --phases 1 --datasets BUSI,BUS --folds 0-2 --throttle 4
  make submit DRY_RUN=1                           # the same through make
Follow the jobs with `squeue -u $USER`; logs are logs/ur-phase1_<job>_<task>.out, logs/ur-phase2_<job>.out, ...
Re-running submit.sh at any time submits exactly what is still unfinished.
EOF
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)

die() {
  echo "error: $*" >&2
  echo "(slurm/submit.sh --help explains the options)" >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------
opt_phases="1,2,3"
opt_datasets="all"
opt_folds="all"
opt_throttle=8
dry_run=0
parallel_p2=0

need_value() {
  if (($2 < 2)) || [[ "$3" == --* ]]; then die "$1 needs a value"; fi
}

while (($# > 0)); do
  case "$1" in
  -h | --help)
    usage
    exit 0
    ;;
  --dry-run) dry_run=1 ;;
  --parallel-p2) parallel_p2=1 ;;
  --phases | --datasets | --folds | --throttle)
    need_value "$1" "$#" "${2:-}"
    case "$1" in
    --phases) opt_phases=$2 ;;
    --datasets) opt_datasets=$2 ;;
    --folds) opt_folds=$2 ;;
    --throttle) opt_throttle=$2 ;;
    esac
    shift
    ;;
  --phases=*) opt_phases=${1#*=} ;;
  --datasets=*) opt_datasets=${1#*=} ;;
  --folds=*) opt_folds=${1#*=} ;;
  --throttle=*) opt_throttle=${1#*=} ;;
  *) die "unknown argument '$1'" ;;
  esac
  shift
done

cd "$REPO_ROOT"
site_env="${UR_SITE_ENV:-slurm/site.env}"
[[ -f "$site_env" ]] || die "site settings '$site_env' not found (UR_SITE_ENV)"
# shellcheck source=slurm/site.env
source "$site_env"
# shellcheck source=slurm/common.sh
source "$SCRIPT_DIR/common.sh"

# Split a list on commas and blanks.
split_list() {
  local -a items=()
  IFS=$', \t\n' read -r -a items <<<"$1"
  ((${#items[@]} > 0)) && printf '%s\n' "${items[@]}"
  return 0
}

# Expand integer items and ranges (a-b) within [0, max]; print them sorted and unique.
int_list() {
  local what=$1 max=$2 list=$3 item a b i
  local -a nums=()
  while IFS= read -r item; do
    if [[ "$item" =~ ^[0-9]+$ ]]; then
      a=$item b=$item
    elif [[ "$item" =~ ^([0-9]+)-([0-9]+)$ ]]; then
      a=${BASH_REMATCH[1]} b=${BASH_REMATCH[2]}
    else
      die "invalid $what '$item' (expected numbers 0-$max, e.g. 0,2 or 0-2)"
    fi
    ((10#$a <= 10#$b)) || die "invalid $what range '$item'"
    ((10#$b <= max)) || die "unknown $what '$item' (valid: 0-$max)"
    for ((i = 10#$a; i <= 10#$b; i++)); do nums+=("$i"); done
  done < <(split_list "$list")
  ((${#nums[@]} > 0)) || die "empty $what list"
  printf '%s\n' "${nums[@]}" | sort -n -u
}

phases_txt=$(int_list phase 3 "$opt_phases") || exit 2
mapfile -t PHASES <<<"$phases_txt"
if [[ "$opt_folds" == all ]]; then opt_folds="0-$((UR_NFOLDS - 1))"; fi
folds_txt=$(int_list fold $((UR_NFOLDS - 1)) "$opt_folds") || exit 2
mapfile -t FOLDS <<<"$folds_txt"

# Datasets: canonical names in canonical (array-mapping) order.
declare -A want_ds=()
while IFS= read -r item; do
  name=${item^^}
  if [[ "$name" == ALL ]]; then
    for d in "${UR_ALL_DATASETS[@]}"; do want_ds[$d]=1; done
    continue
  fi
  if ! ur_dataset_index "$name" >/dev/null; then
    case "$name" in
    UDIAT) die "dataset 'UDIAT' is test-only (unseen, SPEC §3.1): it is evaluated, never trained" ;;
    PHANTOM) die "dataset 'PHANTOM' is for demos and tests (make demo), not for the cluster workflow" ;;
    *) die "unknown dataset '$item' (valid: ${UR_ALL_DATASETS[*]}, or all)" ;;
    esac
  fi
  want_ds[$name]=1
done < <(split_list "$opt_datasets")
DATASETS=()
for d in "${UR_ALL_DATASETS[@]}"; do
  if [[ -n "${want_ds[$d]:-}" ]]; then DATASETS+=("$d"); fi
done
((${#DATASETS[@]} > 0)) || die "empty dataset list"

if ! [[ "$opt_throttle" =~ ^[0-9]+$ ]] || ((10#$opt_throttle < 1)); then
  die "invalid --throttle '$opt_throttle' (expected a positive integer)"
fi
throttle=$((10#$opt_throttle))

has_phase() {
  local p
  for p in "${PHASES[@]}"; do [[ "$p" == "$1" ]] && return 0; done
  return 1
}

# ---------------------------------------------------------------------------------------------------------------
# Helpers for the plan
# ---------------------------------------------------------------------------------------------------------------
# "0 1 2 5 7 8 9" -> "0-2,5,7-9"
compress() {
  local out="" start="" prev="" n
  for n in "$@"; do
    if [[ -z "$start" ]]; then
      start=$n prev=$n
    elif ((n == prev + 1)); then
      prev=$n
    else
      out+="${out:+,}$start"
      ((prev > start)) && out+="-$prev"
      start=$n prev=$n
    fi
  done
  if [[ -n "$start" ]]; then
    out+="${out:+,}$start"
    ((prev > start)) && out+="-$prev"
  fi
  echo "$out"
}

# Display a command: words made of safe characters as they are, others shell-quoted.
show_cmd() {
  local w out=""
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:%=,@+\<\>-]+$ ]]; then out+=" $w"; else out+=" $(printf '%q' "$w")"; fi
  done
  echo "${out# }"
}

# Run directory of a task, shown with the literal $CHECKPOINT_ROOT prefix so that the output does not depend on
# where the checkpoints live.
show_dir() {
  echo "\$CHECKPOINT_ROOT${1#"$CHECKPOINT_ROOT"}"
}

status_word() {
  case "$1" in
  complete) echo "complete  -> skipped" ;;
  missing) echo "new       -> submit" ;;
  *) echo "$(printf '%-9s' "$1") -> submit" ;;
  esac
}

n_running=0
# Plan one array phase; fills the named array with the task ids to submit.
plan_array_phase() {
  local phase=$1 title=$2 dirfn=$3 d f t dir st n_skip=0
  local -n todo_ref=$4
  todo_ref=()
  echo
  echo "Phase $phase ($title): run directories $(show_dir "$("$dirfn" "<DS>" "<k>")")"
  for d in "${DATASETS[@]}"; do
    for f in "${FOLDS[@]}"; do
      t=$(($(ur_dataset_index "$d") * UR_NFOLDS + f))
      dir=$("$dirfn" "$d" "$f")
      st=$(ur_run_status "$dir")
      printf '  task %2d  %-8s fold %d  %s\n' "$t" "$d" "$f" "$(status_word "$st")"
      if [[ "$st" == complete ]]; then
        n_skip=$((n_skip + 1))
      else
        todo_ref+=("$t")
        [[ "$st" == running ]] && n_running=$((n_running + 1))
      fi
    done
  done
  if ((${#todo_ref[@]} == 0)); then
    echo "  -> nothing to do ($n_skip complete): phase $phase is left out of the chain"
  else
    echo "  -> ${#todo_ref[@]} to submit, $n_skip skipped (complete): array $(compress "${todo_ref[@]}")"
  fi
}

sbatch_base() {
  local -n base_ref=$1
  base_ref=(sbatch --parsable)
  [[ -n "$PARTITION" ]] && base_ref+=("--partition=$PARTITION")
  [[ -n "$ACCOUNT" ]] && base_ref+=("--account=$ACCOUNT")
  [[ -n "$QOS" ]] && base_ref+=("--qos=$QOS")
  base_ref+=(${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"})
  return 0
}

# ---------------------------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------------------------
echo "UltraRefiner-rs Slurm submission (SPEC §14)$( ((dry_run)) && echo ': DRY RUN, nothing is submitted')"
echo "phases $(IFS=,; echo "${PHASES[*]}"); datasets $(IFS=,; echo "${DATASETS[*]}"); folds $(IFS=,; echo "${FOLDS[*]}"); throttle $throttle$( ((parallel_p2)) && echo '; phase 2 parallel to phase 1')"
echo "site settings: $site_env; CHECKPOINT_ROOT=$CHECKPOINT_ROOT" >&2

p2_run=$(ur_phase2_run "${DATASETS[@]}")
todo1=() todo3=()
p0_todo=0 p2_todo=0

if has_phase 0; then
  echo
  echo "Phase 0 (data preparation, CPU): prepare datasets + augment synthetic for $(IFS=,; echo "${DATASETS[*]}")"
  echo "  -> always submitted when requested (idempotent: up-to-date data are left as they are)"
  p0_todo=1
fi
if has_phase 1; then
  plan_array_phase 1 TransUNet ur_phase1_dir todo1
fi
if has_phase 2; then
  p2_dir=$(ur_phase2_dir "$p2_run")
  p2_status=$(ur_run_status "$p2_dir")
  echo
  echo "Phase 2 (SAM refiner): run directory $(show_dir "$p2_dir")"
  printf '  run %s  %s\n' "$p2_run" "$(status_word "$p2_status")"
  if [[ "$p2_status" == complete ]]; then
    echo "  -> nothing to do (complete): phase 2 is left out of the chain"
  else
    p2_todo=1
    [[ "$p2_status" == running ]] && n_running=$((n_running + 1))
    echo "  -> 1 job to submit"
  fi
fi
if has_phase 3; then
  plan_array_phase 3 end-to-end ur_phase3_dir todo3
fi

# Prerequisites that this submission does not produce.
if ((${#todo3[@]} > 0)); then
  for t in "${todo3[@]}"; do
    d=$(ur_task_dataset "$t") f=$(ur_task_fold "$t")
    if [[ " ${todo1[*]-} " == *" $t "* ]]; then continue; fi
    st=$(ur_run_status "$(ur_phase1_dir "$d" "$f")")
    if [[ "$st" != complete ]]; then
      echo "warning: phase 3 task $t needs phase 1 $d fold $f (status: $st), which this submission does not train"
    fi
  done
  if [[ -z "$PHASE3_SAM_CHECKPOINT" ]] && ((p2_todo == 0)); then
    st=$(ur_run_status "$(ur_phase2_dir "$p2_run")")
    if [[ "$st" != complete ]]; then
      echo "warning: phase 3 needs the phase 2 run $p2_run (status: $st), which this submission does not train" \
        "(set PHASE3_SAM_CHECKPOINT in slurm/site.env to use a pretrained SAM instead)"
    fi
  fi
fi
if ((n_running > 0)); then
  echo
  echo "note: $n_running run(s) say \"running\": a crashed or stopped run, or one a job is still training." \
    "Check squeue -u ${USER:-\$USER} first: two jobs must not train the same run directory."
fi

if ((p0_todo == 0 && ${#todo1[@]} == 0 && p2_todo == 0 && ${#todo3[@]} == 0)); then
  echo
  echo "Nothing to submit: every selected task is complete."
  exit 0
fi

# ---------------------------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------------------------
if ((dry_run == 0)); then
  command -v sbatch >/dev/null || die "sbatch not found: run this on a Slurm login node (or use --dry-run)"
  mkdir -p logs
fi

declare -A job_id=() # phase -> job id (real) or placeholder <Pn> (dry run)
submitted=()

# submit PHASE DESCRIPTION [sbatch flags...] -- script [script args...]
submit() {
  local phase=$1 what=$2 out id
  shift 2
  local -a cmd
  sbatch_base cmd
  while [[ "$1" != -- ]]; do
    cmd+=("$1")
    shift
  done
  shift
  cmd+=("$@")
  echo
  echo "Phase $phase: $what"
  echo "  $(show_cmd "${cmd[@]}")"
  if ((dry_run)); then
    job_id[$phase]="<P$phase>"
    return 0
  fi
  if ! out=$("${cmd[@]}"); then
    die "sbatch failed for phase $phase${submitted[*]:+ (already submitted: ${submitted[*]})}"
  fi
  id=${out%%;*}
  [[ "$id" =~ ^[0-9]+$ ]] || die "unexpected sbatch output '$out' for phase $phase"
  job_id[$phase]=$id
  submitted+=("phase$phase=$id")
  echo "  -> job $id"
}

# afterok dependency flags on the given phases (those submitted now).
# shellcheck disable=SC2034 # flags_ref is a nameref to the caller's array
dep_flags() {
  local -n flags_ref=$1
  shift
  local ids="" p
  for p in "$@"; do
    [[ -n "${job_id[$p]:-}" ]] && ids+=":${job_id[$p]}"
  done
  flags_ref=()
  if [[ -n "$ids" ]]; then
    flags_ref=("--dependency=afterok$ids" --kill-on-invalid-dep=yes)
  fi
  return 0
}

deps=()
if ((p0_todo)); then
  submit 0 "data preparation" -- slurm/prepare.sbatch "${DATASETS[@]}"
fi
if ((${#todo1[@]} > 0)); then
  dep_flags deps 0
  submit 1 "TransUNet, ${#todo1[@]} task(s)" "--array=$(compress "${todo1[@]}")%$throttle" ${deps[@]+"${deps[@]}"} \
    -- slurm/phase1.sbatch
fi
if ((p2_todo)); then
  if ((parallel_p2)); then dep_flags deps 0; else dep_flags deps 0 1; fi
  submit 2 "SAM refiner, run $p2_run" ${deps[@]+"${deps[@]}"} -- slurm/phase2.sbatch "${DATASETS[@]}"
fi
if ((${#todo3[@]} > 0)); then
  if [[ -n "${job_id[1]:-}${job_id[2]:-}" ]]; then dep_flags deps 1 2; else dep_flags deps 0; fi
  submit 3 "end-to-end, ${#todo3[@]} task(s)" "--array=$(compress "${todo3[@]}")%$throttle" ${deps[@]+"${deps[@]}"} \
    -- slurm/phase3.sbatch "${DATASETS[@]}"
fi

echo
if ((dry_run)); then
  echo "Dry run: nothing was submitted (<Pn> stands for the job id of phase n)."
else
  echo "Submitted: ${submitted[*]}"
fi
echo "Follow the jobs with: squeue -u ${USER:-\$USER}"
echo "Logs: logs/ur-phase1_<job>_<task>.out, logs/ur-phase2_<job>.out, logs/ur-phase3_<job>_<task>.out"
