#!/usr/bin/env bash
# Show the training log of a TPU VM's workers.
#
#   launch/tpu_logs.sh --name hj-v4-32 --zone us-central2-b [--project P] [--worker 0|N|all] \
#       [--lines 50] [--follow] [--dry-run]
#
# Worker 0 runs process 0, which alone prints progress and results; the other
# workers' logs matter when one of them fails.

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

NAME="" ZONE="" PROJECT="" WORKER="0" LINES="50" FOLLOW=0
split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker) WORKER="$(value "$@")"; shift 2 ;;
    --lines) LINES="$(value "$@")"; shift 2 ;;
    --follow) FOLLOW=1; shift ;;
    *) tpu_flag "$@"; shift "$TAKEN" ;;
  esac
done
tpu_target
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker must be a worker number or 'all', got '$WORKER'"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number, got '$LINES'"
no_passthrough

TAIL="tail -n $LINES"
if [[ "$FOLLOW" == 1 ]]; then
  TAIL+=" -F"
fi
run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" "--worker=$WORKER" "--command=$TAIL ~/histojax-train.log"
