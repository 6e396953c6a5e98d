r"""Side by side: test accuracy of several runs, as a Markdown table and one PNG of the curves.

    python -m launch.compare_runs /tmp/runs/fm_supervised /tmp/runs/fm_mpl_first_order \
        /tmp/runs/fm_mpl_exact --out compare.png

Each argument is a workdir, or NAME=WORKDIR to choose its label (default: the folder's name).
Seeds: NAME=W1,W2,... or NAME='GLOB' (quoted, e.g. 'sup=/tmp/runs/sup_seed*') makes one row of
several runs of the same setting; its cells are the mean +- the sample standard deviation over
the runs, `n` says how many, and its curve is the mean with a band of +- one standard deviation.
The runs of a row must share method, feedback, evaluated model, the settings in SETTING_KEYS
(dataset, labels, steps, batch, model, recipe, the method's own block), and the finished ones the
step they ended at; a row with runs still going is compared at the last step that all its runs
evaluated (blank until every one has evaluated once), and the paired column is left out for rows
compared at another step than the first row.
Where rows share seeds (config.seed and config.data.seed), a last column gives each row's final
accuracy minus the first row's, paired seed by seed (mean +- std, and how many seeds are higher):
seeds that change the labeled split vary far more than the methods differ, and pairing removes it.

    python -m launch.compare_runs 'supervised=/tmp/d/sup_*' 'mpl=/tmp/d/mpl_*' --out seeds.png

A finished run is read from WORKDIR/summary.json: final (the evaluated model: the EMA where there
is one, after the finetune stage where there was one), best, median of the last 20 evaluations,
and for MPL also the teacher's final accuracy (with `mpl.feedback=official_release` the teacher
trains as plain UDA: that column is the UDA baseline). A run still going, or stopped, is read
from WORKDIR/metrics.jsonl and marked "(running)". Prints the table, writes the PNG (evaluated
model solid, teacher dashed) and <out>.json with the rows.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys

from mpl import reporting


def _history_from_metrics(path: str) -> list[dict]:
  """Evaluations logged so far: [{'step', model: {'accuracy'}}] from metrics.jsonl lines."""
  evals = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # the last line of a run killed while writing it
        continue
      models = {key[len('eval/'):-len('_accuracy')]: {'accuracy': value}
                for key, value in record.items()
                if key.startswith('eval/') and key.endswith('_accuracy')}
      if models:
        evals.append({'step': record['step'], **models})
  return evals


def _load_json(path: str):
  """The JSON in `path`; a file cut short or corrupt is an error that names it."""
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}): it is corrupt or cut short. Leave '
                     f'that run out, or rerun it.') from None


def read_run(workdir: str) -> dict:
  """One row: name-free results of the run in `workdir` (finished or not)."""
  if not os.path.exists(workdir):
    raise FileNotFoundError(f'{workdir} does not exist; give the --workdir of a run of '
                            f'`python -m mpl.main`.')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir} is not a directory; give the --workdir of a run of '
                            f'`python -m mpl.main` (the folder holding summary.json or '
                            f'metrics.jsonl).')
  summary_path = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary_path):
    summary = _load_json(summary_path)
    try:
      stages = [summary['before_finetune']['history'], summary['history']] \
          if 'before_finetune' in summary else [summary['history']]
      config = summary['config']
    except (KeyError, TypeError) as e:
      raise ValueError(f'{summary_path} lacks {e}: it is not the summary of a run of '
                       f'`python -m mpl.main`.') from None
    running = False
  else:
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    config_path = os.path.join(workdir, 'config.json')
    if not os.path.exists(metrics_path):
      raise FileNotFoundError(f'{workdir}: neither summary.json nor metrics.jsonl; is it a '
                              f'workdir of `python -m mpl.main`?')
    stages = [_history_from_metrics(metrics_path)]
    config = _load_json(config_path) if os.path.exists(config_path) else {}
    running = True
  # Curves run on one step axis: the finetune stage continues where the first stage ended.
  # It trains the first stage's evaluated model (the EMA student where there is one) and logs
  # it as 'raw': its evaluations continue that model's curve.
  first_primary = 'ema' if any('ema' in e for e in stages[0]) else 'raw'
  curves, offset = {}, 0
  for index, stage in enumerate(stages):
    for e in stage:
      for model, result in e.items():
        if model == 'step':
          continue
        if index > 0 and model == 'raw':
          model = first_primary
        curves.setdefault(model, []).append((offset + e['step'], result['accuracy']))
    if stage:
      offset += stage[-1]['step']
  evaluated = ('ema' if 'ema' in curves else 'raw') if curves else None  # None: no eval yet
  row = {
      'method': config.get('method', '?'),
      'feedback': config.get('mpl', {}).get('feedback') if config.get('method') == 'mpl'
                  else None,
      'setting': setting_of(config),
      'steps': offset,
      'evaluated': evaluated,
      'seed': (config.get('seed'), config.get('data', {}).get('seed')),
      'running': running,
      'curves': curves,
  }
  row.update(results_up_to(curves, evaluated, offset))
  return row


# What must be equal across the seeds of one row (besides method and feedback).
SETTING_KEYS = ('dataset', 'num_labeled', 'total_steps', 'batch_size', 'mu', 'model',
                'label_smoothing', 'augment', 'ema_decay', 'optimizer', 'finetune')
METHOD_KEYS = ('mpl', 'reduced_mpl', 'pseudo_label')


def setting_of(config: dict) -> dict:
  """The config entries that define a setting, flattened to dotted keys."""
  def flatten(prefix, value, out):
    if isinstance(value, dict):
      for k, v in value.items():
        flatten(f'{prefix}.{k}', v, out)
    else:
      out[prefix] = json.dumps(value, sort_keys=True)
    return out
  keys = SETTING_KEYS + tuple(k for k in METHOD_KEYS if k == config.get('method'))
  flat = {}
  for key in keys:
    if key in config:
      flatten(key, config[key], flat)
  return flat


def results_up_to(curves: dict, evaluated: str | None, last_step: int) -> dict:
  """final / best / median of the last 20 evaluations / teacher's final, up to `last_step`."""
  history = [a for s, a in curves.get(evaluated, []) if s <= last_step]
  teacher = [a for s, a in curves.get('teacher', []) if s <= last_step]
  return {'final': history[-1] if history else None,
          'best': max(history) if history else None,
          'median_last_20': statistics.median(history[-20:]) if history else None,
          'teacher_final': teacher[-1] if teacher else None}


def combine(runs: list[dict], workdirs: list[str]) -> dict:
  """One row from runs of the same setting (seeds): means, sample std devs, the mean curves.

  Runs still going are compared with the others at the last step that all of them evaluated.
  """
  for key in ('method', 'feedback', 'evaluated'):
    values = {r[key] for r in runs}
    if key == 'evaluated':
      values.discard(None)   # a run that has not evaluated yet
    if len(values) > 1:
      raise ValueError(f'{", ".join(workdirs)}: these runs differ in {key} '
                       f'({sorted(map(str, values))}); a row of several runs is for seeds of one '
                       f'setting')
  finished_steps = {r['steps'] for r in runs if not r['running']}
  if len(finished_steps) > 1:
    raise ValueError(f'{", ".join(workdirs)}: these runs ended at different steps '
                     f'({sorted(finished_steps)}); a row of several runs is for seeds of one '
                     f'setting')
  # Keys present in every run's config must agree (a key added later is absent from old runs).
  shared_keys = set.intersection(*(set(r['setting']) for r in runs))
  differing = sorted(k for k in shared_keys if len({r['setting'][k] for r in runs}) > 1)
  if differing:
    raise ValueError(f'{", ".join(workdirs)}: these runs differ in {", ".join(differing)}; a row '
                     f'of several runs is for seeds of one setting')
  evaluated = next((r['evaluated'] for r in runs if r['evaluated']), None)
  # Mean curve (and std) over the steps every run has evaluated.
  curves, curves_std = {}, {}
  for model in dict.fromkeys(m for r in runs for m in r['curves']):
    per_run = [dict(r['curves'].get(model, [])) for r in runs]
    steps = sorted(set.intersection(*(set(c) for c in per_run)))
    curves[model] = [(s, statistics.fmean(c[s] for c in per_run)) for s in steps]
    curves_std[model] = [(s, statistics.stdev([c[s] for c in per_run])
                          if len(runs) > 1 else 0.0) for s in steps]
  running = any(r['running'] for r in runs)
  if len(runs) > 1 and running:
    shared = curves.get(evaluated, [])
    steps = shared[-1][0] if shared else 0
    results = [results_up_to(r['curves'], evaluated, steps) for r in runs]
  else:
    steps = runs[0]['steps']
    results = runs
  row = {'method': runs[0]['method'], 'feedback': runs[0]['feedback'], 'steps': steps,
         'evaluated': evaluated, 'running': running, 'workdirs': workdirs,
         'finals': [r['final'] for r in results], 'seeds': [r['seed'] for r in runs],
         'curves': curves, 'curves_std': curves_std}
  for key in ('final', 'best', 'median_last_20', 'teacher_final'):
    values = [r[key] for r in results if r[key] is not None]
    row[key] = statistics.fmean(values) if values else None
    row[key + '_std'] = statistics.stdev(values) if len(values) > 1 else None
  row['n'] = sum(final is not None for final in row['finals'])
  return row


def expand(spec: str) -> tuple[str, list[str]]:
  """'NAME=W1,W2' / 'NAME=GLOB' / 'WORKDIR' -> (name, workdirs). A workdir may hold '='
  (a sweep's 'runs/lr=0.1'): an argument that is a folder is one workdir, and NAME (before the
  first '=') holds no '/'."""
  name, _, target = spec.partition('=')
  if '=' not in spec or os.path.isdir(spec) or '/' in name:
    name, target = '', spec
  if not target:
    raise ValueError(f'{spec!r} names no workdir: give WORKDIR, NAME=WORKDIR, NAME=W1,W2,... '
                     f"or NAME='GLOB'.")
  if ',' in target:
    workdirs = target.split(',')
    if not all(workdirs):
      raise ValueError(f'{spec!r}: an empty workdir in the list (a stray comma?); give '
                       f'NAME=W1,W2,... with no empty entries.')
  elif glob.has_magic(target):
    workdirs = sorted(d for d in glob.glob(target) if os.path.isdir(d))
    if not workdirs:
      raise FileNotFoundError(f'{target}: matches no folder')
  else:
    workdirs = [target]
  real = [os.path.realpath(w) for w in workdirs]
  if len(set(real)) < len(real):  # it would count one run as several in the mean and std
    twice = sorted({w for w, r in zip(workdirs, real) if real.count(r) > 1})
    raise ValueError(f'{spec!r} lists a workdir more than once ({", ".join(twice)}).')
  return name or os.path.basename(os.path.normpath(target)), workdirs


def paired_difference(row: dict, reference: dict) -> str:
  """'+2.61 ± 1.20 (5/5 higher)': final minus the reference's final, run by run of equal seeds."""
  if row['steps'] != reference['steps']:
    return ''  # finals taken at different steps (a run still going): not comparable
  for seeds in (reference['seeds'], row['seeds']):
    if any(None in seed for seed in seeds) or len(set(seeds)) < len(seeds):
      return ''  # no seeds recorded, or several runs of one seed: nothing to pair
  by_seed = dict(zip(reference['seeds'], reference['finals']))
  diffs = [final - by_seed[seed] for seed, final in zip(row['seeds'], row['finals'])
           if seed in by_seed and final is not None and by_seed[seed] is not None]
  if len(diffs) < 2:
    return ''
  higher = sum(d > 0 for d in diffs)
  return (f'{100 * statistics.fmean(diffs):+.2f} ± {100 * statistics.stdev(diffs):.2f} '
          f'({higher}/{len(diffs)} higher)')


def markdown_table(rows: dict[str, dict]) -> str:
  def cell(r, key):
    value, std = r[key], r.get(key + '_std')
    if value is None:
      return ''
    return f'{100 * value:.2f}' + (f' ± {100 * std:.2f}' if std is not None else '')
  reference_name, reference = next(iter(rows.items()))
  paired = {name: paired_difference(r, reference) for name, r in rows.items() if r is not reference}
  columns = ['run', 'method', 'n', 'steps', 'final', 'best', 'median last 20', 'teacher final']
  if any(paired.values()):  # seeds: the difference to the first row, seed by seed
    columns.append(f'final - {reference_name}, same seeds')
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for name, r in rows.items():
    method = r['method'] + (f" ({r['feedback']})" if r['feedback'] else '')
    steps = f"{r['steps']}" + (' (running)' if r['running'] else '')
    cells = [name, method, str(r['n']), steps, cell(r, 'final'), cell(r, 'best'),
             cell(r, 'median_last_20'), cell(r, 'teacher_final')]
    if any(paired.values()):
      cells.append(paired.get(name, ''))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def plot(rows: dict[str, dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for i, (name, r) in enumerate(rows.items()):
    color = f'C{i}'
    seeds = f", mean of {r['n']}" if r['n'] > 1 else ''
    for model, style, label in ((r['evaluated'], '-', r['evaluated']), ('teacher', '--', 'teacher')):
      curve = r['curves'].get(model, [])
      if not curve:
        continue
      steps = [s for s, _ in curve]
      mean = [100 * a for _, a in curve]
      ax.plot(steps, mean, color=color, linestyle=style, marker='.' if style == '-' else None,
              label=f'{name} ({label}{seeds})')
      if r['n'] > 1:
        std = [100 * d for _, d in r['curves_std'][model]]
        ax.fill_between(steps, [m - d for m, d in zip(mean, std)],
                        [m + d for m, d in zip(mean, std)], color=color, alpha=0.15)
  ax.set_xlabel('step')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:   # nothing to draw before a first evaluation
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='WORKDIR or NAME=WORKDIR')
  parser.add_argument('--out', default='compare.png',
                      help='figure path, e.g. compare.png (the rows go to <out>.json)')
  parser.add_argument('--title', default='test accuracy')
  args = parser.parse_args(argv)
  json_path = os.path.splitext(args.out)[0] + '.json'
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
    draw = True
  except ImportError:  # e.g. a machine with only the training packages: the numbers still come
    draw = False
    print(f'warning: matplotlib is not installed, so no {args.out}; the table and {json_path} '
          f'follow (`pip install matplotlib` for the figure).', file=sys.stderr)
  rows = {}
  try:
    if draw:
      reporting.check_out_path(args.out)
    reporting.check_out_path(json_path, '--out (its rows file)', figure=False)
    for spec in args.runs:
      name, workdirs = expand(spec)
      if name in rows:  # a second row of one name would replace the first
        raise ValueError(f'two rows named {name!r} ({", ".join(rows[name]["workdirs"])} and '
                         f'{", ".join(workdirs)}); give each its own NAME=WORKDIR.')
      rows[name] = combine([read_run(w) for w in workdirs], workdirs)
  except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(markdown_table(rows))
  if draw:
    plot(rows, args.out, args.title)
  with open(json_path, 'w') as f:
    json.dump({name: {k: v for k, v in r.items() if k not in ('curves', 'curves_std')}
               for name, r in rows.items()},
              f, indent=2)
  print(f'wrote {args.out} and {json_path}' if draw else f'wrote {json_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
