#!/usr/bin/env bash
# Stop training on a TPU VM the way a preemption would: SIGTERM to every worker's
# trainer, which saves a checkpoint at a step all processes agree on and exits.
#
#   launch/tpu_stop.sh --name hj-v4-32 --zone us-central2-b [--project P] [--dry-run]
#
# tpu_train.sh with the same arguments resumes from that checkpoint.

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

NAME="" ZONE="" PROJECT=""
split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  tpu_flag "$@"
  shift "$TAKEN"
done
tpu_target
no_passthrough

# Only the pid tpu_train.sh recorded: never a process matched by name.
# shellcheck disable=SC2016  # $(...) is for the worker's shell
REMOTE='if [ -s ~/histojax-train.pid ] && kill -0 "$(cat ~/histojax-train.pid)" 2>/dev/null;'
# shellcheck disable=SC2016
REMOTE+=' then kill -TERM "$(cat ~/histojax-train.pid)" && echo "SIGTERM sent on $(hostname)";'
# shellcheck disable=SC2016
REMOTE+=' else echo "no histojax training on $(hostname)"; fi'
run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all "--command=$REMOTE"
