r"""How much of MPL's feedback h is the student's update, and how much is measurement noise.

    python -m launch.h_noise WORKDIR [--keys 16] [--step S] [--out h.json] [--plot h.png]
        [--compare h_pass|h_dtype] [--dtype bfloat16]

WORKDIR is an MPL (or Reduced MPL) run, finished or still going. The script restores its
checkpoint S (default: the latest) and runs the run's own train step from that state K times,
each time with a different random key (new dropout masks, augmentations and sampled pseudo
labels; the batch is the one of step S), once under each of two ways of measuring
h = f_old - f_new. `--compare h_pass` (default) compares the passes (`mpl.h_pass`,
`reduced_mpl.h_pass`):

  official  f_old from the student's training pass on concat(x_l, s(x_u)), f_new from a second
            pass on x_l alone with new dropout masks: the released code and the PyTorch port.
  paired    f_old and f_new each from one pass on x_l alone, with the same dropout key (default).

Under one key both make the same student step and the same f_new (paired is measured here in the
network's own precision, as official is: `mpl.h_dtype='model'`), so per key their difference is
f_old(concat pass) - f_old(labeled pass): dropout and batch-norm noise, not the update.
`--compare h_dtype` compares, under 'paired', the precision of the two labeled passes of a
bfloat16 network (`mpl.h_dtype`): 'model' (bfloat16, as the network trains) and 'float32' (the
default: float32 at full matmul precision). Both make the same bfloat16 student step, so per key
their difference is rounding. (On a GPU or TPU a float32 run can be compared too: 'model' is then
the default TF32 or bfloat16-pass precision of its float32 convolutions.)
`--dtype bfloat16` runs the networks (`model.dtype`) in that compute dtype, e.g. a float32 run's
checkpoint as a bfloat16 run would train from it (the parameters are float32 either way).
In what follows, "official" and "paired" read "model" and "float32" under --compare h_dtype.
Prints h's mean, population standard deviation, min and max under each mode, the per-key
difference (the noise), and the noise's and official h's standard deviations over paired h's
(the update's own spread); --out writes them with every per-key value as JSON, --plot draws
every key's h under each mode on one axis. The workdir is only read. The checkpoint step is
chosen once, so on a live run both modes start from the same state; a streamed run is read
from a fresh stream (the same batch for every key, not the one the run saw). h is always
f_old - f_new here; an `official_release` run logs the released sign, f_new - f_old, and an
`exact` run's teacher does not use h at all. For Reduced MPL each mode rebuilds the large
teacher's table before the checkpoint replaces it: the stage-1 workdir must still exist.

Measured on the 6000-step Fashion-MNIST MPL run of configs/fashion_mnist.py (cnn_small, UDA
weight 1, trained with h_pass=official), checkpoint 4000, 16 keys:
  python -m launch.h_noise /tmp/fm6k/mpl_w1 --step 4000 --keys 16
    h_pass        h mean     h std      h min      h max
    official    -0.07045   0.06926   -0.18125   +0.05228
    paired      -0.00099   0.00177   -0.00415   +0.00182
    official - paired, per key (the noise): mean -0.06946, std 0.06929
    std official / std paired = 39.2; std noise / std paired = 39.2
so the released h was about 40 parts noise to 1 part update. (The run was made with
  python -m mpl.main --config configs/fashion_mnist.py:method=mpl,labels=1000,model=cnn_small,steps=6000 \
      --workdir /tmp/fm6k/mpl_w1 --config.batch_size=32 --config.mu=4 --config.mpl.uda_weight=1 \
      --config.mpl.h_pass=official
 about 2.4 h on 2 CPU cores; the script takes 2 minutes.)

h of a bfloat16 network, measured in bfloat16 and in float32, on an 800-step run of the same
settings (checkpoint 600, student lr 0.0019, 32 keys; the run takes 10 minutes, the script 1):
  python -m mpl.main --config configs/fashion_mnist.py:method=mpl,labels=1000,model=cnn_small,steps=800 \
      --workdir /tmp/fm800 --config.batch_size=32 --config.mu=4 --config.mpl.uda_weight=1 \
      --config.checkpoint_every=200 --config.keep_checkpoints=10
  python -m launch.h_noise /tmp/fm800 --step 600 --keys 32 --compare h_dtype --dtype bfloat16
    h_dtype       h mean     h std      h min      h max
    model       -0.00093   0.00092   -0.00246   +0.00102
    float32     -0.00114   0.00077   -0.00294   +0.00023
    model - float32, per key (the noise): mean +0.00020, std 0.00056
    std model / std float32 = 1.19; std noise / std float32 = 0.725
so the bfloat16 measurement would add noise of 0.7 times h's spread, and a bias of a fifth of its
mean; at --step 800, where the student's lr is 0, the float32 h is 0 exactly and the bfloat16
one spreads by 0.00037. Hence `mpl.h_dtype='float32'`, the default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections

from mpl import config_lib, reporting, train
from mpl.errors import ConfigError, DataError

# Each comparison: (name, the method settings of that measurement) for the measurement under
# test, then the reference; per key both make the same student step.
COMPARISONS = {
    # Both in the network's own precision, so that per key only the passes differ.
    'h_pass': (('official', {'h_pass': 'official'}),
               ('paired', {'h_pass': 'paired', 'h_dtype': 'model'})),
    'h_dtype': (('model', {'h_pass': 'paired', 'h_dtype': 'model'}),
                ('float32', {'h_pass': 'paired', 'h_dtype': 'float32'})),
}
RECORDED = ('f_old', 'f_new', 'lr_student')


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'{path} not found: WORKDIR must be the --workdir of an MPL run.')
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise ConfigError(f'{path} is not valid JSON ({e}): it is corrupt or cut short, so the run '
                      f'cannot be rebuilt. Restore it from a copy, or use another run.') from None
  if not isinstance(saved, dict) or 'method' not in saved:
    raise ConfigError(f'{path} is not the config of a run of `python -m mpl.main` (no '
                      f'"method" in it): WORKDIR must be the --workdir of an MPL run.')
  config = config_lib.saved_run_config(saved)
  if config.method not in ('mpl', 'reduced_mpl'):
    raise ConfigError(f'{workdir} is a {config.method!r} run; h exists only in MPL runs '
                      "(method 'mpl' or 'reduced_mpl').")
  return config


def checkpoint_step(config, workdir: str, step: int | None) -> int:
  """`step` if the run has a checkpoint there, else an error naming the steps it has;
  None: the latest. Chosen once, so that both modes start from the same state of a live run."""
  checkpoints = train.Checkpoints(workdir, keep=config.keep_checkpoints, read_only=True)
  try:
    available = checkpoints.all_steps()
  finally:
    checkpoints.close()
  if not available:
    raise ConfigError(f'no checkpoint in {workdir}/checkpoints yet.')
  if step is None:
    return available[-1]
  if step not in available:
    raise ConfigError(f'no checkpoint at step {step} in {workdir}/checkpoints; '
                      f'the steps there: {available}.')
  return step


def h_under_keys(config, workdir: str, mode: str, settings: dict, num_keys: int,
                 step: int) -> dict:
  """Runs the train step from checkpoint `step` under `num_keys` keys with the method's
  `settings` (e.g. {'h_pass': 'paired'}); `mode` names them in progress lines."""
  config = ml_collections.ConfigDict(config.to_dict())
  config[config.method].update(settings)
  # Builds the run as its own loop does (for Reduced MPL that includes the large teacher's
  # table, which the restored state then replaces).
  experiment = train.build(config, workdir)
  checkpoints = train.Checkpoints(workdir, keep=config.keep_checkpoints, read_only=True)
  try:
    with experiment.activate():
      state, _ = checkpoints.restore(experiment.abstract_state, step)
  except FileNotFoundError as e:
    raise ConfigError(f'checkpoint {step} of {workdir} went away while this ran (a live run '
                      f'keeps only its last {config.keep_checkpoints}): choose a newer --step. '
                      f'({e})') from e
  finally:
    checkpoints.close()
  with experiment.activate():
    # One batch for every key: the in-memory sampler draws it from the step; a stream is
    # started at the step and read once (a fresh batch, not the one the run saw).
    if experiment.stream is None:
      inputs = experiment.arrays
    else:
      experiment.stream.start(step)
      inputs = experiment.stream.next_batch()
    values = {name: [] for name in RECORDED}
    for k in range(num_keys):
      key = jax.device_put(jax.random.fold_in(state.rng, k), state.rng.sharding)
      # The step donates its input state: hand it a copy with this key.
      trial = jax.tree.map(jnp.copy, state).replace(rng=key)
      _, metrics = experiment.train_step(trial, inputs)
      metrics = jax.device_get(metrics)
      for name in RECORDED:
        values[name].append(float(metrics[name]))
      if (k + 1) % max(num_keys // 10, 16) == 0:  # many keys take a while: show progress
        print(f'  {mode}: {k + 1}/{num_keys} keys', file=sys.stderr, flush=True)
  # h = f_old - f_new whatever the run's feedback (official_release logs f_new - f_old).
  values['h'] = [old - new for old, new in zip(values['f_old'], values['f_new'])]
  return {'step': int(state.step), 'values': values}


def describe(values: list[float]) -> dict:
  """Mean, population standard deviation, min and max."""
  return {'mean': statistics.fmean(values), 'std': statistics.pstdev(values),
          'min': min(values), 'max': max(values)}


def plot(path: str, runs: dict, title: str) -> None:
  """One row of points per measurement: each key's h, and a line at each one's mean."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 2.8))
  for row, (mode, run) in enumerate(runs.items()):
    h = run['values']['h']
    ax.scatter(h, [row] * len(h), s=18, alpha=0.7, color=f'C{row}',
               label=f'{mode}: std {statistics.pstdev(h):.2g}')
    ax.vlines(statistics.fmean(h), row - 0.3, row + 0.3, color=f'C{row}')
  ax.axvline(0.0, color='gray', linewidth=0.5)
  ax.set_yticks(range(len(runs)), list(runs))
  ax.set_ylim(-0.6, len(runs) - 0.4)
  ax.set_xlabel('h = f_old - f_new (one point per random key; bar: mean)')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8, loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('workdir')
  parser.add_argument('--keys', type=int, default=16, help='random keys per measurement')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  parser.add_argument('--out', default=None, help='write the results here as JSON')
  parser.add_argument('--plot', default=None, help='draw every key\'s h here (e.g. h.png)')
  parser.add_argument('--compare', choices=sorted(COMPARISONS), default='h_pass',
                      help='the two measurements of h to compare (default h_pass)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'), default=None,
                      help="the networks' compute dtype (default: the run's model.dtype)")
  args = parser.parse_args(argv)
  if args.keys < 1:
    parser.error('--keys must be at least 1')
  (tested, tested_settings), (reference, reference_settings) = COMPARISONS[args.compare]
  try:
    # Both outputs are checked first: they are written only after minutes of work.
    if args.out:
      reporting.check_out_path(args.out, '--out', figure=False)
    if args.plot:
      reporting.check_out_path(args.plot, '--plot')
    if args.out and args.plot and os.path.abspath(args.out) == os.path.abspath(args.plot):
      raise ConfigError(f'--out and --plot are both {args.out}: the figure would replace the '
                        f'JSON; give them different names (e.g. h.json and h.png).')
    config = read_config(args.workdir)
    if args.dtype:
      config.model.dtype = args.dtype
    dtype = config.model.get('dtype') or 'float32'
    if (args.compare == 'h_dtype' and jnp.dtype(dtype) == jnp.float32
        and jax.default_backend() == 'cpu'):
      raise ConfigError(f'{args.workdir} trains a float32 network, and a CPU computes float32 '
                        f'matmuls at full precision: both measurements of --compare h_dtype '
                        f'would be the same. Add --dtype bfloat16 to run it as a bfloat16 '
                        f'network.')
    step = checkpoint_step(config, args.workdir, args.step)
    runs = {mode: h_under_keys(config, args.workdir, mode, settings, args.keys, step)
            for mode, settings in ((tested, tested_settings), (reference, reference_settings))}
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  if not runs[tested]['step'] == runs[reference]['step'] == step:
    raise RuntimeError(f'restored steps {runs[tested]["step"]}, {runs[reference]["step"]}; '
                       f'asked for {step}')
  lr = runs[reference]['values']['lr_student'][0]
  print(f'{args.workdir}: checkpoint at step {step}, student lr {lr:.3g}, {args.keys} keys, '
        f'{dtype} network')
  print(f'  {args.compare:9s} {"h mean":>10s} {"h std":>9s} {"h min":>10s} {"h max":>10s}')
  stats = {}
  for mode in runs:
    s = stats[mode] = describe(runs[mode]['values']['h'])
    print(f'  {mode:9s} {s["mean"]:+10.5f} {s["std"]:9.5f} {s["min"]:+10.5f} {s["max"]:+10.5f}')
  # Per key both measurements see the same student step, so their difference is the noise alone.
  noise = [a - b for a, b in zip(runs[tested]['values']['h'], runs[reference]['values']['h'])]
  difference = f'{tested}_minus_{reference}'
  stats[difference] = describe(noise)
  update_std = stats[reference]['std']
  std_ratio = f'std_{tested}_over_{reference}'
  ratios = {std_ratio: stats[tested]['std'] / update_std,
            'noise_over_update': stats[difference]['std'] / update_std} \
      if update_std > 0 else {std_ratio: None, 'noise_over_update': None}
  print(f'  {tested} - {reference}, per key (the noise): mean {stats[difference]["mean"]:+.5f}, '
        f'std {stats[difference]["std"]:.5f}')
  if update_std > 0:
    print(f'  std {tested} / std {reference} = {ratios[std_ratio]:.3g}; '
          f'std noise / std {reference} = {ratios["noise_over_update"]:.3g}')
  else:
    print(f'  {reference} h is constant (the student does not move, or one key): no ratio')
  if args.out:
    result = {'workdir': os.path.abspath(args.workdir), 'step': step, 'keys': args.keys,
              'compare': args.compare, 'dtype': str(dtype), 'lr_student': lr, 'stats': stats,
              **ratios, 'per_key': {mode: runs[mode]['values'] for mode in runs}}
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'wrote {args.out}')
  if args.plot:
    plot(args.plot, runs, f'{os.path.basename(os.path.abspath(args.workdir))}, step {step}, '
                          f'student lr {lr:.3g}, {dtype}: h under {args.keys} keys')
    print(f'wrote {args.plot}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
