#!/usr/bin/env bash
# Start training on every worker of a TPU VM: the same command on all of them.
#
#   launch/tpu_train.sh --name hj-v4-32 --zone us-central2-b --config configs/quickstart.py \
#       --workdir gs://BUCKET/runs/quickstart --data-dir gs://BUCKET/tfds [--project P] \
#       [--foreground] [--dry-run] [-- --config.optimizer.lr=3e-4 ...]
#
# Each worker runs `python -m histojax.train` detached (nohup), appending to
# ~/histojax-train.log; JAX finds the other workers itself. Workdir and TFDS
# data must be on gs:// so every worker reads and writes the same files.
# Arguments after -- go to histojax.train unchanged. Running the same command
# again resumes from the latest checkpoint. --foreground streams the output
# instead (and stops training if the ssh session drops).

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

UNKNOWN_HINT="see --help; arguments for histojax.train go after --"
NAME="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" DATA_DIR="" FOREGROUND=0
split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$(value "$@")"; shift 2 ;;
    --workdir) WORKDIR="$(value "$@")"; shift 2 ;;
    --data-dir) DATA_DIR="$(value "$@")"; shift 2 ;;
    --foreground) FOREGROUND=1; shift ;;
    *) tpu_flag "$@"; shift "$TAKEN" ;;
  esac
done
tpu_target
require config "$CONFIG"
require workdir "$WORKDIR"
require data-dir "$DATA_DIR"
require_shared workdir "$WORKDIR"
require_shared data-dir "$DATA_DIR"
[[ -f "$REPO_DIR/${CONFIG%%:*}" ]] || die "--config: no such file ${CONFIG%%:*} in $REPO_DIR"

# The worker's shell expands ~; every other word is quoted for it.
# shellcheck disable=SC2088
TRAIN_LINE="~/histojax-venv/bin/python -m histojax.train"
for word in "--config=$CONFIG" "--workdir=$WORKDIR" "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}"; do
  TRAIN_LINE+=" $(quote "$word")"
done

ENV_LINE="export TFDS_DATA_DIR=$(quote "$DATA_DIR")"
if [[ "$FOREGROUND" == 1 ]]; then
  REMOTE="cd ~/histojax && $ENV_LINE && $TRAIN_LINE"
else
  # Refuse to start a second run next to a live one; remember the pid for tpu_stop.sh.
  REMOTE="cd ~/histojax && $ENV_LINE"
  REMOTE+=" && if [ -s ~/histojax-train.pid ] && kill -0 \"\$(cat ~/histojax-train.pid)\" 2>/dev/null;"
  REMOTE+=" then echo \"histojax is already training on \$(hostname)\" >&2; exit 1; fi"
  REMOTE+=" && (nohup $TRAIN_LINE >> ~/histojax-train.log 2>&1 < /dev/null & echo \$! > ~/histojax-train.pid)"
fi

run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all "--command=$REMOTE"
if [[ "$FOREGROUND" == 0 ]]; then
  note "started on every worker; follow with: launch/tpu_logs.sh --name $NAME --zone $ZONE --follow"
fi
