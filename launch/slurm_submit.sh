#!/usr/bin/env bash
# Submit launch/slurm_train.sbatch with the cluster shape on the command line.
#
#   launch/slurm_submit.sh --nodes 2 --gpus-per-node 8 --config configs/quickstart.py \
#       --workdir /shared/runs/qs --data-dir /shared/tfds [--partition P] [--account A] \
#       [--time 24:00:00] [--cpus-per-task 8] [--venv ~/histojax-venv] [--after JOBID] \
#       [--dry-run] [-- --config.optimizer.lr=3e-4 ...]
#
# One task per GPU. --after JOBID starts this job when that one has ended
# (however it ended): a chain of jobs that each resume the last checkpoint.

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

NODES="" GPUS="" CONFIG="" WORKDIR="" DATA_DIR="" PARTITION="" ACCOUNT="" TIME="24:00:00"
CPUS="8" VENV="" AFTER=""
split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$(value "$@")"; shift 2 ;;
    --gpus-per-node) GPUS="$(value "$@")"; shift 2 ;;
    --config) CONFIG="$(value "$@")"; shift 2 ;;
    --workdir) WORKDIR="$(value "$@")"; shift 2 ;;
    --data-dir) DATA_DIR="$(value "$@")"; shift 2 ;;
    --partition) PARTITION="$(value "$@")"; shift 2 ;;
    --account) ACCOUNT="$(value "$@")"; shift 2 ;;
    --time) TIME="$(value "$@")"; shift 2 ;;
    --cpus-per-task) CPUS="$(value "$@")"; shift 2 ;;
    --venv) VENV="$(value "$@")"; shift 2 ;;
    --after) AFTER="$(value "$@")"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help; arguments for histojax.train go after --)" ;;
  esac
done
for flag in nodes gpus-per-node; do
  v="$NODES"; [[ "$flag" == nodes ]] || v="$GPUS"
  require "$flag" "$v"
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || die "--$flag must be a positive number, got '$v'"
done
require config "$CONFIG"
require workdir "$WORKDIR"
require data-dir "$DATA_DIR"
[[ -f "$REPO_DIR/${CONFIG%%:*}" ]] || die "--config: no such file ${CONFIG%%:*} in $REPO_DIR"

SBATCH=(sbatch "--nodes=$NODES" "--ntasks-per-node=$GPUS" "--gpus-per-node=$GPUS"
        "--cpus-per-task=$CPUS" "--time=$TIME" "--chdir=$REPO_DIR")
[[ -z "$PARTITION" ]] || SBATCH+=("--partition=$PARTITION")
[[ -z "$ACCOUNT" ]] || SBATCH+=("--account=$ACCOUNT")
[[ -z "$AFTER" ]] || SBATCH+=("--dependency=afterany:$AFTER")
SBATCH+=("$LAUNCH_DIR/slurm_train.sbatch" --config "$CONFIG" --workdir "$WORKDIR" --data-dir "$DATA_DIR")
[[ -z "$VENV" ]] || SBATCH+=(--venv "$VENV")
if [[ ${#PASSTHROUGH[@]} -gt 0 ]]; then
  SBATCH+=(-- "${PASSTHROUGH[@]}")
fi
run "${SBATCH[@]}"
if [[ "$DRY_RUN" == 1 ]]; then
  note "inside the job, every task then runs:"
  bash "$LAUNCH_DIR/slurm_train.sbatch" --dry-run --config "$CONFIG" --workdir "$WORKDIR" \
    --data-dir "$DATA_DIR" ${VENV:+--venv "$VENV"} \
    ${PASSTHROUGH[@]+-- "${PASSTHROUGH[@]}"} | grep '^+'
fi
