r"""The MPL paper's TwoMoons figure: supervised vs Pseudo Labels vs MPL, 6 labels, many seeds.

    python -m launch.two_moons_figure --out two_moons.png --seeds 10

For each method and seed, trains `configs/two_moons.py:method=<m>` (6 labels, 3 per moon) with
config.seed = config.data.seed = seed (the seed draws the 2000 points, the labeled six and the
initialisation) in a temporary workdir, reads the final accuracy on the 2000 points from the
summary, and counts a run as a success when it reaches >= 99%. Writes one PNG: per method the
decision boundary of the evaluated network of the first seed's run (restored from its final
checkpoint), the points by class, the six labeled points, the accuracy; the success rates over
all seeds in the title. Next to it, <out>.json: per-seed accuracies, success rates, means.

Options: --steps N overrides config.total_steps; --set key=value (repeatable) overrides any
config key for every method, e.g. --set mpl.pseudo_label=argmax; --methods to run a subset.
Every argument, every run's config and --out are checked before the first run trains.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mpl import config_lib, reporting, train
from mpl.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ('supervised', 'pseudo_label', 'mpl')
TITLES = {'supervised': 'Supervised', 'pseudo_label': 'Pseudo Labels', 'mpl': 'Meta Pseudo Labels'}
SUCCESS = 0.99


def load_config(method: str):
  spec = importlib.util.spec_from_file_location('two_moons_config',
                                                os.path.join(ROOT, 'configs', 'two_moons.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f'method={method},labels=6')


def set_key(config, key: str, text: str) -> None:
  """config.<key> = text, parsed as the type of the current value (or a Python literal);
  ConfigError for an unknown key or a value of the wrong type."""
  *parents, leaf = key.split('.')
  target = config
  for depth, name in enumerate(parents + [leaf]):
    if not isinstance(target, ml_collections.ConfigDict) or name not in target:
      where = '.'.join(parents[:depth]) or 'the config'
      known = sorted(target.keys()) if isinstance(target, ml_collections.ConfigDict) else []
      raise ConfigError(f'--set {key}={text}: {where} has no key {name!r}'
                        + (f'; its keys: {", ".join(known)}.' if known else '.'))
    if name != leaf:
      target = target[name]
  current = target[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f'--set {key}={text}: {key} is a block, not a value; set one of its keys '
                      f'({", ".join(sorted(current.keys()))}), e.g. --set {key}.KEY=VALUE.')
  try:
    if isinstance(current, bool):
      if text.lower() not in ('1', 'true', 'yes', '0', 'false', 'no'):
        raise ValueError
      value = text.lower() in ('1', 'true', 'yes')
    elif isinstance(current, int):
      value = float(text)   # 1e4 is fine; 2.5 steps is not
      if not value.is_integer():
        raise ValueError
      value = int(value)
    elif isinstance(current, float):
      value = float(text)
    elif isinstance(current, str):
      value = text
    else:
      value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    expected = {bool: 'true/false (or 1/0, yes/no)', int: 'an integer', float: 'a number'}.get(
        type(current), 'a Python literal (a number, a quoted string, a list, None ...)')
    raise ConfigError(f'--set {key}={text}: expected {expected} (the current value is '
                      f'{current!r}).') from None
  try:
    target[leaf] = value
  except TypeError as e:  # a type-safe ConfigDict field given a value of another type
    raise ConfigError(f'--set {key}={text}: {e}') from None


def make_config(method: str, seed: int, steps: int | None, overrides: list[str]):
  config = load_config(method)
  config.seed = seed
  config.data.seed = seed  # the points and the labeled six change with the seed
  if steps is not None:
    config.total_steps = steps
  for item in overrides:
    key, equals, text = item.partition('=')
    if not equals or not key:
      raise ConfigError(f'--set {item}: expected KEY=VALUE, e.g. --set optimizer.lr=0.05.')
    if key.split('.')[0] in ('mpl', 'pseudo_label') and key.split('.')[0] != method:
      continue  # another method's block
    set_key(config, key, text)
  # One evaluation, one checkpoint: at the end.
  config.eval_every = config.checkpoint_every = config.log_every = config.total_steps
  return config


def check_arguments(methods: list[str], seeds: int, steps: int | None, overrides: list[str]):
  """Refuses arguments that make no figure, before any training."""
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise ConfigError((f'--methods {",".join(methods)}: unknown {", ".join(map(repr, unknown))}'
                       if unknown else '--methods names no method') +
                      f'; give a comma-separated subset of {",".join(METHODS)}.')
  if len(set(methods)) < len(methods):
    raise ConfigError(f'--methods {",".join(methods)} names a method twice; name each once.')
  if seeds < 1:
    raise ConfigError(f'--seeds {seeds}: give the number of seeds to run (at least 1; seeds '
                      f'0 .. N-1).')
  if steps is not None and steps < 1:
    raise ConfigError(f'--steps {steps}: give a positive number of training steps, or leave '
                      f'--steps out for the config\'s.')
  for item in overrides:
    block = item.partition('=')[0].split('.')[0]
    if block in ('mpl', 'pseudo_label') and block not in methods:
      raise ConfigError(f'--set {item} reaches only method {block}, which --methods '
                        f'({",".join(methods)}) does not run; drop it or add {block}.')


def grid_for(points, n: int = 250):
  lo, hi = points.min(0) - 0.5, points.max(0) + 0.5
  xs, ys = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
  xx, yy = np.meshgrid(xs, ys)
  return xx, yy, np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32)


def run(method: str, seed: int, config, with_boundary: bool):
  """Trains one run; returns its record (and the boundary of its evaluated network)."""
  with tempfile.TemporaryDirectory(prefix=f'moons_{method}_{seed}_') as workdir:
    start = time.time()
    summary = train.train_and_evaluate(config, workdir)
    record = {'accuracy': summary['final']['accuracy'], 'wall_s': round(time.time() - start, 1),
              'evaluated_model': summary['evaluated_model']}
    if not with_boundary:
      return record, None
    # The final state, restored from the run's checkpoint into the experiment's shapes.
    experiment = train.build(config, workdir)
    checkpoints = train.Checkpoints(workdir, keep=config.keep_checkpoints)
    state, _ = checkpoints.restore(experiment.abstract_state)
    checkpoints.close()
    points, labels = experiment.data.train_images, experiment.data.train_labels
    xx, yy, grid = grid_for(points)
    with experiment.activate():
      variables = experiment.method.eval_variables(state)[summary['evaluated_model']]
      predict = jax.jit(experiment.method.predict)
      grid_class = np.asarray(jnp.argmax(predict(variables, grid), -1)).reshape(xx.shape)
      point_class = np.asarray(jnp.argmax(predict(variables, points), -1))
    check = float(np.mean(point_class == labels))
    assert abs(check - record['accuracy']) < 1e-3, (check, record['accuracy'])
    boundary = {'xx': xx, 'yy': yy, 'grid_class': grid_class, 'points': points,
                'labels': labels, 'labeled_idx': np.asarray(experiment.labeled_idx)}
  return record, boundary


def plot(path: str, boundaries: dict, results: dict, seeds: list[int], steps_note: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.colors import ListedColormap  # pylint: disable=g-import-not-at-top

  methods = list(boundaries)
  fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 4.6), squeeze=False)
  background = ListedColormap(['#cfe0f3', '#f8d9c4'])
  colours = np.array(['#1f5fa8', '#c8501e'])
  for ax, method in zip(axes[0], methods):
    b = boundaries[method]
    ax.contourf(b['xx'], b['yy'], b['grid_class'], levels=[-0.5, 0.5, 1.5], cmap=background)
    ax.contour(b['xx'], b['yy'], b['grid_class'], levels=[0.5], colors='k', linewidths=1.0)
    ax.scatter(b['points'][:, 0], b['points'][:, 1], c=colours[b['labels']], s=4, alpha=0.6,
               linewidths=0)
    idx = b['labeled_idx']
    ax.scatter(b['points'][idx, 0], b['points'][idx, 1], c=colours[b['labels'][idx]], s=220,
               marker='*', edgecolors='k', linewidths=1.2, zorder=3, label='labeled')
    acc = results[method]['accuracies'][str(seeds[0])]
    ax.set_title(f'{TITLES[method]}: {100 * acc:.1f}%')
    ax.set_xticks([])
    ax.set_yticks([])
  rates = '   '.join(
      f'{TITLES[m]} {results[m]["successes"]}/{len(seeds)} '
      f'(mean {100 * results[m]["mean_accuracy"]:.1f}%)' for m in methods)
  fig.suptitle(f'TwoMoons, 6 labels (stars), {steps_note}; panels: seed {seeds[0]}.\n'
               f'Runs reaching >= {100 * SUCCESS:.0f}% over {len(seeds)} seeds:   {rates}',
               fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def train_all(methods: list[str], seeds: list[int], configs: dict) -> tuple[dict, dict]:
  """Trains every (method, seed); returns per-method results and the first seed's boundaries."""
  results, boundaries = {}, {}
  for method in methods:
    accuracies = {}
    for seed in seeds:
      record, boundary = run(method, seed, configs[method, seed], with_boundary=seed == seeds[0])
      accuracies[str(seed)] = record['accuracy']
      if boundary is not None:
        boundaries[method] = boundary
      print(f'{method:13s} seed {seed:2d}: {100 * record["accuracy"]:6.2f}%  '
            f'({record["wall_s"]:.0f} s)', flush=True)
    values = list(accuracies.values())
    results[method] = {
        'accuracies': accuracies,
        'successes': sum(a >= SUCCESS for a in values),
        'success_rate': sum(a >= SUCCESS for a in values) / len(values),
        'mean_accuracy': statistics.fmean(values),
        'min_accuracy': min(values),
        'steps': configs[method, seeds[0]].total_steps,
    }
    print(f'{method}: success {results[method]["successes"]}/{len(seeds)}, mean accuracy '
          f'{100 * results[method]["mean_accuracy"]:.2f}%', flush=True)
  return results, boundaries


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='two_moons.png')
  parser.add_argument('--seeds', type=int, default=10, help='seeds 0 .. N-1')
  parser.add_argument('--steps', type=int, default=None, help='default: the config\'s')
  parser.add_argument('--methods', default=','.join(METHODS))
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='config override for every method (mpl.* / pseudo_label.* only '
                           'reach their method)')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  std_logging.getLogger().setLevel(std_logging.WARNING)

  methods = [m for m in args.methods.split(',') if m]
  seeds = list(range(args.seeds))
  json_path = os.path.splitext(args.out)[0] + '.json'
  try:
    # Every argument and config is checked before the first run trains (minutes each).
    check_arguments(methods, args.seeds, args.steps, args.set)
    configs = {(m, s): make_config(m, s, args.steps, args.set) for m in methods for s in seeds}
    for config in configs.values():
      config_lib.validate(config, jax.device_count())
    reporting.check_out_path(args.out, make_parent=True)
    reporting.check_out_path(json_path, '--out (its .json)', figure=False)
    results, boundaries = train_all(methods, seeds, configs)
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  steps = sorted({r['steps'] for r in results.values()})
  steps_note = f'{"/".join(map(str, steps))} steps'
  plot(args.out, boundaries, results, seeds, steps_note)
  record = {
      'command': 'python -m launch.two_moons_figure ' + ' '.join(
          sys.argv[1:] if argv is None else argv),
      'success_threshold': SUCCESS,
      'seeds': seeds,
      'overrides': args.set,
      'methods': results,
  }
  with open(json_path, 'w') as f:
    json.dump(record, f, indent=2)
  print(f'wrote {args.out} and {json_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
