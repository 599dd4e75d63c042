#!/usr/bin/env bash
# Delete a TPU VM (or the queued resource that holds it). The workdir on gs:// stays.
#
#   launch/tpu_delete.sh --name hj-v4-32 --zone us-central2-b [--project P] [--queued] [--dry-run]

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,4p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

NAME="" ZONE="" PROJECT="" QUEUED=0
split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    *) tpu_flag "$@"; shift "$TAKEN" ;;
  esac
done
tpu_target
no_passthrough

if [[ "$QUEUED" == 1 ]]; then
  # --force also deletes the TPU VM the queued resource created.
  run gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
fi
