#!/usr/bin/env bash
# Runs mpl on a Cloud TPU VM or a multi-host TPU pod slice, one stage at a time.
#
# Usage: launch/tpu_vm.sh [OPTIONS] COMMAND [-- EXTRA_MPL_MAIN_FLAGS ...]
#
# Commands:
#   create   gcloud compute tpus tpu-vm create (the VM or pod slice)
#   setup    on every worker: copy this checkout (or git clone --repo-url), create a Python
#            venv with uv, pip install -r requirements.txt and jax[tpu] of the same version
#   run      on every worker at once: python -m mpl.main --config CONFIG --workdir WORKDIR
#            --distributed [EXTRA ...]. Rerunning `run` with the same workdir resumes from its
#            latest checkpoint (the trainer does that by itself).
#   all      create, setup, run
#   status   describe the TPU (state, type, runtime)
#   logs     follow the log of a --background run on worker 0
#   stop     SIGTERM the --background run on every worker (the trainer checkpoints and exits)
#   delete   delete the TPU (gcloud asks to confirm)
#
# Options (each one can also be given as the environment variable in brackets):
#   --name NAME         TPU name [TPU_NAME]; default mpl-tpu
#   --zone ZONE         zone [ZONE]; default us-central2-b (v4)
#   --type TYPE         accelerator type [ACCELERATOR_TYPE], e.g. v4-8, v4-32, v3-2048,
#                       v5litepod-16, v6e-8; default v4-32
#   --version VERSION   TPU runtime (software) version [RUNTIME_VERSION]; default by type:
#                       v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite,
#                       v4 and older tpu-ubuntu2204-base
#   --project PROJECT   Cloud project [PROJECT]; default: gcloud's configured project
#   --spot              create a Spot TPU [SPOT=1] (it can be preempted: rerun `run` to resume)
#   --repo-url URL      git clone URL for `setup` [REPO_URL]; default: copy this checkout's
#                       files (tracked and untracked, not git-ignored) to the workers
#   --repo-ref REF      branch or tag to clone [REPO_REF]; default: the default branch
#   --config SPEC       config for `run` [CONFIG], e.g. configs/imagenet10_mpl.py or
#                       'configs/efficientnet_l2_mpl.py:unlabeled=my_tfds_set'; required
#   --workdir DIR       workdir for `run` [WORKDIR]; required. Every worker must see the same
#                       directory: a gs://bucket/path (or a file system mounted on all workers)
#   --python VERSION    Python of the venv on the workers [PYTHON_VERSION]; default 3.12
#   --background        `run` detached on every worker (nohup, log in ~/mpl_run.log); follow it
#                       with `logs`, end it with `stop` [BACKGROUND=1]
#   --dry-run           print the gcloud commands without running them [DRY_RUN=1]
#   -h, --help          this text
#
# Flags after `--` go to python -m mpl.main unchanged, e.g. -- --config.mesh.model=16
#
# Examples:
#   launch/tpu_vm.sh --type v4-32 create
#   launch/tpu_vm.sh setup
#   launch/tpu_vm.sh --config configs/imagenet10_mpl.py --workdir gs://my-bucket/imagenet10_mpl \
#       --background run -- --config.data.data_dir=gs://my-bucket/tensorflow_datasets
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh delete
#
# Multi-host gcloud ssh (--worker=all) needs your key in an agent first:
#   eval "$(ssh-agent -s)" && ssh-add ~/.ssh/google_compute_engine
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 1; }
say() { echo "==> $*" >&2; }

TPU_NAME=${TPU_NAME:-mpl-tpu}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
CONFIG=${CONFIG:-}
WORKDIR=${WORKDIR:-}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
BACKGROUND=${BACKGROUND:-0}
DRY_RUN=${DRY_RUN:-0}
# On the workers, relative to the home directory.
REMOTE_DIR=mpl
REMOTE_VENV=mpl_venv
REMOTE_LOG=mpl_run.log
REMOTE_PID=mpl_run.pid
tarball=''

COMMAND=''
EXTRA=()
while (($#)); do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) TPU_NAME=${2:?--name needs a value}; shift ;;
    --zone) ZONE=${2:?--zone needs a value}; shift ;;
    --type|--accelerator-type) ACCELERATOR_TYPE=${2:?--type needs a value}; shift ;;
    --version|--runtime-version) RUNTIME_VERSION=${2:?--version needs a value}; shift ;;
    --project) PROJECT=${2:?--project needs a value}; shift ;;
    --spot) SPOT=1 ;;
    --repo-url) REPO_URL=${2:?--repo-url needs a value}; shift ;;
    --repo-ref) REPO_REF=${2:?--repo-ref needs a value}; shift ;;
    --config) CONFIG=${2:?--config needs a value}; shift ;;
    --workdir) WORKDIR=${2:?--workdir needs a value}; shift ;;
    --python) PYTHON_VERSION=${2:?--python needs a value}; shift ;;
    --background) BACKGROUND=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [[ -z $COMMAND ]] || die "one command at a time (got '$COMMAND' and '$1')"
       COMMAND=$1 ;;
  esac
  shift
done
[[ -n $COMMAND ]] || { usage >&2; die "no command given (create, setup, run, all, status, logs, stop, delete)"; }

if [[ -z $RUNTIME_VERSION ]]; then
  case "$ACCELERATOR_TYPE" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
  esac
fi

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found. Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login' and 'gcloud config set project PROJECT'."
fi

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=(--project="$PROJECT")

# Prints a command, then runs it (unless --dry-run).
run() {
  printf '+' >&2; printf ' %q' "$@" >&2; printf '\n' >&2
  [[ $DRY_RUN == 1 ]] || "$@"
}

# remote WORKERS SCRIPT: runs SCRIPT (bash) on the workers (all, or an index) of the TPU.
remote() {
  local workers=$1 script=$2
  say "on worker(s) $workers of $TPU_NAME:"
  printf '      %s\n' "${script//$'\n'/$'\n      '}" >&2
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --worker="$workers")
  printf '+' >&2; printf ' %q' "${cmd[@]}" >&2; printf ' --command=<the lines above>\n' >&2
  [[ $DRY_RUN == 1 ]] || "${cmd[@]}" --command="$script"
}

require() {  # require VAR FLAG: fail unless $VAR is set
  [[ -n ${!1} ]] || die "$1 is not set: pass $2 or export $1 (see --help)."
}

do_create() {
  say "creating TPU $TPU_NAME ($ACCELERATOR_TYPE, runtime $RUNTIME_VERSION) in $ZONE"
  local flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ $SPOT != 1 ]] || flags+=(--spot)
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_FLAGS[@]}" "${flags[@]}"
}

do_setup() {
  local fetch
  if [[ -n $REPO_URL ]]; then
    say "workers will clone $REPO_URL${REPO_REF:+ ($REPO_REF)}"
    fetch="git clone --depth 1 ${REPO_REF:+--branch $(printf %q "$REPO_REF") }$(printf %q "$REPO_URL") $REMOTE_DIR"
  else
    tarball=$(mktemp "${TMPDIR:-/tmp}/mpl_src.XXXXXX")
    trap 'rm -f "$tarball"' EXIT
    say "packing $REPO_ROOT (tracked and untracked files, not git-ignored ones) into $tarball"
    if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1; then
      (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e $f ]] || continue; printf '%s\0' "$f"; done \
        | tar -czf "$tarball" --null -T -)
    else
      tar -czf "$tarball" -C "$REPO_ROOT" --exclude=.git --exclude=runs --exclude=__pycache__ .
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:mpl_src.tar.gz" "${GCLOUD_FLAGS[@]}" \
      --worker=all
    fetch="mkdir -p $REMOTE_DIR && tar -xzf mpl_src.tar.gz -C $REMOTE_DIR && rm mpl_src.tar.gz"
  fi
  # Ubuntu 22.04 TPU images ship Python 3.10; the pinned jax needs >= 3.11: uv brings one.
  remote all "set -euo pipefail
cd ~
rm -rf $REMOTE_DIR
$fetch
python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv
rm -rf $REMOTE_VENV
~/.local/bin/uv venv -q --python $(printf %q "$PYTHON_VERSION") $REMOTE_VENV
jax_version=\$(sed -n 's/^jax==\\([0-9.]*\\).*/\\1/p' $REMOTE_DIR/requirements.txt)
~/.local/bin/uv pip install -q --python $REMOTE_VENV/bin/python -r $REMOTE_DIR/requirements.txt \"jax[tpu]==\$jax_version\"
$REMOTE_VENV/bin/python -c 'import jax, flax; print(\"jax\", jax.__version__, \"flax\", flax.__version__)'"
}

do_run() {
  require CONFIG --config
  require WORKDIR --workdir
  if [[ $WORKDIR != gs://* && $WORKDIR != /* ]]; then
    say "warning: WORKDIR=$WORKDIR is relative: on a pod slice every worker would write its own" \
        "copy (and setup deletes ~/$REMOTE_DIR). Use gs://bucket/path or a shared mount."
  fi
  local main arg
  main="\$HOME/$REMOTE_VENV/bin/python -m mpl.main --config $(printf %q "$CONFIG")"
  main+=" --workdir $(printf %q "$WORKDIR") --distributed"
  for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do main+=" $(printf %q "$arg")"; done
  say "running on every worker of $TPU_NAME; the same command with the same workdir resumes"
  if [[ $BACKGROUND == 1 ]]; then
    remote all "set -euo pipefail
cd ~/$REMOTE_DIR
setsid nohup $main > ~/$REMOTE_LOG 2>&1 < /dev/null &
echo \$! > ~/$REMOTE_PID
echo \"started pid \$(cat ~/$REMOTE_PID) on \$(hostname), log ~/$REMOTE_LOG\""
    say "follow with: $0 --name $TPU_NAME --zone $ZONE logs"
  else
    remote all "set -euo pipefail
cd ~/$REMOTE_DIR
$main"
  fi
}

do_status() {
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}" \
    --format='table(name.basename(), state, health, acceleratorType, runtimeVersion)'
}

do_logs() {
  remote 0 "tail -n 100 -F ~/$REMOTE_LOG"
}

do_stop() {
  remote all "if [ -f ~/$REMOTE_PID ] && kill -0 \$(cat ~/$REMOTE_PID) 2>/dev/null; then
  kill -TERM \$(cat ~/$REMOTE_PID) && echo \"\$(hostname): SIGTERM sent (checkpoint, then exit)\"
else
  echo \"\$(hostname): no running mpl job\"
fi"
}

do_delete() {
  say "deleting TPU $TPU_NAME in $ZONE"
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
}

case "$COMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  all) require CONFIG --config; require WORKDIR --workdir; do_create; do_setup; do_run ;;
  status) do_status ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  *) die "unknown command '$COMMAND' (create, setup, run, all, status, logs, stop, delete)" ;;
esac
