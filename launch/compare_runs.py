r"""Side by side: test accuracy of several runs, as a Markdown table and one PNG of the curves.

    python -m launch.compare_runs /tmp/runs/fm_supervised /tmp/runs/fm_mpl_first_order \
        /tmp/runs/fm_mpl_exact --out compare.png

Each argument is a workdir, or NAME=WORKDIR to choose its label (default: the folder's name).
A finished run is read from WORKDIR/summary.json: final (the evaluated model: the EMA where there
is one, after the finetune stage where there was one), best, median of the last 20 evaluations,
and for MPL also the teacher's final accuracy (with `mpl.feedback=official_release` the teacher
trains as plain UDA: that column is the UDA baseline). A run still going, or stopped, is read
from WORKDIR/metrics.jsonl and marked "(running)". Prints the table, writes the PNG (evaluated
model solid, teacher dashed) and <out>.json with the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def _history_from_metrics(path: str) -> list[dict]:
  """Evaluations logged so far: [{'step', model: {'accuracy'}}] from metrics.jsonl lines."""
  evals = []
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      models = {key[len('eval/'):-len('_accuracy')]: {'accuracy': value}
                for key, value in record.items()
                if key.startswith('eval/') and key.endswith('_accuracy')}
      if models:
        evals.append({'step': record['step'], **models})
  return evals


def read_run(workdir: str) -> dict:
  """One row: name-free results of the run in `workdir` (finished or not)."""
  summary_path = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    stages = [summary['before_finetune']['history'], summary['history']] \
        if 'before_finetune' in summary else [summary['history']]
    config = summary['config']
    running = False
  else:
    metrics_path = os.path.join(workdir, 'metrics.jsonl')
    config_path = os.path.join(workdir, 'config.json')
    if not os.path.exists(metrics_path):
      raise FileNotFoundError(f'{workdir}: neither summary.json nor metrics.jsonl; is it a '
                              f'workdir of `python -m mpl.main`?')
    stages = [_history_from_metrics(metrics_path)]
    config = {}
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)
    running = True
  # Curves run on one step axis: the finetune stage continues where the first stage ended.
  curves, offset = {}, 0
  for stage in stages:
    for e in stage:
      for model, result in e.items():
        if model != 'step':
          curves.setdefault(model, []).append((offset + e['step'], result['accuracy']))
    if stage:
      offset += stage[-1]['step']
  evaluated = 'ema' if 'ema' in curves else 'raw'
  history = curves.get(evaluated, [])
  row = {
      'method': config.get('method', '?'),
      'feedback': config.get('mpl', {}).get('feedback') if config.get('method') == 'mpl'
                  else None,
      'steps': offset,
      'evaluated': evaluated,
      'final': history[-1][1] if history else None,
      'best': max(a for _, a in history) if history else None,
      'median_last_20': statistics.median(a for _, a in history[-20:]) if history else None,
      'teacher_final': curves['teacher'][-1][1] if 'teacher' in curves else None,
      'running': running,
      'curves': curves,
  }
  return row


def markdown_table(rows: dict[str, dict]) -> str:
  pct = lambda v: '' if v is None else f'{100 * v:.2f}'
  lines = ['| run | method | steps | final | best | median last 20 | teacher final |',
           '|---|---|---|---|---|---|---|']
  for name, r in rows.items():
    method = r['method'] + (f" ({r['feedback']})" if r['feedback'] else '')
    steps = f"{r['steps']}" + (' (running)' if r['running'] else '')
    lines.append(f"| {name} | {method} | {steps} | {pct(r['final'])} | {pct(r['best'])} | "
                 f"{pct(r['median_last_20'])} | {pct(r['teacher_final'])} |")
  return '\n'.join(lines)


def plot(rows: dict[str, dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for i, (name, r) in enumerate(rows.items()):
    color = f'C{i}'
    curve = r['curves'].get(r['evaluated'], [])
    if curve:
      ax.plot(*zip(*[(s, 100 * a) for s, a in curve]), color=color, marker='.',
              label=f"{name} ({r['evaluated']})")
    if 'teacher' in r['curves']:
      ax.plot(*zip(*[(s, 100 * a) for s, a in r['curves']['teacher']]), color=color,
              linestyle='--', label=f'{name} (teacher)')
  ax.set_xlabel('step')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='WORKDIR or NAME=WORKDIR')
  parser.add_argument('--out', default='compare.png', help='PNG path (and <out>.json)')
  parser.add_argument('--title', default='test accuracy')
  args = parser.parse_args(argv)
  rows = {}
  for spec in args.runs:
    name, _, workdir = spec.rpartition('=')
    name = name or os.path.basename(os.path.normpath(workdir))
    try:
      rows[name] = read_run(workdir)
    except FileNotFoundError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
  print(markdown_table(rows))
  plot(rows, args.out, args.title)
  with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
    json.dump({name: {k: v for k, v in r.items() if k != 'curves'} for name, r in rows.items()},
              f, indent=2)
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
