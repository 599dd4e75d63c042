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
    --name) NAME="$(value "$@")"; shift 2 ;;
    --zone) ZONE="$(value "$@")"; shift 2 ;;
    --project) PROJECT="$(value "$@")"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
require name "$NAME"
require zone "$ZONE"
[[ ${#PASSTHROUGH[@]} -eq 0 ]] || die "tpu_delete.sh takes no arguments after --"
gcloud_scope

if [[ "$QUEUED" == 1 ]]; then
  # --force also deletes the TPU VM the queued resource created.
  run gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
fi
