"""launch/compare_runs.py: the table reads the right numbers from finished and running runs."""

import json
import os

import ml_collections

from launch import compare_runs
from mpl import train


def _evals(accuracies, models=('raw', 'ema', 'teacher'), every=100):
  return [{'step': every * (i + 1), **{m: {'accuracy': a + 0.01 * j, 'top5': 1.0}
                                       for j, m in enumerate(models)}}
          for i, a in enumerate(accuracies)]


def _write_summary(workdir, method, evals, feedback=None):
  os.makedirs(workdir)
  config = ml_collections.ConfigDict(dict(method=method, dataset='d',
                                          model=dict(name='m'), mpl=dict(feedback=feedback)))
  summary = train.summarize(config, evals, wall_s=1.0, steps=evals[-1]['step'], num_labeled=10)
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f)


def test_table_reads_finished_and_running_runs(tmp_path, capsys):
  _write_summary(tmp_path / 'sup', 'supervised', _evals([0.5, 0.7, 0.6], models=('raw',)))
  _write_summary(tmp_path / 'mpl', 'mpl', _evals([0.6, 0.8]), feedback='exact')
  running = tmp_path / 'live'
  os.makedirs(running)
  with open(running / 'metrics.jsonl', 'w') as f:
    f.write(json.dumps({'step': 50, 'train/loss': 1.0}) + '\n')
    f.write(json.dumps({'step': 100, 'eval/raw_accuracy': 0.4, 'eval/ema_accuracy': 0.45}) + '\n')
  with open(running / 'config.json', 'w') as f:
    json.dump({'method': 'supervised'}, f)
  out = tmp_path / 'cmp.png'
  assert compare_runs.main([str(tmp_path / 'sup'), f'MPL={tmp_path / "mpl"}', str(running),
                            '--out', str(out)]) == 0
  table = capsys.readouterr().out
  assert '| sup | supervised | 300 | 60.00 | 70.00 | 60.00 |  |' in table
  # MPL: the evaluated model is the EMA (+0.01 in _evals), the teacher column its own curve.
  assert '| MPL | mpl (exact) | 200 | 81.00 | 81.00 | 71.00 | 82.00 |' in table
  assert '| live | supervised | 100 (running) | 45.00 |' in table
  assert out.stat().st_size > 0
  rows = json.load(open(tmp_path / 'cmp.json'))
  assert rows['MPL']['evaluated'] == 'ema' and rows['live']['running']


def test_finetune_stage_continues_the_step_axis(tmp_path):
  workdir = tmp_path / 'ft'
  os.makedirs(workdir)
  summary = {'config': {'method': 'mpl', 'mpl': {'feedback': 'first_order'}},
             'history': _evals([0.9], models=('raw',), every=10),
             'before_finetune': {'history': _evals([0.7, 0.8], models=('raw', 'teacher'))}}
  with open(workdir / 'summary.json', 'w') as f:
    json.dump(summary, f)
  row = compare_runs.read_run(str(workdir))
  assert row['curves']['raw'] == [(100, 0.7), (200, 0.8), (210, 0.9)]
  assert row['final'] == 0.9 and row['steps'] == 210 and row['teacher_final'] == 0.81


def test_not_a_workdir_is_a_clear_error(tmp_path, capsys):
  assert compare_runs.main([str(tmp_path), '--out', str(tmp_path / 'x.png')]) == 2
  assert 'neither summary.json nor metrics.jsonl' in capsys.readouterr().err
