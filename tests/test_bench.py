"""mpl.bench: the train-step and augmentation benchmarks run and report every field.

Timings are not asserted (speed targets live in the benchmark, not in tests): only that each
field is present, of the right kind and positive where it must be.
"""

import json
import os
import subprocess
import sys

import importlib.util

import jax

from mpl import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_FIELDS = ('config', 'method', 'dataset', 'model', 'dtype', 'global_batch_labeled',
                'global_batch_unlabeled', 'devices', 'device_kind', 'platform', 'mesh', 'timing',
                'step_ms_mean', 'step_ms_median', 'images_per_s', 'flops_per_step',
                'achieved_tflops', 'peak_bytes_in_use', 'memory_analysis', 'compile_s')
POSITIVE = ('global_batch_labeled', 'global_batch_unlabeled', 'devices', 'step_ms_mean',
            'step_ms_median', 'images_per_s', 'flops_per_step', 'flops_per_step_per_device',
            'achieved_tflops', 'compile_s')


def load_config(name, arg=None):
  """configs/<name> loaded the way `--config configs/<name>:arg` loads it."""
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _check_train_record(record, config, steps):
  missing = [k for k in TRAIN_FIELDS if k not in record]
  assert not missing, missing
  for key in POSITIVE:
    assert isinstance(record[key], (int, float)) and record[key] > 0, (key, record[key])
  assert record['method'] == 'mpl'
  assert record['global_batch_unlabeled'] == config.batch_size * config.mu
  assert record['devices'] == jax.device_count()
  # Cost analysis is per device; the record scales it to the whole mesh.
  assert record['flops_per_step'] == record['flops_per_step_per_device'] * record['devices']
  assert record['step_ms_min'] <= record['step_ms_median'] <= record['step_ms_max']
  assert record['final_step'] == record['warmup'] + steps
  assert record['memory_analysis']['argument_bytes'] > 0
  assert record['peak_bytes_in_use'] is None or record['peak_bytes_in_use'] > 0
  json.dumps(record)  # one JSON line


def test_bench_train_step_reports_every_field(tmp_path):
  config = load_config('two_moons.py', 'method=mpl,runlocal')
  record = bench.bench_train_step(config, steps=2, warmup=1, name='two_moons:mpl',
                                  workdir=str(tmp_path))
  _check_train_record(record, config, steps=2)
  assert record['config'] == 'two_moons:mpl'


def test_bench_augment_only_times_the_strong_view():
  config = load_config('fashion_mnist.py', 'method=mpl,runlocal')
  record = bench.bench_augment(config, steps=2, warmup=1)
  assert record['batch'] == config.batch_size * config.mu
  assert record['image_shape'] == [32, 32, 1]
  for key in ('batch_ms_mean', 'batch_ms_median', 'images_per_s', 'compile_s'):
    assert record[key] > 0, key


def test_bench_cli_prints_one_json_line():
  # The cheap --augment_only path: the CLI plumbing (flags, config argument, JSON on stdout) is
  # the same as for the train step, which the in-process test above covers.
  arg = 'configs/fashion_mnist.py:method=mpl,runlocal'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'mpl.bench', '--config', arg, '--augment_only', '--steps', '2',
       '--warmup', '1', '--config.mu=4'],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1, result.stdout
  record = json.loads(lines[0])
  assert record['config'] == arg
  assert record['mode'] == 'augment_only'
  assert record['batch'] == 16 * 4  # the --config.mu override took effect
  assert record['images_per_s'] > 0
