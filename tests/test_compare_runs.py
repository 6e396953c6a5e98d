"""launch/compare_runs.py: the table reads the right numbers from finished and running runs."""

import json
import os
import sys

import ml_collections
import pytest

from launch import compare_runs
from mpl import train


def _evals(accuracies, models=('raw', 'ema', 'teacher'), every=100):
  return [{'step': every * (i + 1), **{m: {'accuracy': a + 0.01 * j, 'top5': 1.0}
                                       for j, m in enumerate(models)}}
          for i, a in enumerate(accuracies)]


def _write_summary(workdir, method, evals, feedback=None, seed=None):
  os.makedirs(workdir)
  config = ml_collections.ConfigDict(dict(method=method, dataset='d', num_labeled=10, seed=seed,
                                          data=dict(seed=seed), model=dict(name='m'),
                                          mpl=dict(feedback=feedback)))
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
  assert '| sup | supervised | 1 | 300 | 60.00 | 70.00 | 60.00 |  |' in table
  # MPL: the evaluated model is the EMA (+0.01 in _evals), the teacher column its own curve.
  assert '| MPL | mpl (exact) | 1 | 200 | 81.00 | 81.00 | 71.00 | 82.00 |' in table
  assert '| live | supervised | 1 | 100 (running) | 45.00 |' in table
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


def test_seeds_make_one_row_of_means_and_sample_std(tmp_path, capsys):
  for seed, finals in enumerate(([0.5, 0.6], [0.5, 0.8], [0.6, 1.0])):
    _write_summary(tmp_path / f'mpl_seed{seed}', 'mpl', _evals(finals), feedback='first_order')
    (tmp_path / f'mpl_seed{seed}.log').write_text('a log beside the workdir: not a run')
  _write_summary(tmp_path / 'sup_a', 'supervised', _evals([0.7], models=('raw',)))
  _write_summary(tmp_path / 'sup_b', 'supervised', _evals([0.9], models=('raw',)))
  out = tmp_path / 'seeds.png'
  assert compare_runs.main([f'mpl={tmp_path}/mpl_seed*', f'sup={tmp_path}/sup_a,{tmp_path}/sup_b',
                            '--out', str(out)]) == 0
  table = capsys.readouterr().out
  # EMA finals 0.61, 0.81, 1.01: mean 0.81, sample std 0.20; teacher = EMA + 0.01.
  assert '| mpl | mpl (first_order) | 3 | 200 | 81.00 ± 20.00 |' in table
  assert '82.00 ± 20.00 |' in table
  assert '| sup | supervised | 2 | 100 | 80.00 ± 14.14 |' in table
  rows = json.load(open(tmp_path / 'seeds.json'))
  assert rows['mpl']['n'] == 3 and len(rows['mpl']['workdirs']) == 3
  row = compare_runs.combine([compare_runs.read_run(str(tmp_path / f'mpl_seed{s}'))
                              for s in range(3)], ['a', 'b', 'c'])
  assert [s for s, _ in row['curves']['ema']] == [100, 200]
  assert abs(row['curves']['ema'][0][1] - (0.51 + 0.51 + 0.61) / 3) < 1e-9


def test_a_row_of_different_settings_is_refused(tmp_path, capsys):
  _write_summary(tmp_path / 'a', 'supervised', _evals([0.7], models=('raw',)))
  _write_summary(tmp_path / 'b', 'mpl', _evals([0.7]), feedback='exact')
  assert compare_runs.main([f'x={tmp_path}/a,{tmp_path}/b', '--out', str(tmp_path / 'x.png')]) == 2
  assert 'differ in method' in capsys.readouterr().err
  assert compare_runs.main([f'y={tmp_path}/nothing*', '--out', str(tmp_path / 'y.png')]) == 2
  assert 'matches no folder' in capsys.readouterr().err


def test_rows_of_the_same_seeds_are_compared_seed_by_seed(tmp_path, capsys):
  # The seed moves both methods by the same amount; the method adds 2 points on 2 of 3 seeds.
  for seed, (base, gain) in enumerate(((0.70, 0.02), (0.90, 0.02), (0.80, -0.01))):
    _write_summary(tmp_path / f'sup_{seed}', 'supervised', _evals([base], models=('raw',)),
                   seed=seed)
    _write_summary(tmp_path / f'new_{seed}', 'supervised', _evals([base + gain], models=('raw',)),
                   seed=seed)
  assert compare_runs.main([f'sup={tmp_path}/sup_*', f'new={tmp_path}/new_*',
                            '--out', str(tmp_path / 'p.png')]) == 0
  table = capsys.readouterr().out
  assert 'final - sup, same seeds |' in table
  assert '| +1.00 ± 1.73 (2/3 higher) |' in table   # diffs +2, +2, -1 points
  # Without recorded seeds there is nothing to pair: no such column.
  _write_summary(tmp_path / 'a1', 'supervised', _evals([0.5], models=('raw',)))
  _write_summary(tmp_path / 'a2', 'supervised', _evals([0.6], models=('raw',)))
  assert compare_runs.main([f'a={tmp_path}/a1,{tmp_path}/a2', f'b={tmp_path}/a1,{tmp_path}/a2',
                            '--out', str(tmp_path / 'q.png')]) == 0
  assert 'same seeds' not in capsys.readouterr().out


def _write_running(workdir, accuracies, method='supervised', seed=None):
  os.makedirs(workdir)
  with open(workdir / 'metrics.jsonl', 'w') as f:
    for i, a in enumerate(accuracies):
      f.write(json.dumps({'step': 100 * (i + 1), 'eval/raw_accuracy': a}) + '\n')
  with open(workdir / 'config.json', 'w') as f:
    json.dump({'method': method, 'dataset': 'd', 'num_labeled': 10, 'seed': seed,
               'data': {'seed': seed}}, f)


def test_seeds_that_ended_at_different_steps_are_refused(tmp_path, capsys):
  _write_summary(tmp_path / 'short', 'supervised', _evals([0.7], models=('raw',)))
  _write_summary(tmp_path / 'long', 'supervised', _evals([0.5, 0.9], models=('raw',)))
  assert compare_runs.main([f'x={tmp_path}/short,{tmp_path}/long',
                            '--out', str(tmp_path / 'x.png')]) == 2
  assert 'ended at different steps ([100, 200])' in capsys.readouterr().err


def test_a_running_seed_is_compared_at_the_last_step_all_runs_evaluated(tmp_path, capsys):
  # Finished: 0.5, 0.6, 0.9 at steps 100-300; still going: 0.7, 0.8 at steps 100-200.
  _write_summary(tmp_path / 'done', 'supervised', _evals([0.5, 0.6, 0.9], models=('raw',)),
                 seed=0)
  _write_running(tmp_path / 'live', [0.7, 0.8], seed=1)
  assert compare_runs.main([f'x={tmp_path}/done,{tmp_path}/live',
                            '--out', str(tmp_path / 'x.png')]) == 0
  # At step 200: finals 0.6 and 0.8 (mean 70, sample std 14.14), bests the same.
  assert '| x | supervised | 2 | 200 (running) | 70.00 ± 14.14 | 70.00 ± 14.14 |' in \
      capsys.readouterr().out


def test_a_row_repeating_one_seed_is_not_paired(tmp_path, capsys):
  for seed in (0, 1):
    _write_summary(tmp_path / f'ref_{seed}', 'supervised', _evals([0.5], models=('raw',)),
                   seed=seed)
  for name, acc in (('dup_a', 0.7), ('dup_b', 0.9)):   # two runs of seed 0
    _write_summary(tmp_path / name, 'supervised', _evals([acc], models=('raw',)), seed=0)
  assert compare_runs.main([f'ref={tmp_path}/ref_*', f'dup={tmp_path}/dup_*',
                            '--out', str(tmp_path / 'd.png')]) == 0
  assert 'same seeds' not in capsys.readouterr().out


def test_seeds_of_different_settings_or_at_different_steps_are_not_mixed(tmp_path, capsys):
  def write(name, accuracies, seed, **config):
    _write_running(tmp_path / name, accuracies, seed=seed)
    path = tmp_path / name / 'config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
  for name, seed, labels in (('argmax_0', 0, 'argmax'), ('sample_1', 1, 'sample')):
    write(name, [0.7], seed, method='mpl', mpl={'feedback': 'first_order', 'pseudo_label': labels})
  assert compare_runs.main([f'x={tmp_path}/argmax_0,{tmp_path}/sample_1',
                            '--out', str(tmp_path / 'x.png')]) == 2
  assert 'differ in mpl.pseudo_label' in capsys.readouterr().err
  # Rows of the same seeds compared at different steps (runs still going): no paired column.
  for seed in (0, 1):
    _write_running(tmp_path / f'a_{seed}', [0.5, 0.6], seed=seed)
    _write_running(tmp_path / f'b_{seed}', [0.7], seed=seed)
  assert compare_runs.main([f'a={tmp_path}/a_*', f'b={tmp_path}/b_*',
                            '--out', str(tmp_path / 'y.png')]) == 0
  assert 'same seeds' not in capsys.readouterr().out
  # A seed that has not evaluated yet leaves its row blank; it is not "another setting".
  _write_summary(tmp_path / 'c_1', 'supervised', _evals([0.5], models=('raw', 'ema')), seed=1)
  _write_running(tmp_path / 'c_2', [], seed=2)
  assert compare_runs.main([f'c={tmp_path}/c_2,{tmp_path}/c_1',
                            '--out', str(tmp_path / 'z.png')]) == 0
  assert '| c | supervised | 0 | 0 (running) |' in capsys.readouterr().out


def test_finetuned_ema_student_is_the_evaluated_model(tmp_path):
  """With an EMA, the finetune stage trains the EMA student (logged as 'raw'): final, best and
  curve of the evaluated model come from it, not from the first stage's last EMA evaluation."""
  workdir = tmp_path / 'ft_ema'
  os.makedirs(workdir)
  summary = {'config': {'method': 'mpl', 'mpl': {'feedback': 'first_order'}},
             'history': _evals([0.95, 0.9], models=('raw',), every=10),
             'before_finetune': {'history': _evals([0.7, 0.8], models=('raw', 'ema'))}}
  with open(workdir / 'summary.json', 'w') as f:
    json.dump(summary, f)
  row = compare_runs.read_run(str(workdir))
  assert row['evaluated'] == 'ema'
  assert row['curves']['ema'] == [(100, 0.71), (200, 0.81), (210, 0.95), (220, 0.9)]
  assert row['curves']['raw'] == [(100, 0.7), (200, 0.8)]
  assert (row['final'], row['best'], row['steps']) == (0.9, 0.95, 220)


def test_a_bad_out_is_refused_before_reading_any_run(tmp_path, capsys):
  """A path matplotlib cannot write stops the command first (it used to fail after the table,
  with a traceback); a directory or a name without extension used to be 'written' elsewhere."""
  run = tmp_path / 'nothing_here'   # not read: the --out check comes first
  (tmp_path / 'figs').mkdir()
  for out, message in ((tmp_path / 'no' / 'such' / 'c.png', 'does not exist'),
                       (tmp_path / 'figs', 'is a directory'),
                       (tmp_path / 'c.xyz', '.xyz is not an image format'),
                       (tmp_path / 'c.json', '.json is not an image format'),
                       (tmp_path / 'c', 'has no extension'),
                       ('/proc/c.png', 'cannot write in /proc')):
    assert compare_runs.main([str(run), '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: --out {out}') and message in err, err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['figs']
  assert not list((tmp_path / 'figs').iterdir())


def test_prints_the_files_it_wrote(tmp_path, capsys):
  _write_summary(tmp_path / 'sup', 'supervised', _evals([0.5], models=('raw',)))
  assert compare_runs.main([str(tmp_path / 'sup'), '--out', str(tmp_path / 'c.pdf')]) == 0
  assert f'wrote {tmp_path}/c.pdf and {tmp_path}/c.json' in capsys.readouterr().out
  assert (tmp_path / 'c.pdf').exists() and (tmp_path / 'c.json').exists()


def test_without_matplotlib_the_table_and_rows_still_come(tmp_path, capsys, monkeypatch):
  _write_summary(tmp_path / 'sup', 'supervised', _evals([0.5], models=('raw',)))
  monkeypatch.setitem(sys.modules, 'matplotlib', None)   # import matplotlib -> ImportError
  assert compare_runs.main([str(tmp_path / 'sup'), '--out', str(tmp_path / 'c.png')]) == 0
  captured = capsys.readouterr()
  assert '| sup | supervised | 1 | 100 | 50.00 |' in captured.out
  assert f'wrote {tmp_path}/c.json' in captured.out and 'pip install matplotlib' in captured.err
  assert (tmp_path / 'c.json').exists() and not (tmp_path / 'c.png').exists()


def test_workdirs_with_an_equals_sign_in_their_path(tmp_path, capsys):
  # A sweep's folders: runs/lr=0.1. As WORKDIR, as NAME=WORKDIR and as NAME='GLOB'.
  _write_summary(tmp_path / 'lr=0.1', 'supervised', _evals([0.5], models=('raw',)))
  _write_summary(tmp_path / 'lr=0.2', 'supervised', _evals([0.7], models=('raw',)))
  out = str(tmp_path / 'x.png')
  assert compare_runs.main([str(tmp_path / 'lr=0.1'), f'b={tmp_path}/lr=0.2',
                            f'both={tmp_path}/lr=*', '--out', out]) == 0
  rows = json.load(open(str(tmp_path / 'x.json')))
  assert rows['lr=0.1']['n'] == 1 and rows['b']['n'] == 1 and rows['both']['n'] == 2
  assert abs(rows['both']['final'] - 0.6) < 1e-9


def test_bad_run_arguments_say_what_is_wrong(tmp_path, capsys):
  _write_summary(tmp_path / 'a', 'supervised', _evals([0.5], models=('raw',)))
  _write_summary(tmp_path / 'b', 'supervised', _evals([0.6], models=('raw',)))
  (tmp_path / 'plain').write_text('a file')
  corrupt = tmp_path / 'corrupt'
  corrupt.mkdir()
  (corrupt / 'summary.json').write_text('{"history": \n')
  out = str(tmp_path / 'x.png')
  for runs, message in (([str(tmp_path / 'missing')], 'missing does not exist'),
                        ([str(tmp_path / 'plain')], 'plain is not a directory'),
                        ([str(corrupt)], f'{corrupt}/summary.json is not valid JSON'),
                        (['x='], "'x=' names no workdir"),
                        ([f'x={tmp_path}/a,'], 'an empty workdir in the list'),
                        # Two rows of one name: the second used to replace the first silently.
                        ([f'r={tmp_path}/a', f'r={tmp_path}/b'], "two rows named 'r'"),
                        # One run twice would count as two seeds in the mean and std.
                        ([f'r={tmp_path}/a,{tmp_path}/b,{tmp_path}/a/'],
                         f'lists a workdir more than once ({tmp_path}/a, {tmp_path}/a/)'),
                        # A missing workdir with '=' in its path is named whole.
                        ([f'{tmp_path}/lr=0.1'], f'{tmp_path}/lr=0.1 does not exist')):
    assert compare_runs.main(runs + ['--out', out]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err, err
  assert not os.path.exists(out)


def test_results_are_the_final_best_and_median_of_the_last_20_evaluations():
  """A run's row: its last, best and median-of-the-last-20 evaluations up to the step compared
  (the best, 0.9 at step 30, is outside the last 20 at step 240, inside them at step 200)."""
  curve = [(10 * i, 0.9 if i == 3 else 0.01 * i) for i in range(25)]
  teacher = [(10 * i, 0.5 + 0.01 * i) for i in range(25)]
  result = compare_runs.results_up_to({'ema': curve, 'teacher': teacher}, 'ema', last_step=240)
  assert result == pytest.approx({'final': 0.24, 'best': 0.9, 'median_last_20': 0.145,
                                  'teacher_final': 0.74})
  earlier = compare_runs.results_up_to({'ema': curve, 'teacher': teacher}, 'ema', last_step=200)
  assert earlier == pytest.approx({'final': 0.2, 'best': 0.9, 'median_last_20': 0.115,
                                   'teacher_final': 0.7})
