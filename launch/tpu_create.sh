#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), directly or as a queued resource.
#
#   launch/tpu_create.sh --name hj-v4-32 --zone us-central2-b --accelerator-type v4-32 \
#       --runtime-version tpu-ubuntu2204-base [--project P] [--queued [--poll-seconds 30]] [--spot] [--dry-run]
#
# --queued asks for a queued resource (the way to get large or spot slices) and
# waits until it is ACTIVE; without it, `tpu-vm create` returns when the VM is up.

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

NAME="" ZONE="" PROJECT="" TYPE="" RUNTIME="" QUEUED=0 SPOT=0 POLL=30
split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --accelerator-type) TYPE="$(value "$@")"; shift 2 ;;
    --runtime-version) RUNTIME="$(value "$@")"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --poll-seconds) POLL="$(value "$@")"; shift 2 ;;
    *) tpu_flag "$@"; shift "$TAKEN" ;;
  esac
done
tpu_target
require accelerator-type "$TYPE"
require runtime-version "$RUNTIME"
no_passthrough

EXTRA=()
if [[ "$SPOT" == 1 ]]; then
  EXTRA+=(--spot)
fi

if [[ "$QUEUED" == 0 ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}" \
    "--accelerator-type=$TYPE" "--version=$RUNTIME" "${EXTRA[@]+"${EXTRA[@]}"}"
  exit 0
fi

run gcloud compute tpus queued-resources create "$NAME" "${SCOPE[@]}" "--node-id=$NAME" \
  "--accelerator-type=$TYPE" "--runtime-version=$RUNTIME" "${EXTRA[@]+"${EXTRA[@]}"}"
DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" "--format=value(state.state)")
if [[ "$DRY_RUN" == 1 ]]; then
  note "then, every ${POLL} s until the state is ACTIVE:"
  run "${DESCRIBE[@]}"
  exit 0
fi
while true; do
  STATE="$("${DESCRIBE[@]}")"
  note "$(date +%H:%M:%S) queued resource $NAME: $STATE"
  case "$STATE" in
    ACTIVE) exit 0 ;;
    FAILED|SUSPENDED) die "queued resource $NAME is $STATE; see: gcloud compute tpus queued-resources describe $NAME --zone=$ZONE" ;;
  esac
  sleep "$POLL"
done
