#!/usr/bin/env bash
# The GPU figures the open issues ask for, in two device calls (a session has 15 device-minutes
# in all, machine start included: run `speed` first; `compare` if the time is left).
#
# Here, on the CPU machine (once per session; .gpu_carry/ is ignored by git):
#   bash launch/gpu_figures.sh prepare
#     -> .gpu_carry/wheels (ml_collections: the GPU image lacks it; it has absl-py and PyYAML) and
#        .gpu_carry/fashion-mnist (the Debian package's 4 files; the GPU machine has no network)
# On the GPU (the `device` tool: run with carry [".gpu_carry"], timeout_s 580):
#   bash launch/gpu_figures.sh speed     # ~8 min (estimate): MPL step fp32/bf16 + profile, augmentation, Fashion all labels
#   bash launch/gpu_figures.sh compare   # ~7 min (estimate): Fashion-MNIST 1000 labels, supervised vs MPL x 3
# Each training run is cut at $RUN_TIMEOUT s (default 240). Every result is one JSON line in $OUT (the device tool returns that folder) and in the log.
# Runs go to $RUNS/NAME (default /tmp/runs); a mode refuses to start where one of its runs
# already finished there (summary.json), unless OVERWRITE=1.
# Rehearsed on a CPU in a venv like the GPU image (Python 3.12, jax 0.11.2, numpy 2.5.2, no
# TensorFlow / clu / ml_collections): `SMOKE=1 bash launch/gpu_figures.sh speed|compare` runs
# every command on the runlocal configs in ~3 min each; both passed there (again on 2026-12-03,
# also without matplotlib: the runs and compare_runs then skip their figures). The full-size
# commands, cut short ($BENCH_ARGS: more mpl.bench flags; $EXTRA: more --config flags for every
# training run):
#   BENCH_ARGS='--steps 1 --warmup 0 --profile_steps 1' EXTRA='--config.total_steps=4' \
#     RUNS=/tmp/full_runs OUT=/tmp/full_out bash launch/gpu_figures.sh speed     (~35 min)
#   STEPS=4 EXTRA='--config.batch_size=16 --config.mu=2 --config.eval_every=2' \
#     RUNS=/tmp/full_runs OUT=/tmp/full_out bash launch/gpu_figures.sh compare   (~10 min)
# also passed there.
#
#   speed:   mpl.bench of configs/cifar10_4k_mpl.py (WRN-28-2, batch 128 + 7 x 128, 32x32x3,
#            stand-in pixels) in float32 and bfloat16 (issue target: <= 32 ms/step in bf16),
#            the bfloat16 one with --profile (what limits the step: $OUT/profile_bfloat16.txt),
#            float32 with remat (its memory_analysis calibrates `mpl.bench --dry_run`), the
#            strong augmentation alone (issue: images/s and share of the MPL step),
#            supervised WRN-28-2 on all 60,000 Fashion-MNIST labels (issue target: >= 92 %),
#            and bfloat16 with h measured in bfloat16 (`mpl.h_dtype=model`: the float32
#            labeled passes' cost).
#   compare: at 1000 labels and equal steps ($STEPS, default 2000): supervised, MPL with each
#            feedback mode; the official_release run's teacher is plain UDA. Expected ordering:
#            MPL > UDA > supervised. Ends with launch/compare_runs.py: $OUT/compare.md (table)
#            and $OUT/compare.png (curves); then launch/h_noise.py --compare h_dtype on the
#            first_order run: TF32 rounding in its h ($OUT/h_dtype.txt). $MODEL (wrn28_2 |
#            cnn | cnn_small) and $EXTRA (more --config flags) scale it down; the settings of
#            the CPU study in docs/fashion_mnist.md (there run with mpl.main directly) are
#              MODEL=cnn_small EXTRA='--config.batch_size=32 --config.mu=4 --config.eval_every=250' \
#              RUN_TIMEOUT=3600 bash launch/gpu_figures.sh compare   (after `prepare`)
#            That study found the recipe's UDA weight 8 holds a small teacher below supervised
#            learning at 2000 steps and weight 1 does not: RUNS=/tmp/runs_uda1
#            EXTRA='--config.mpl.uda_weight=1' is the variant to run second if device time is
#            left (its own RUNS: a warm machine still holds the first compare's runs).
set -euo pipefail
usage() { sed -n '2,/^set -euo/{/^set -euo/!p}' "$0"; }
refuse() {  # refuse MESSAGE: one error line and the short usage, exit 2 before any work
  echo "error: $1" >&2
  echo "usage: bash launch/gpu_figures.sh prepare | speed | compare   (--help: the details)" >&2
  exit 2
}
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  prepare|speed|compare) ;;
  '') refuse "no mode given; use prepare | speed | compare" ;;
  *) refuse "unknown mode '$1'; use prepare | speed | compare" ;;
esac
if (( $# > 1 )); then
  refuse "unexpected arguments after '$1': ${*:2}; settings go in environment variables \
(OUT, RUNS, STEPS, MODEL, EXTRA, BENCH_ARGS, RUN_TIMEOUT, SMOKE, PY, OVERWRITE), \
e.g. STEPS=500 bash launch/gpu_figures.sh compare"
fi
RUNS=$(realpath -m "${RUNS:-/tmp/runs}")  # before the cd: a relative RUNS is the caller's
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_figures}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
PY=${PY:-python3}  # the GPU image has python3 (its jax, flax, optax, orbax), maybe no `python`
# SMOKE=1 runs the same commands on the runlocal configs for a few steps: a rehearsal on a CPU
# (e.g. in a Python 3.12 venv like the GPU image's, without TensorFlow, clu or ml_collections).
BENCH_CONFIG=configs/cifar10_4k_mpl.py
BENCH_STEPS=50
REMAT_STEPS=10  # only its memory analysis is wanted
RUNLOCAL=
if [[ -n "${SMOKE:-}" ]]; then
  BENCH_CONFIG=configs/cifar10_4k_mpl.py:runlocal
  BENCH_STEPS=2
  REMAT_STEPS=2
  RUNLOCAL=,runlocal
fi

setup_device() {
  # The image's site-packages may be read-only: the carried wheel goes to its own folder.
  if ! "$PY" -c "import ml_collections" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
      .gpu_carry/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU'; } |
    tee "$OUT/gpu.txt"
  "$PY" -c 'import jax; print(jax.default_backend())' > "$OUT/backend.txt"   # gpu | cpu
}

# Each run starts afresh in $RUNS/NAME (always empty on the device machine). Elsewhere a
# finished run there is someone's result: refuse before any work rather than delete it.
check_fresh() {  # check_fresh NAME...
  local name finished=()
  for name in "$@"; do
    [[ -f $RUNS/$name/summary.json ]] && finished+=("$RUNS/$name")
  done
  if (( ${#finished[@]} )) && [[ -z "${OVERWRITE:-}" ]]; then
    echo "error: a finished run (summary.json) is in ${finished[*]}; this mode would delete it to \
start afresh. Move it elsewhere to keep it, set RUNS=DIR to run in another folder, or set \
OVERWRITE=1 to replace it." >&2
    exit 2
  fi
}

bench() {  # bench NAME FLAGS...: one mpl.bench JSON line to results.jsonl, stderr to NAME.err
  local name=$1
  shift
  # shellcheck disable=SC2086  # $BENCH_ARGS: more mpl.bench flags for every bench, word-split
  "$PY" -m mpl.bench "$@" ${BENCH_ARGS:-} 2>"$OUT/$name.err" | tee -a "$OUT/results.jsonl" ||
    echo "$name failed" | tee -a "$OUT/errors.txt"
}

fashion() {  # fashion NAME CONFIG_ARGS [--config.x=y ...]
  local name=$1 args=$2
  shift 2
  rm -rf "${RUNS:?}/$name"   # checked by check_fresh at the start of the mode
  timeout "${RUN_TIMEOUT:-240}" "$PY" -m mpl.main --config "configs/fashion_mnist.py:$args$RUNLOCAL" \
    --workdir "$RUNS/$name" --config.data.data_dir="$PWD/.gpu_carry" \
    --config.data.source=idx "$@" > "$OUT/$name.log" 2>&1 || echo "$name failed" | tee -a "$OUT/errors.txt"
  "$PY" - "$RUNS/$name" <<'EOF' | tee -a "$OUT/results.jsonl"
import json, sys
workdir = sys.argv[1]
name = workdir.rstrip('/').rsplit('/', 1)[-1]
try:
  s = json.load(open(f'{workdir}/summary.json'))
  print(json.dumps({'run': name, 'steps': s['steps'], 'wall_s': s['wall_s'], 'final': s['final'],
                    'best': s['best'], 'median_last_20': s['median_last_20']}))
except (OSError, ValueError, KeyError) as e:   # one failed run must not stop the rest
  # A run cut by $RUN_TIMEOUT (SIGTERM: a checkpoint, no summary) still logged its evaluations.
  evals = []
  try:
    for line in open(f'{workdir}/metrics.jsonl'):
      record = json.loads(line)
      if any(k.startswith('eval/') for k in record):
        evals.append(record)
  except (OSError, ValueError):
    pass
  print(json.dumps({'run': name, 'error': f'no usable summary.json: {e!r}',
                    'last_eval': evals[-1] if evals else None}))
EOF
}

case "${1:-}" in
  prepare)
    rm -rf .gpu_carry/wheels
    mkdir -p .gpu_carry/wheels .gpu_carry/fashion-mnist
    grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >> .git/info/exclude
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu_carry/fashion-mnist/
    pip download -q --no-deps --only-binary=:all: -d .gpu_carry/wheels "ml_collections==1.1.0"
    du -sh .gpu_carry
    ;;
  speed)
    check_fresh fashion_all_wrn
    setup_device
    bench bench_float32 --config $BENCH_CONFIG --steps $BENCH_STEPS --config.data.standin=always \
      --config.model.dtype=float32
    # --profile: 3 more steps traced after the timed ones (on a GPU, of the step compiled again
    # with command buffers off); where the time goes, per kind of op and per stage of the MPL
    # update, in $OUT/profile_bfloat16.txt (the trace stays in /tmp). bfloat16 only: the
    # second compile costs device time.
    rm -rf /tmp/profile_bfloat16
    bench bench_bfloat16 --config $BENCH_CONFIG --steps $BENCH_STEPS --config.data.standin=always \
      --config.model.dtype=bfloat16 --profile /tmp/profile_bfloat16
    cp /tmp/profile_bfloat16/profile.txt "$OUT/profile_bfloat16.txt" 2>/dev/null ||
      echo "no profile for bfloat16" | tee -a "$OUT/errors.txt"
    # Calibrates the CPU dry run: GPU memory_analysis with and without remat, fp32.
    bench bench_remat --config $BENCH_CONFIG --steps $REMAT_STEPS --config.data.standin=always \
      --config.model.remat=True
    bench augment --config $BENCH_CONFIG --augment_only --steps $BENCH_STEPS \
      --config.data.standin=always
    # shellcheck disable=SC2086
    fashion fashion_all_wrn 'labels=-1' --config.eval_every=2500 ${EXTRA:-}
    # Last, as the first to lose if time runs out: what measuring h in float32 costs a bfloat16
    # step (mpl.h_dtype; the bfloat16 bench above has the default, 'float32').
    bench bench_h_model --config $BENCH_CONFIG --steps $BENCH_STEPS --config.data.standin=always \
      --config.model.dtype=bfloat16 --config.mpl.h_dtype=model
    ;;
  compare)
    check_fresh fm1000_supervised fm1000_mpl_{first_order,exact,official_release}
    setup_device
    steps=${STEPS:-2000}
    model=${MODEL:-wrn28_2}
    # shellcheck disable=SC2086  # $EXTRA: extra --config.x=y flags for every run, word-split
    fashion fm1000_supervised "labels=1000,model=$model,steps=$steps" ${EXTRA:-}
    h_step=$((steps / 2))   # a checkpoint mid-run, for h_noise below
    for feedback in first_order exact official_release; do
      # shellcheck disable=SC2086
      fashion "fm1000_mpl_$feedback" "method=mpl,labels=1000,model=$model,steps=$steps" \
        --config.mpl.feedback=$feedback --config.checkpoint_every=$h_step ${EXTRA:-}
    done
    runs=()   # only the runs that got as far as logging (a failed one must not lose the table)
    for run in "$RUNS"/fm1000_supervised "$RUNS"/fm1000_mpl_*; do
      [[ -f $run/summary.json || -f $run/metrics.jsonl ]] && runs+=("$run")
    done
    if (( ${#runs[@]} )); then
      "$PY" -m launch.compare_runs "${runs[@]}" --out "$OUT/compare.png" \
        --title "Fashion-MNIST, 1000 labels, $model, $steps steps" | tee "$OUT/compare.md" ||
        echo "compare_runs failed" | tee -a "$OUT/errors.txt"
    fi
    # Last: h of the float32 MPL run measured at the GPU's default float32 precision (TF32) and
    # at full float32 (mpl.h_dtype), 16 keys at mid-run. (SMOKE: its last checkpoint. A CPU
    # rehearsal measures it as a bfloat16 network: a CPU's float32 is exact, h_noise refuses.)
    h_args=(--step "$h_step")
    [[ -n "${SMOKE:-}" ]] && h_args=()
    [[ $(cat "$OUT/backend.txt") == cpu ]] && h_args+=(--dtype bfloat16)
    "$PY" -m launch.h_noise "$RUNS/fm1000_mpl_first_order" --keys 16 --compare h_dtype \
      "${h_args[@]}" --out "$OUT/h_dtype.json" 2>"$OUT/h_dtype.err" | tee "$OUT/h_dtype.txt" ||
      echo "h_noise failed" | tee -a "$OUT/errors.txt"
    ;;
esac
