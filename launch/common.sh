# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): flag parsing, checks and --dry-run.
#
# Every script prints each command it runs, shell-quoted so it can be pasted,
# with a leading "+ ". With --dry-run it prints them and runs nothing.

set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$LAUNCH_DIR/.." && pwd)"
export LAUNCH_DIR REPO_DIR
DRY_RUN=0
# shellcheck disable=SC2034  # read by the scripts that source this file
PASSTHROUGH=()

die() {
  echo "error: $*" >&2
  exit 2
}

# quote WORD: WORD as a shell would need it typed (single quotes only when needed).
quote() {
  local q="'\\''"
  # A leading ~ and brackets would expand when pasted; those words get quotes.
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-][A-Za-z0-9_./:=@%+,~-]*$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/$q}"
  fi
}

# run CMD ARGS...: show the exact command, then run it unless --dry-run.
run() {
  local line="+" word
  for word in "$@"; do
    line+=" $(quote "$word")"
  done
  printf '%s\n' "$line"
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

# note TEXT: a line for the person, kept apart from the commands.
note() {
  echo "# $*"
}

# split_args ARGS...: sets ARGS, with --flag=value split into --flag value and
# everything after a bare -- moved to PASSTHROUGH (left exactly as given).
split_args() {
  ARGS=()
  PASSTHROUGH=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --)
        shift
        # shellcheck disable=SC2034  # read by the scripts that source this file
        PASSTHROUGH=("$@")
        return 0
        ;;
      --*=*) ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# value FLAG NEXT: NEXT, unless it is missing or is itself a flag.
value() {
  if [[ $# -lt 2 || "$2" == --* ]]; then
    die "$1 needs a value"
  fi
  printf '%s' "$2"
}

# require NAME VALUE: fail naming the flag when a required value is empty.
require() {
  if [[ -z "$2" ]]; then
    die "--$1 is required (see --help)"
  fi
}

# require_shared FLAG PATH: every worker must reach the same files, so a
# multi-host run needs object storage (gs://), not a VM's local disk.
require_shared() {
  if [[ "$2" != gs://* ]]; then
    die "--$1 must be a gs:// path that every worker can reach, got '$2'"
  fi
}

# tpu_flag ARGS...: parses the flag at the front of ARGS if it is one every TPU
# script takes (--name, --zone, --project, --dry-run, --help) and sets TAKEN to
# the words it used; anything else is an unknown argument. The script's own
# flags are matched before it: `*) tpu_flag "$@"; shift "$TAKEN" ;;`.
tpu_flag() {
  # shellcheck disable=SC2034  # NAME, ZONE, PROJECT are read by the scripts
  case "$1" in
    --name) NAME="$(value "$@")"; TAKEN=2 ;;
    --zone) ZONE="$(value "$@")"; TAKEN=2 ;;
    --project) PROJECT="$(value "$@")"; TAKEN=2 ;;
    --dry-run) DRY_RUN=1; TAKEN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (${UNKNOWN_HINT:-see --help})" ;;
  esac
}

# tpu_target: --name and --zone are required; sets SCOPE, the --zone/--project
# flags every gcloud TPU command takes.
tpu_target() {
  require name "$NAME"
  require zone "$ZONE"
  SCOPE=("--zone=$ZONE")
  if [[ -n "${PROJECT:-}" ]]; then
    SCOPE+=("--project=$PROJECT")
  fi
}

# no_passthrough: the script takes nothing after a bare --.
no_passthrough() {
  [[ ${#PASSTHROUGH[@]} -eq 0 ]] || die "$(basename "$0") takes no arguments after --"
}
