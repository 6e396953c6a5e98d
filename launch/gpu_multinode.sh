#!/usr/bin/env bash
# Runs mpl on several GPU nodes: one process per node, all of that node's GPUs.
#
# Usage: launch/gpu_multinode.sh CONFIG WORKDIR [EXTRA_MPL_MAIN_FLAGS ...]
#
#   CONFIG    configs/<file>.py[:args], e.g. configs/imagenet10_mpl.py
#   WORKDIR   a directory every node sees (a shared file system); rerunning with the same
#             WORKDIR resumes from its latest checkpoint
#   EXTRA     passed to python -m mpl.main unchanged, e.g. --config.mesh.model=8
#
# 1. SLURM: submit from the repository root; the #SBATCH lines below are defaults, override
#    them on the command line. jax.distributed.initialize() finds the coordinator, the number
#    of processes and this process's index from SLURM's environment.
#
#      sbatch --nodes=4 --gpus-per-node=8 launch/gpu_multinode.sh \
#          configs/imagenet10_mpl.py /shared/runs/imagenet10_mpl \
#          --config.data.data_dir=/shared/tensorflow_datasets
#
#    A SIGTERM 5 minutes before the time limit (--signal) makes the trainer save a checkpoint
#    and exit; submit the same command again (or add --requeue) to continue.
#
# 2. No SLURM: run this script on every node at the same time with
#      NUM_NODES    number of nodes
#      NODE_RANK    this node's index, 0 .. NUM_NODES-1 (node 0 hosts the coordinator)
#      COORDINATOR  host:port of node 0, reachable from every node (any free port)
#
#      # on node 0 (10.0.0.1), then the same on node 1 with NODE_RANK=1:
#      NUM_NODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:12345 \
#          launch/gpu_multinode.sh configs/imagenet10_mpl.py /shared/runs/imagenet10_mpl
#
# Environment (both modes): PYTHON (default python3; e.g. a venv's python with the packages of
# requirements.txt plus jax[cuda12] of the same version), REPO_DIR (default: under SLURM the
# directory sbatch was called from, else this script's repository).
#
#SBATCH --job-name=mpl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=mpl-%j.out
set -euo pipefail

usage() { sed -n '2,/^#SBATCH/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 1; }

if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
(($# >= 2)) || { usage >&2; die "CONFIG and WORKDIR are required."; }
CONFIG=$1
WORKDIR=$2
shift 2

PYTHON=${PYTHON:-python3}
# Explicit coordinator when COORDINATOR is set (even inside a SLURM allocation), else SLURM.
if [[ -n ${COORDINATOR:-} ]]; then
  MODE=explicit
elif [[ -n ${SLURM_JOB_ID:-} ]]; then
  MODE=slurm
else
  die "neither SLURM (submit with sbatch) nor COORDINATOR=host:port with NUM_NODES and NODE_RANK; see --help."
fi
if [[ $MODE == slurm ]]; then
  REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
else
  REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
fi
[[ -f $REPO_DIR/mpl/main.py ]] || die "$REPO_DIR is not the mpl repository (no mpl/main.py): run from the repository root or set REPO_DIR."
cd "$REPO_DIR"
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON not found."

MAIN=("$PYTHON" -m mpl.main --config "$CONFIG" --workdir "$WORKDIR" --distributed)

# Inside a SLURM allocation jax.distributed.initialize() gives each process only the GPU of its
# SLURM_LOCALID (it assumes one process per GPU). Here one process per node drives every GPU of
# its node: name them all (JAX reads JAX_LOCAL_DEVICE_IDS first). Nodes are alike (--gpus-per-node).
if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} ]]; then
  gpus=${SLURM_GPUS_ON_NODE:-}
  if [[ -z $gpus && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
  elif [[ -z $gpus ]]; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  if [[ $gpus =~ ^[1-9][0-9]*$ ]]; then
    JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
    export JAX_LOCAL_DEVICE_IDS
    echo "==> each process drives GPUs $JAX_LOCAL_DEVICE_IDS of its node" >&2
  fi
fi

if [[ $MODE == slurm ]]; then
  # One task per node; JAX reads the coordinator and the process ids from SLURM.
  nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  echo "==> SLURM job $SLURM_JOB_ID: $nodes node(s), one process each, in $REPO_DIR" >&2
  set -x
  srun --nodes="$nodes" --ntasks-per-node=1 "${MAIN[@]}" "$@"
else
  : "${NUM_NODES:?set NUM_NODES (with NODE_RANK and COORDINATOR); see --help}"
  : "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1); see --help}"
  [[ $NUM_NODES =~ ^[1-9][0-9]*$ ]] || die "NUM_NODES=$NUM_NODES is not a positive integer."
  if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NUM_NODES)); then
    die "NODE_RANK=$NODE_RANK must be an integer in 0 .. $((NUM_NODES - 1))."
  fi
  [[ $COORDINATOR == *:* ]] || die "COORDINATOR=$COORDINATOR must be host:port."
  echo "==> node $NODE_RANK of $NUM_NODES, coordinator $COORDINATOR, in $REPO_DIR" >&2
  set -x
  exec "${MAIN[@]}" --coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES" \
    --process_id="$NODE_RANK" "$@"
fi
