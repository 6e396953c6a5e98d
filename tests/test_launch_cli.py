"""Command lines of launch/two_moons_figure.py, launch/gpu_figures.sh, launch/bench_augment.py
and `mpl.data.augment`: bad arguments stop with `error: ...` and status 2 before any work. And
the Colab notebook's commands and closing cell."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from launch import two_moons_figure
from mpl.data import augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _log_levels_left_alone(monkeypatch):
  """two_moons_figure.main quiets absl and the root logger for the rest of its process; called
  here in the test process, it must not do so for the worker's later tests (absl's INFO lines
  would no longer reach pytest's caplog)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(absl_logging, 'set_verbosity', lambda level: None)
  monkeypatch.setattr(logging.getLogger(), 'setLevel', lambda level: None)


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
    (['--methods', 'mpl,supervised,mpl'], 'names a method twice'),
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


def test_bench_augment_times_the_strong_view_it_is_asked_for(monkeypatch, capsys):
  """launch/bench_augment.py: the view of --variant on a batch of the asked shape and dtype,
  compiled once, reported as the batch over the median time (a fake clock: 0.1, 0.4 and
  0.2 s per batch, after a 10 s compile)."""
  from launch import bench_augment  # pylint: disable=g-import-not-at-top
  traced = []
  real_view = augment.strong_view

  def strong_view(key, images, variant):
    traced.append((images.shape, str(images.dtype), variant))
    return real_view(key, images, variant=variant)

  ticks = iter([0.0, 10.0, 10.0, 10.1, 20.0, 20.4, 30.0, 30.2])

  class FakeTime:
    perf_counter = staticmethod(lambda: next(ticks))
    process_time = staticmethod(lambda: 0.0)

  monkeypatch.setattr(augment, 'strong_view', strong_view)
  monkeypatch.setattr(bench_augment, 'time', FakeTime)
  monkeypatch.setattr(sys, 'argv', ['bench_augment', '--variant', 'fixmatch', '--batch', '6',
                                    '--size', '12', '--channels', '1', '--dtype', 'float32',
                                    '--iters', '3'])
  bench_augment.main()
  line = capsys.readouterr().out
  assert traced == [((6, 12, 12, 1), 'float32', 'fixmatch')]
  assert 'variant=fixmatch dtype=float32 batch=6x12x12x1:' in line
  assert 'compile+first 10.0 s, median 200.0 ms/batch (30 images/s; best 60 images/s)' in line


# ml_collections loads a config file with the loader's load_module(), deprecated in Python 3.12.
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_colab_notebook_runs_are_valid_commands_and_its_last_cell_reads_their_results(
    tmp_path, monkeypatch):
  """launch/colab_smoke.ipynb: a notebook Colab opens (nbformat 4), whose `!python -m mpl.main`
  lines parse with the trainer's own flags into valid configs, and whose closing cell reads
  the summary keys and the curves a run writes (a 2-step run of its TwoMoons command)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from mpl import config_lib, train  # pylint: disable=g-import-not-at-top

  notebook = json.load(open(os.path.join(ROOT, 'launch', 'colab_smoke.ipynb')))
  assert notebook['nbformat'] == 4 and 'metadata' in notebook
  for cell in notebook['cells']:
    assert cell['cell_type'] in ('markdown', 'code') and isinstance(cell['source'], list)
    if cell['cell_type'] == 'code':   # fields nbformat requires of a code cell
      assert cell['outputs'] == [] and 'execution_count' in cell and 'metadata' in cell
  code = [''.join(c['source']) for c in notebook['cells'] if c['cell_type'] == 'code']
  commands = [line[1:] for cell in code for line in cell.splitlines()
              if line.startswith('!python -m mpl.main')]
  assert len(commands) == 2
  monkeypatch.chdir(ROOT)
  configs = {}
  for command in commands:
    argv = ['main'] + shlex.split(command)[3:]
    flag_values = flags.FlagValues()   # the trainer's two flags, as mpl/main.py defines them
    config_flags.DEFINE_config_file('config', None, '', flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string('workdir', None, '', flag_values=flag_values)
    flag_values(argv)
    config_lib.validate(flag_values.config, jax.device_count())
    configs[os.path.basename(flag_values.workdir)] = flag_values.config
  assert configs['two_moons_mpl'].method == configs['fashion_mnist_mpl'].method == 'mpl'
  assert configs['fashion_mnist_mpl'].data.source == 'idx'

  two_moons = configs['two_moons_mpl'].unlock()
  two_moons.total_steps = 2
  train.train_and_evaluate(two_moons, str(tmp_path / 'runs' / 'two_moons_mpl'))
  shutil.copytree(tmp_path / 'runs' / 'two_moons_mpl', tmp_path / 'runs' / 'fashion_mnist_mpl')
  shown = []
  display = types.ModuleType('IPython.display')
  display.Image = lambda path: path
  display.display = shown.append
  monkeypatch.setitem(sys.modules, 'IPython', types.ModuleType('IPython'))
  monkeypatch.setitem(sys.modules, 'IPython.display', display)
  exec(code[-1].replace('/content/runs', str(tmp_path / 'runs')), {})  # pylint: disable=exec-used
  assert shown == [str(tmp_path / 'runs' / run / 'curves.png')
                   for run in ('two_moons_mpl', 'fashion_mnist_mpl')]
  assert all(os.path.exists(path) for path in shown)


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


@pytest.mark.parametrize('run', ['fashion_all_cnn', 'fashion_all_wrn'])
def test_gpu_figures_speed_keeps_each_of_its_finished_runs(run, tmp_path):
  finished = tmp_path / 'runs' / run
  finished.mkdir(parents=True)
  (finished / 'summary.json').write_text('{}')
  result = _gpu_figures('speed', tmp_path=tmp_path)
  assert result.returncode == 2
  assert result.stderr.startswith(f'error: a finished run (summary.json) is in {finished}')
  assert (finished / 'summary.json').exists()


def _profiled_bench(**profile):
  profile = {'wall_ms': 31.0, 'busy_ms': 25.0, 'op_ms': 20.0, 'notes': [],
             'by_kind': {'convolution': {'ms': 12.0, 'share': 0.6},
                         'elementwise': {'ms': 4.0, 'share': 0.2},
                         'reduction': {'ms': 2.0, 'share': 0.1},
                         'copy': {'ms': 1.0, 'share': 0.05},
                         'collective': {'ms': 1.0, 'share': 0.05}},
             'by_stage': {'teacher_forward': {'ms': 15.0, 'share': 0.75},
                          'views': {'ms': 2.0, 'share': 0.1},
                          'teacher_forward + views': {'ms': 1.0, 'share': 0.05}}, **profile}
  return {'mode': 'train_step', 'name': 'bench_bfloat16', 'dtype': 'bfloat16',
          'step_ms_median': 30.0, 'step_ms_back_to_back': 29.0, 'images_per_s': 34133.0,
          'flops_per_step': None, 'achieved_tflops': None, 'memory_analysis': None,
          'peak_bytes_in_use': 3 * 2**30, 'profile': profile}


def test_speed_summary_profile_shares_are_percent_of_op_time_not_busy_time():
  from launch import speed_summary
  lines = speed_summary.summary([_profiled_bench()])
  text = '\n'.join(lines)
  assert lines[0].endswith('34,133 images/s, FLOPs unknown, temp -, peak 3.00 GiB'), text
  # wall, then busy; the four heaviest kinds of op, in percent of op time
  assert lines[1] == ('  profile (bench_bfloat16): wall 31.00 ms, busy 25.00 ms per step; by kind: '
                      'convolution 60%, elementwise 20%, reduction 10%, copy 5%'), text
  # views 2 ms of 20 ms op time (not of the 25 ms busy); with its fusion 3 ms
  assert lines[2] == ("  strong augmentation (stage 'views'): 2.000 ms/step = 10.0% of op time, "
                      "up to 15.0% with the fusions it shares (1.000 ms)"), text


def test_speed_summary_gives_the_share_of_views_fused_whole_into_other_stages():
  """On a GPU XLA may fuse all of the strong view into the teacher's input: no 'views' row,
  its share is then between 0 and that of the fusions."""
  from launch import speed_summary
  bench = _profiled_bench(by_stage={'teacher_forward': {'ms': 17.0, 'share': 0.85},
                                    'teacher_forward + views': {'ms': 3.0, 'share': 0.15}})
  lines = speed_summary.summary([bench])
  assert lines[2] == ("  strong augmentation (stage 'views'): 0.000 ms/step = 0.0% of op time, "
                      "up to 15.0% with the fusions it shares (3.000 ms)"), lines


def test_speed_summary_names_a_failed_profile_and_keeps_the_timed_figures():
  from launch import speed_summary
  bench = _profiled_bench()
  bench['profile'] = {'error': 'RuntimeError: no trace'}
  lines = speed_summary.summary([bench, {'mode': 'train_step', 'name': 'bench_h_model',
                                         'dtype': 'bfloat16', 'step_ms_median': 33.0,
                                         'images_per_s': 31030.0}])
  assert len(lines) == 3, lines
  assert lines[0].startswith('bench_bfloat16 bfloat16     30.00 ms/step'), lines
  assert lines[1] == '  profile: RuntimeError: no trace', lines
  assert lines[2].startswith('bench_h_model  bfloat16     33.00 ms/step'), lines


def test_speed_summary_reads_the_augment_run_and_setup_records_own_fields():
  from launch import speed_summary
  augment_record = {'mode': 'augment_only', 'name': 'augment', 'variant': 'randaugment',
                    'magnitude': 10.0, 'batch': 1792, 'image_shape': [32, 32, 3],
                    'batch_ms_mean': 6.5, 'batch_ms_median': 5.0, 'images_per_s': 358400.0}
  run = {'run': 'fashion_all_wrn', 'model': 'wrn28_2', 'num_labeled': 1000, 'steps': 4000,
         'total_steps': 10000, 'wall_s': 125.0, 'final': {'accuracy': 0.9},
         'best': {'accuracy': 0.91, 'step': 3000}}
  cut = {'run': 'fashion_all_cnn', 'error': 'no usable summary.json: FileNotFoundError()',
         'last_eval': {'step': 2500, 'eval/accuracy': 0.88}}
  lines = speed_summary.summary([
      {'setup': {'mode': 'speed', 'gpu': 'H200', 'backend': 'gpu', 'jax': '0.11.2',
                 'smoke': True}},
      {'setup': {'mode': 'speed', 'gpu': 'H200', 'backend': 'gpu', 'jax': '0.11.2',
                 'smoke': False}}, augment_record, run, cut])
  assert lines == [
      'speed: H200 (backend gpu, jax 0.11.2, SMOKE)',
      'speed: H200 (backend gpu, jax 0.11.2)',
      'augment        strong view (randaugment, magnitude 10.0) on 1792 images 32x32x3: '
      '5.00 ms/batch, 358,400 images/s',
      'fashion_all_wrn wrn28_2 labels 1000: final 90.00%, best 91.00% (step 3000), 4000 steps '
      'in 125 s',
      'fashion_all_cnn no summary (no usable summary.json: FileNotFoundError()); last eval: '
      '{"step": 2500, "eval/accuracy": 0.88}'], lines


def test_speed_summary_without_its_file_argument_fails_with_the_usage():
  result = subprocess.run([sys.executable, '-m', 'launch.speed_summary'], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 1, result
  assert result.stderr.startswith('usage: python -m launch.speed_summary OUT/results.jsonl')


def test_two_moons_counts_runs_at_99_percent_as_successes_and_draws_the_first_seed(tmp_path,
                                                                                    monkeypatch):
  """Training replaced by made-up accuracies: the success counts, rates and means in the .json,
  and the panels drawn from each method's first seed."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  accuracies = {('supervised', 0): 0.99, ('supervised', 1): 0.985, ('supervised', 2): 1.0,
                ('mpl', 0): 0.5, ('mpl', 1): 0.999, ('mpl', 2): 0.98}
  drawn = []

  def run(method, seed, config, with_boundary):
    assert config.seed == config.data.seed == seed and config.total_steps == 3
    if not with_boundary:
      return {'accuracy': accuracies[method, seed], 'wall_s': 0.0}, None
    drawn.append((method, seed))
    points = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    xx, yy, _ = two_moons_figure.grid_for(points, n=8)
    return {'accuracy': accuracies[method, seed], 'wall_s': 0.0}, {
        'xx': xx, 'yy': yy, 'grid_class': (xx > 0.5).astype(int), 'points': points,
        'labels': np.array([0, 1]), 'labeled_idx': np.array([0, 1])}
  monkeypatch.setattr(two_moons_figure, 'run', run)
  out = tmp_path / 'tm.png'
  assert two_moons_figure.main(['--seeds', '3', '--steps', '3', '--methods', 'supervised,mpl',
                                '--out', str(out)]) == 0
  assert drawn == [('supervised', 0), ('mpl', 0)]
  assert out.stat().st_size > 0
  methods = json.loads((tmp_path / 'tm.json').read_text())['methods']
  assert methods['supervised']['successes'] == 2     # 99.0 % counts; 98.5 % does not
  assert methods['supervised']['success_rate'] == pytest.approx(2 / 3)
  assert methods['supervised']['mean_accuracy'] == pytest.approx((0.99 + 0.985 + 1.0) / 3)
  assert methods['supervised']['min_accuracy'] == 0.985
  assert methods['mpl']['successes'] == 1 and methods['mpl']['steps'] == 3
