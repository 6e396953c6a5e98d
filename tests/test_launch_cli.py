"""Command lines of launch/two_moons_figure.py, launch/gpu_figures.sh and `mpl.data.augment`:
bad arguments stop with `error: ...` and status 2 before any work."""

import json
import os
import subprocess
import sys

import pytest

from launch import two_moons_figure
from mpl.data import augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_training(monkeypatch):
  """Fails the test if a run would start: every check must come before the first one."""
  def train_and_evaluate(*args, **kwargs):
    raise AssertionError('trained before the arguments were checked')
  monkeypatch.setattr(two_moons_figure.train, 'train_and_evaluate', train_and_evaluate)


@pytest.mark.parametrize('args, message', [
    (['--seeds', '0'], '--seeds 0: give the number of seeds'),
    (['--seeds', '-3'], '--seeds -3'),
    (['--steps', '0'], '--steps 0: give a positive number'),  # used to train the full 10k
    (['--steps', '-5'], '--steps -5'),
    (['--methods', 'supervised,mlp'], "unknown 'mlp'"),       # used to train supervised first
    (['--methods', ','], '--methods names no method'),
    (['--set', 'optimizer.lrr=0.1'], "optimizer has no key 'lrr'; its keys: clip_norm"),
    (['--set', 'optimizer.lr'], 'expected KEY=VALUE'),
    (['--set', 'optimizer.lr=abc'], 'expected a number'),
    (['--set', 'total_steps=2.5'], 'expected an integer'),
    (['--set', 'data.streaming=ture'], 'expected true/false'),  # used to become False
    (['--set', 'optimizer=0.1'], 'optimizer is a block'),
    (['--set', 'optimizer.momentum=5'], 'config.optimizer.momentum must be in [0, 1)'),
    (['--methods', 'supervised', '--set', 'mpl.feedback=exact'], 'reaches only method mpl'),
    (['--out', 'OUT/tm.xyz'], '.xyz is not an image format'),
    (['--out', 'OUT'], 'is a directory'),
    (['--out', '/proc/tm.png'], 'cannot write in /proc'),
])
def test_two_moons_refuses_bad_arguments_before_training(args, message, tmp_path, capsys,
                                                         no_training):
  args = [a.replace('OUT', str(tmp_path)) for a in args]
  out = ['--out', str(tmp_path / 'tm.png')] if '--out' not in args else []
  assert two_moons_figure.main(['--seeds', '2', '--steps', '3'] + out + args) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err, err
  assert not list(tmp_path.iterdir())


def test_two_moons_booleans_and_integers_are_parsed_strictly():
  config = two_moons_figure.make_config('mpl', 3, None, ['data.streaming=yes', 'mu=1e1',
                                                         'mpl.feedback=exact'])
  assert config.data.streaming is True and config.mu == 10 and config.mpl.feedback == 'exact'
  assert config.seed == config.data.seed == 3
  assert two_moons_figure.make_config('supervised', 0, 7, ['mpl.feedback=exact']).total_steps == 7


def test_augment_grid_refuses_a_bad_size_or_out_before_drawing(tmp_path, capsys, monkeypatch):
  def make_grid(*args, **kwargs):
    raise AssertionError('drew the grid before checking the arguments')
  monkeypatch.setattr(augment, 'make_grid', make_grid)
  for args, message in ((['--size', '0'], '--size 0: each sample image needs at least 8'),
                        (['--size', '-8'], '--size -8'),
                        (['--size', '5000'], '--size 5000: at most 512'),
                        (['--out', str(tmp_path / 'no' / 'g.png')], 'does not exist'),
                        (['--out', str(tmp_path / 'g.xyz')], '.xyz is not an image format'),
                        (['--out', str(tmp_path)], 'is a directory'),
                        (['--out', '/proc/g.png'], 'cannot write in /proc')):
    assert augment.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err, err
  assert not list(tmp_path.iterdir())


def test_augment_command_exits_2_without_a_traceback():
  result = subprocess.run([sys.executable, '-m', 'mpl.data.augment', '--size', '0'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.startswith('error: --size 0'), result.stderr
  assert 'Traceback' not in result.stderr


def _gpu_figures(*args, tmp_path, **env):
  # PY=false: should a check be missing, the first Python command fails at once (no job runs).
  env = {**os.environ, 'OUT': str(tmp_path / 'out'), 'RUNS': str(tmp_path / 'runs'),
         'PY': 'false', **env}
  return subprocess.run(['bash', 'launch/gpu_figures.sh', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize('args, message', [
    ((), 'error: no mode given; use prepare | speed | compare'),
    (('spped',), "error: unknown mode 'spped'; use prepare | speed | compare"),
    (('prepare', '--bogus-flag'), "error: unexpected arguments after 'prepare': --bogus-flag"),
])
def test_gpu_figures_says_what_is_wrong_with_its_arguments(args, message, tmp_path):
  result = _gpu_figures(*args, tmp_path=tmp_path)
  assert result.returncode == 2
  lines = result.stderr.splitlines()   # one error line and the short usage, not the header
  assert len(lines) == 2 and lines[0].startswith(message), result.stderr
  assert lines[1].startswith('usage: bash launch/gpu_figures.sh prepare | speed | compare')
  assert not (tmp_path / 'out').exists()   # stopped before anything


def test_gpu_figures_keeps_a_finished_run(tmp_path):
  finished = tmp_path / 'runs' / 'fm1000_mpl_exact'
  finished.mkdir(parents=True)
  (finished / 'summary.json').write_text('{}')
  result = _gpu_figures('compare', tmp_path=tmp_path)
  assert result.returncode == 2
  assert result.stderr.startswith(f'error: a finished run (summary.json) is in {finished}')
  assert 'OVERWRITE=1' in result.stderr
  assert (finished / 'summary.json').exists()
  # Allowed with OVERWRITE=1: it goes on (and here stops at PY=false, before any run).
  result = _gpu_figures('compare', tmp_path=tmp_path, OVERWRITE='1')
  assert 'finished run' not in result.stderr
  assert (finished / 'summary.json').exists()


def test_speed_summary_gives_the_issue_figures(tmp_path):
  """The GPU script's records -> a few lines: step times, FLOPs, the augmentation's share of
  the profiled step (alone, and with the fusions it shares), images/s, accuracies."""
  from launch import speed_summary
  bench = {'mode': 'train_step', 'name': 'bench_bfloat16', 'dtype': 'bfloat16',
           'step_ms_median': 30.0, 'step_ms_back_to_back': 29.0, 'images_per_s': 34133.0,
           'flops_per_step': 3.66e12, 'flops_counted_on': 'program', 'achieved_tflops': 122.0,
           'memory_analysis': {'temp_bytes': 2**31}, 'peak_bytes_in_use': None,
           'profile': {'wall_ms': 30.5, 'busy_ms': 28.0, 'op_ms': 28.0, 'notes': [],
                       'by_kind': {'convolution': {'ms': 20.0, 'share': 0.714}},
                       'by_stage': {'teacher_forward': {'ms': 20.0, 'share': 0.714},
                                    'views': {'ms': 1.4, 'share': 0.05},
                                    'teacher_forward + views': {'ms': 0.56, 'share': 0.02},
                                    'student_step + views (backward)': {'ms': 0.28,
                                                                        'share': 0.01}}}}
  run = {'run': 'fashion_all_cnn', 'model': 'cnn', 'num_labeled': -1, 'steps': 4000,
         'wall_s': 95.0, 'final': {'accuracy': 0.927}, 'best': {'accuracy': 0.93, 'step': 3500}}
  path = tmp_path / 'results.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in (
      {'setup': {'mode': 'speed', 'gpu': 'H200', 'backend': 'gpu', 'jax': '0.11.2'}}, bench,
      run)) + '\n{"cut short')
  lines = speed_summary.summary([json.loads(l) for l in path.read_text().splitlines()[:-1]])
  text = '\n'.join(lines)
  assert 'bench_bfloat16 bfloat16     30.00 ms/step (back to back 29.00)' in text, text
  assert '3.660 TFLOP/step (program), 122.0 TFLOP/s, temp 2.00 GiB, peak -' in text, text
  assert "1.400 ms/step = 5.0% of op time, up to 8.0% with the fusions it shares" in text, text
  assert 'fashion_all_cnn cnn labels all: final 92.70%, best 93.00% (step 3500)' in text, text
  result = subprocess.run([sys.executable, '-m', 'launch.speed_summary', str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and result.stdout.strip() == text, result.stderr
