#!/usr/bin/env bash
# Install histojax on every worker of a TPU VM: the committed code, Python 3.11,
# requirements.txt and the TPU build of the pinned jax.
#
#   launch/tpu_setup.sh --name hj-v4-32 --zone us-central2-b [--project P] [--python 3.11] [--dry-run]
#
# Ships `git archive HEAD` (commit first: a run should name the code it ran),
# creates ~/histojax-venv with uv (TPU runtimes ship an older Python), and
# installs with the same pins as this checkout. Safe to run again after a new commit.

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

NAME="" ZONE="" PROJECT="" PYTHON_VERSION="3.11" UV_VERSION="0.13.8"
split_args "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYTHON_VERSION="$(value "$@")"; shift 2 ;;
    *) tpu_flag "$@"; shift "$TAKEN" ;;
  esac
done
tpu_target
no_passthrough

JAX_VERSION="$(sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "$REPO_DIR/requirements.txt")"
[[ -n "$JAX_VERSION" ]] || die "requirements.txt does not pin jax==<version>"
REVISION="$(git -C "$REPO_DIR" rev-parse --short HEAD)"
if [[ -n "$(git -C "$REPO_DIR" status --porcelain --untracked-files=no)" ]]; then
  note "warning: uncommitted changes are not shipped; workers get commit $REVISION"
fi
ARCHIVE="${TMPDIR:-/tmp}/histojax-$REVISION.tar.gz"

# What every worker runs: unpack, make the venv, install the pinned stack.
# shellcheck disable=SC2088  # ~ is for the worker's shell to expand
UV="~/.local/bin/uv"
# shellcheck disable=SC2088
VENV_PY="~/histojax-venv/bin/python"
STEPS=(
  "rm -rf ~/histojax && mkdir -p ~/histojax && tar -xzf ~/histojax.tar.gz -C ~/histojax"
  "echo $REVISION > ~/histojax/REVISION"
  "python3 -m pip install --user --quiet uv==$UV_VERSION"
  "$UV venv --quiet --allow-existing --python $PYTHON_VERSION ~/histojax-venv"
  "$UV pip install --quiet --python $VENV_PY -r ~/histojax/requirements.txt 'jax[tpu]==$JAX_VERSION'"
  "$UV pip install --quiet --python $VENV_PY --no-deps -e ~/histojax"
  "$VENV_PY -c 'import socket, histojax, jax; print(socket.gethostname(), \"histojax $REVISION, jax\", jax.__version__)'"
)
REMOTE="set -e"
for step in "${STEPS[@]}"; do
  REMOTE+=" && $step"
done

run git -C "$REPO_DIR" archive --format=tar.gz -o "$ARCHIVE" HEAD
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$NAME:~/histojax.tar.gz" "${SCOPE[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker=all "--command=$REMOTE"
