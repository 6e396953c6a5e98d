#!/usr/bin/env bash
# The GPU figures the open issues ask for, in two device calls. A session has 15 device-minutes
# in all, machine start (1-2 min) included: run `speed` first; `compare` only if >= 8 min are
# left (its four training runs rarely fit after `speed`: give it a session of its own).
#
# Here, on the CPU machine (once per session; .gpu_carry/ is ignored by git):
#   bash launch/gpu_figures.sh prepare
#     -> .gpu_carry/wheels (ml_collections: the GPU image lacks it; it has absl-py and PyYAML) and
#        .gpu_carry/fashion-mnist (the Debian package's 4 files; the GPU machine has no network)
# On the GPU (the `device` tool: run with carry [".gpu_carry"], timeout_s 580):
#   bash launch/gpu_figures.sh speed     # ~8 min (estimate), most important figures first
#   bash launch/gpu_figures.sh compare   # ~8 min (estimate): Fashion-MNIST 1000 labels
# The device tool returns at most 8 files from $OUT: each mode writes results.jsonl (one JSON
# line per result, the first one naming the GPU, backend and jax version), errors.txt (what
# failed or was skipped), logs.tgz (every log, packed again after each step, so a command cut
# short still returns them) and its own few files (below; speed: summary.txt, the figures in a
# few lines, from launch/speed_summary.py). Each mode ends its work by $BUDGET s
# (default 540: inside a 580 s call): every step gets at most $RUN_TIMEOUT s (default 240) and
# what is left, and a step that cannot get 30 s is skipped (errors.txt says so).
# Runs go to $RUNS/NAME (default /tmp/runs); a mode refuses to start where one of its runs
# already finished there (summary.json), unless OVERWRITE=1.
# Rehearsed on a CPU in a venv like the GPU image (Python 3.12, jax 0.11.2 and 0.12.0.1, no
# TensorFlow / clu / ml_collections / matplotlib): `SMOKE=1 bash launch/gpu_figures.sh
# speed|compare` runs every command on the runlocal configs in ~3 min each. The full-size
# commands, cut short ($BENCH_ARGS: more mpl.bench flags; $EXTRA: more --config flags for every
# training run), with BUDGET=100000 RUN_TIMEOUT=100000 on a CPU:
#   BENCH_ARGS='--steps 1 --warmup 0 --profile_steps 1' EXTRA='--config.total_steps=4' \
#     RUNS=/tmp/full_runs OUT=/tmp/full_out bash launch/gpu_figures.sh speed     (~35 min)
#   STEPS=4 EXTRA='--config.batch_size=16 --config.mu=2 --config.eval_every=2' \
#     RUNS=/tmp/full_runs OUT=/tmp/full_out bash launch/gpu_figures.sh compare   (~10 min)
#
#   speed, in this order (the first to lose if time runs out come last):
#            1. mpl.bench of configs/cifar10_4k_mpl.py (WRN-28-2, batch 128 + 7 x 128, 32x32x3,
#               stand-in pixels) in float32 (XLA's default GPU precision: TF32 convolutions),
#            2. the same in bfloat16 (issue target: <= 32 ms/step), with --profile: what limits
#               the step, per kind of op and per stage of the MPL update (its `views` stage is
#               the strong augmentation's share of the step) -> $OUT/profile_bfloat16.txt,
#            3. the strong augmentation alone on 1792 images (issue: images/s),
#            4. supervised Fashion-MNIST, all 60,000 labels, small CNN (target >= 92 %),
#            5. the same with WRN-28-2,
#            6. float32 with remat (its memory_analysis calibrates `mpl.bench --dry_run`),
#            7. bfloat16 with h measured in bfloat16 (`mpl.h_dtype=model`: what the float32
#               labeled passes cost).
#   compare: at 1000 labels and equal steps ($STEPS, default 2000): supervised, then MPL with
#            official_release (its teacher is plain UDA), first_order, exact. Expected ordering:
#            MPL > UDA > supervised. Then launch/compare_runs.py: $OUT/compare.md (table),
#            compare.png (curves) and compare.json (rows); then launch/h_noise.py --compare
#            h_dtype on the first_order run: TF32 rounding in its h ($OUT/h_dtype.txt, .json).
#            $MODEL (wrn28_2 | cnn | cnn_small) and $EXTRA (more --config flags) scale it
#            down; the settings of the CPU study in docs/fashion_mnist.md (there run with
#            mpl.main directly) are
#              MODEL=cnn_small EXTRA='--config.batch_size=32 --config.mu=4 --config.eval_every=250' \
#              BUDGET=100000 RUN_TIMEOUT=3600 bash launch/gpu_figures.sh compare   (after `prepare`)
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
(OUT, RUNS, STEPS, MODEL, EXTRA, BENCH_ARGS, RUN_TIMEOUT, BUDGET, SMOKE, PY, OVERWRITE), \
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

DEADLINE=$((SECONDS + ${BUDGET:-540}))
LOGS=$(mktemp -d /tmp/gpu_figures_logs.XXXXXX)   # this call's logs, packed into $OUT/logs.tgz

pack_logs() {
  tar -czf "$OUT/logs.tgz" -C "$LOGS" . 2>/dev/null || true
}

note() {  # note MESSAGE: one line in errors.txt (and on stderr)
  echo "$1" | tee -a "$OUT/errors.txt" >&2
}

# time_for NAME: the seconds step NAME may take (at most $RUN_TIMEOUT, and what is left before
# $DEADLINE but for $RESERVE s kept for the steps that summarise); non-zero status if < 30 s.
RESERVE=0
time_for() {
  local left=$((DEADLINE - SECONDS - RESERVE)) cap=${RUN_TIMEOUT:-240}
  (( left < cap )) && cap=$left
  if (( cap < 30 )); then
    note "$1 skipped: it would get ${cap}s (RUN_TIMEOUT=${RUN_TIMEOUT:-240}; ${left}s left of \
BUDGET=${BUDGET:-540} but for RESERVE=${RESERVE}s)"
    return 1
  fi
  echo "$cap"
}

setup_device() {
  # The image's site-packages may be read-only: the carried wheel goes to its own folder.
  if ! "$PY" -c "import ml_collections" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
      .gpu_carry/wheels/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  local gpu
  gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no GPU')
  BACKEND=$("$PY" -c 'import jax; print(jax.default_backend())')   # gpu | cpu
  GPU="$gpu" BACKEND="$BACKEND" MODE="$1" "$PY" -c '
import json, os, platform, jax
print(json.dumps({"setup": {"mode": os.environ["MODE"], "gpu": os.environ["GPU"],
                            "backend": os.environ["BACKEND"], "jax": jax.__version__,
                            "python": platform.python_version(),
                            "smoke": bool(os.environ.get("SMOKE"))}}))' | tee -a "$OUT/results.jsonl"
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

bench() {  # bench NAME FLAGS...: one mpl.bench JSON line to results.jsonl, stderr to the logs
  local name=$1 limit
  shift
  limit=$(time_for "$name") || return 0
  # shellcheck disable=SC2086  # $BENCH_ARGS: more mpl.bench flags for every bench, word-split
  timeout -k 20 "$limit" "$PY" -m mpl.bench "$@" ${BENCH_ARGS:-} 2>"$LOGS/$name.err" |
    "$PY" -c 'import json, sys
for line in sys.stdin:   # the record, named after its step of this script
  print(json.dumps({"name": sys.argv[1], **json.loads(line)}), flush=True)' "$name" |
    tee -a "$OUT/results.jsonl" || note "$name failed (or ran past ${limit}s): see logs.tgz $name.err"
  pack_logs
}

fashion() {  # fashion NAME CONFIG_ARGS [--config.x=y ...]
  local name=$1 args=$2 limit
  shift 2
  rm -rf "${RUNS:?}/$name"   # checked by check_fresh at the start of the mode
  limit=$(time_for "$name") || return 0
  timeout -k 20 "$limit" "$PY" -m mpl.main --config "configs/fashion_mnist.py:$args$RUNLOCAL" \
    --workdir "$RUNS/$name" --config.data.data_dir="$PWD/.gpu_carry" \
    --config.data.source=idx "$@" > "$LOGS/$name.log" 2>&1 ||
    note "$name failed (or ran past ${limit}s, its last evaluation kept): see logs.tgz $name.log"
  pack_logs
  "$PY" - "$RUNS/$name" "$args$RUNLOCAL" "$*" <<'EOF' | tee -a "$OUT/results.jsonl"
import json, sys
workdir, config_args, flags = sys.argv[1:4]
name = workdir.rstrip('/').rsplit('/', 1)[-1]
record = {'run': name, 'config': f'configs/fashion_mnist.py:{config_args}', 'flags': flags}
try:
  config = json.load(open(f'{workdir}/config.json'))
  record.update(model=config['model']['name'], dtype=config['model'].get('dtype'),
                num_labeled=config['num_labeled'], total_steps=config['total_steps'])
except (OSError, ValueError, KeyError):
  pass
try:
  s = json.load(open(f'{workdir}/summary.json'))
  record.update(steps=s['steps'], wall_s=s['wall_s'], final=s['final'], best=s['best'],
                median_last_20=s['median_last_20'])
except (OSError, ValueError, KeyError) as e:   # one failed run must not stop the rest
  # A run cut by its time limit (SIGTERM: a checkpoint, no summary) still logged its evaluations.
  evals = []
  try:
    for line in open(f'{workdir}/metrics.jsonl'):
      line = json.loads(line)
      if any(k.startswith('eval/') for k in line):
        evals.append(line)
  except (OSError, ValueError):
    pass
  record.update(error=f'no usable summary.json: {e!r}', last_eval=evals[-1] if evals else None)
print(json.dumps(record))
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
    check_fresh fashion_all_cnn fashion_all_wrn
    setup_device speed
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
      note "no profile for bfloat16"
    # The issue's batch: the unlabeled part of one CIFAR-10-4K step, 1792 images (128 x mu 14;
    # the train step's own strong view is 128 x 7: its share is the profile's `views` stage).
    bench augment --config $BENCH_CONFIG --augment_only --steps $BENCH_STEPS \
      --config.data.standin=always --config.batch_size=128 --config.mu=14
    # shellcheck disable=SC2086
    fashion fashion_all_cnn 'labels=-1,model=cnn' --config.eval_every=2500 ${EXTRA:-}
    # shellcheck disable=SC2086
    fashion fashion_all_wrn 'labels=-1' --config.eval_every=2500 ${EXTRA:-}
    # Calibrates the CPU dry run: GPU memory_analysis with and without remat, fp32.
    bench bench_remat --config $BENCH_CONFIG --steps $REMAT_STEPS --config.data.standin=always \
      --config.model.dtype=float32 --config.model.remat=True
    # What measuring h in float32 costs a bfloat16 step (mpl.h_dtype; the bfloat16 bench above
    # has the default, 'float32').
    bench bench_h_model --config $BENCH_CONFIG --steps $BENCH_STEPS --config.data.standin=always \
      --config.model.dtype=bfloat16 --config.mpl.h_dtype=model
    # The figures in a few lines (also the end of the device tool's output_tail).
    "$PY" -m launch.speed_summary "$OUT/results.jsonl" | tee "$OUT/summary.txt" ||
      note "speed_summary failed"
    ;;
  compare)
    runs=(fm1000_supervised fm1000_mpl_{official_release,first_order,exact})
    check_fresh "${runs[@]}"
    setup_device compare
    steps=${STEPS:-2000}
    model=${MODEL:-wrn28_2}
    RESERVE=60   # for compare_runs and h_noise at the end
    # shellcheck disable=SC2086  # $EXTRA: extra --config.x=y flags for every run, word-split
    fashion fm1000_supervised "labels=1000,model=$model,steps=$steps" ${EXTRA:-}
    h_step=$((steps / 2))   # a checkpoint mid-run, for h_noise below
    # official_release first: its teacher is the UDA baseline; exact (second order) costs most.
    for feedback in official_release first_order exact; do
      # shellcheck disable=SC2086
      fashion "fm1000_mpl_$feedback" "method=mpl,labels=1000,model=$model,steps=$steps" \
        --config.mpl.feedback=$feedback --config.checkpoint_every=$h_step ${EXTRA:-}
    done
    RESERVE=0
    logged=()   # only the runs that got as far as logging (a failed one must not lose the table)
    for run in "${runs[@]}"; do
      [[ -f $RUNS/$run/summary.json || -f $RUNS/$run/metrics.jsonl ]] && logged+=("$RUNS/$run")
    done
    if (( ${#logged[@]} )) && limit=$(time_for compare_runs); then
      timeout -k 10 "$limit" "$PY" -m launch.compare_runs "${logged[@]}" --out "$OUT/compare.png" \
        --title "Fashion-MNIST, 1000 labels, $model, $steps steps" | tee "$OUT/compare.md" ||
        note "compare_runs failed"
    fi
    # Last: h of the float32 MPL run measured at the GPU's default float32 precision (TF32) and
    # at full float32 (mpl.h_dtype), 16 keys at mid-run. (SMOKE: its last checkpoint. A CPU
    # rehearsal measures it as a bfloat16 network: a CPU's float32 is exact, h_noise refuses.)
    h_args=(--step "$h_step")
    [[ -n "${SMOKE:-}" ]] && h_args=()
    [[ $BACKEND == cpu ]] && h_args+=(--dtype bfloat16)
    if [[ ! -d $RUNS/fm1000_mpl_first_order/checkpoints ]]; then
      note "h_noise skipped: the first_order run made no checkpoint"
    elif limit=$(time_for h_noise); then
      timeout -k 10 "$limit" "$PY" -m launch.h_noise "$RUNS/fm1000_mpl_first_order" --keys 16 \
        --compare h_dtype "${h_args[@]}" --out "$OUT/h_dtype.json" 2>"$LOGS/h_dtype.err" |
        tee "$OUT/h_dtype.txt" || note "h_noise failed: see logs.tgz h_dtype.err"
    fi
    pack_logs
    ;;
esac
