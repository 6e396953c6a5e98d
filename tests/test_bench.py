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
import pytest

from conftest import COMPILE_FLAGS
from mpl import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_FIELDS = ('config', 'method', 'dataset', 'model', 'dtype', 'h_dtype', 'phase',
                'global_batch_labeled', 'global_batch_unlabeled', 'devices', 'device_kind',
                'platform', 'mesh', 'timing',
                'step_ms_mean', 'step_ms_median', 'images_per_s', 'flops_per_step',
                'achieved_tflops', 'flops_counted_on', 'flops_per_step_compiled',
                'step_ms_back_to_back', 'default_matmul_precision',
                'peak_bytes_in_use', 'memory_analysis', 'compile_s')
POSITIVE = ('global_batch_labeled', 'global_batch_unlabeled', 'devices', 'step_ms_mean',
            'step_ms_median', 'images_per_s', 'flops_per_step', 'flops_per_step_per_device',
            'achieved_tflops', 'flops_per_step_compiled', 'step_ms_back_to_back', 'compile_s')


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
  assert record['h_dtype'] == config.mpl.h_dtype
  assert record['global_batch_unlabeled'] == config.batch_size * config.mu
  assert record['devices'] == jax.device_count()
  # The compiled program's cost analysis is per device; the record scales it to the mesh, which
  # counts work every device repeats (the update of replicated weights) once per device. The
  # program's count (before partitioning) is the whole step's, each operation once.
  assert (record['flops_per_step_compiled']
          == record['flops_per_step_per_device'] * record['devices'])
  assert record['flops_counted_on'] == 'program'
  assert record['flops_per_step'] <= record['flops_per_step_compiled']
  assert record['step_ms_min'] <= record['step_ms_median'] <= record['step_ms_max']
  assert record['final_step'] == record['warmup'] + 2 * steps  # timed, then back to back
  assert record['memory_analysis']['argument_bytes'] > 0
  assert record['peak_bytes_in_use'] is None or record['peak_bytes_in_use'] > 0
  json.dumps(record)  # one JSON line


def test_bench_train_step_reports_every_field(tmp_path):
  config = load_config('two_moons.py', 'method=mpl,runlocal')
  record = bench.bench_train_step(config, steps=2, warmup=1, name='two_moons:mpl',
                                  workdir=str(tmp_path))
  _check_train_record(record, config, steps=2)
  assert record['config'] == 'two_moons:mpl'


def _fake_clock(monkeypatch, durations):
  """bench's perf_counter, each (start, end) pair of calls `durations` apart in turn (seconds):
  what the bench times is then known exactly."""
  import types
  calls, now = [0], [100.0]
  def perf_counter():
    if calls[0] % 2:
      now[0] += durations[calls[0] // 2]
    calls[0] += 1
    return now[0]
  monkeypatch.setattr(bench, 'time', types.SimpleNamespace(perf_counter=perf_counter))


def test_bench_train_step_figures_follow_from_the_step_times(tmp_path, monkeypatch):
  """Milliseconds, the median (of the sorted times), the back-to-back time per step, and
  images/s and TFLOP/s of the median step, with every unlabeled image counted."""
  # Lowering, compiling, 3 timed steps (4, 1 and 2 ms), then 3 steps back to back in 6 ms.
  _fake_clock(monkeypatch, [0.5, 2.0, 0.004, 0.001, 0.002, 0.006])
  config = load_config('two_moons.py', 'method=mpl,runlocal')
  record = bench.bench_train_step(config, steps=3, warmup=1, workdir=str(tmp_path))
  assert (record['lower_s'], record['compile_s']) == pytest.approx((0.5, 2.0))
  assert record['step_ms_median'] == pytest.approx(2.0)
  assert record['step_ms_mean'] == pytest.approx(7 / 3)
  assert (record['step_ms_min'], record['step_ms_max']) == pytest.approx((1.0, 4.0))
  assert record['step_ms_back_to_back'] == pytest.approx(2.0)
  images = config.batch_size * (1 + config.mu)
  assert record['images_per_s'] == pytest.approx(images / 2e-3)
  assert record['achieved_tflops'] == pytest.approx(record['flops_per_step'] / 2e-3 / 1e12)


def test_bench_of_a_supervised_step_counts_its_labeled_images_only(tmp_path, monkeypatch):
  """A method that reads no unlabeled batch: config.mu is not in its images/s."""
  _fake_clock(monkeypatch, [0.5, 2.0, 0.004, 0.004])
  config = load_config('two_moons.py', 'method=supervised,runlocal')
  config.mu = 4
  record = bench.bench_train_step(config, steps=1, warmup=1, workdir=str(tmp_path))
  assert record['global_batch_unlabeled'] == 0
  assert record['images_per_s'] == pytest.approx(config.batch_size / 4e-3)


def test_bench_augment_only_images_per_s_is_the_batch_over_the_median_time(monkeypatch):
  _fake_clock(monkeypatch, [1.5, 0.030, 0.010, 0.020])   # compile, then 3 calls
  config = load_config('fashion_mnist.py', 'method=mpl,runlocal')
  record = bench.bench_augment(config, steps=3, warmup=1)
  assert record['compile_s'] == pytest.approx(1.5)
  assert record['batch_ms_median'] == pytest.approx(20.0)
  assert record['batch_ms_mean'] == pytest.approx(20.0)
  assert (record['batch_ms_min'], record['batch_ms_max']) == pytest.approx((10.0, 30.0))
  assert record['images_per_s'] == pytest.approx(config.batch_size * config.mu / 0.020)


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
  # The whole command line, overrides included: the record says what it ran.
  assert record['argv'] == ['--config', arg, '--augment_only', '--steps', '2', '--warmup', '1',
                            '--config.mu=4']


def _dry_run(mesh_shape, spatial='', data_replicas=None):
  # The WRN-10-1 of the CIFAR runlocal config: several times quicker to compile than the L2
  # config's tiny EfficientNet (whose width-split step test_model_parallel.py checks).
  config = load_config('cifar10_4k_mpl.py', 'runlocal')
  config.batch_size, config.mu = 16, 2
  config.mesh.data = 8           # the "real run" has 8 replicas of 16 labeled images in all
  config.spatial_partition = spatial
  return bench.dry_run(config, mesh_shape=mesh_shape, data_replicas=data_replicas,
                       name='c10:runlocal')


def test_dry_run_memory_per_device_follows_the_mesh():
  one = _dry_run((1, 1))
  split = _dry_run((1, 4), spatial='width')
  for record in (one, split):
    json.dumps(record)
    assert record['mode'] == 'dry_run'
    assert record['batch_per_replica_labeled'] == 2     # 16 labeled over 8 replicas
    assert record['batch_per_replica_unlabeled'] == 4
    for key in ('params_bytes', 'opt_state_bytes', 'ema_params_bytes', 'temp_bytes'):
      assert record['per_device'][key] > 0, key
    assert record['per_device_total_bytes'] == sum(v for v in record['per_device'].values() if v)
  assert one['parameters'] == split['parameters']
  # Splitting weights 4 ways shrinks their per-device bytes (not exactly 4x: vectors that 4
  # does not divide stay whole), and the optimizer state follows them.
  for key in ('params_bytes', 'opt_state_bytes', 'ema_params_bytes'):
    assert split['per_device'][key] < 0.6 * one['per_device'][key], key
  assert split['mesh'] == {'data': 1, 'model': 4}


def test_dry_run_counts_the_data_a_run_keeps_on_each_device():
  # CIFAR-10 lives in device memory: the training set with labels and index lists on every
  # device, the test set (10,000 = 10 batches of 1000) split over the run's 4 data shards.
  # The network plays no part in these bytes: the runlocal WRN-10-1 traces in a fraction of the
  # WRN-28-2's time.
  config = load_config('cifar10_4k_mpl.py', '')
  config.model = load_config('cifar10_4k_mpl.py', 'runlocal').model
  record = bench.dry_run(config, mesh_shape=(1, 1), data_replicas=4, compile_step=False)
  image = 32 * 32 * 3
  expected = 50000 * (image + 4) + 4 * (4000 + 50000) + 10000 * (image + 8) // 4
  assert record['per_device']['resident_data_bytes'] == expected
  assert record['per_device_total_bytes'] >= expected
  # Excluding the labeled examples from the unlabeled pool shortens its index list.
  config.data.exclude_labeled = True
  record = bench.dry_run(config, mesh_shape=(1, 1), data_replicas=4, compile_step=False)
  assert record['per_device']['resident_data_bytes'] == expected - 4 * 4000
  # A streamed dataset keeps only its batch on the devices.
  config.data.streaming = True
  record = bench.dry_run(config, mesh_shape=(1, 1), data_replicas=4, compile_step=False)
  assert record['per_device']['resident_data_bytes'] == 0


def test_dry_run_command_line_creates_its_fake_devices(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'mpl.bench', '--config', 'configs/two_moons.py:method=mpl,runlocal',
       '--dry_run', '--mesh', '2x2'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS=COMPILE_FLAGS))  # no device count: bench sets it
  assert out.returncode == 0, out.stderr[-2000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  assert record['mesh'] == {'data': 2, 'model': 2}


def test_dry_run_fits_leaves_10_percent_of_each_accelerators_gib_free(monkeypatch):
  """`fits`: the per-device total within 90 % of the accelerator's memory, counted in GiB
  (2**30 bytes), not GB."""
  config = load_config('two_moons.py', 'method=mpl,runlocal')
  total = bench.dry_run(config, mesh_shape=(1, 1))['per_device_total_bytes']
  gib = total / 2**30
  monkeypatch.setattr(bench, 'ACCELERATOR_MEMORY_GIB', {
      'roomy': gib / 0.85, 'tight': gib / 0.95, 'too small': gib * 0.99})
  record = bench.dry_run(config, mesh_shape=(1, 1))
  assert record['per_device_total_bytes'] == total
  assert record['fits'] == {'roomy': True, 'tight': False, 'too small': False}


def test_tpu_out_of_memory_verdict_is_read_from_the_compiler_message():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (118.67G) exceeds available HBM (15.48G).')
  shortfall = bench._hbm_shortfall(message)
  assert shortfall['temp_bytes'] == int(118.67 * 2**30)
  assert 'exceeds available HBM' in shortfall['message']
  assert bench._hbm_shortfall('INTERNAL: something else (3.2G)') is None
  other = bench._hbm_shortfall('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. '
                               'Used 20.50G of 15.48G hbm. Exceeded hbm capacity by 5.02G.')
  assert other['temp_bytes'] == int(20.5 * 2**30)
  unsized = bench._hbm_shortfall('RESOURCE_EXHAUSTED: TensorCore HBM usage too high')
  assert unsized == {'temp_bytes': None,
                     'message': 'RESOURCE_EXHAUSTED: TensorCore HBM usage too high'}


def test_tpu_target_without_libtpu_says_how_to_install_it(monkeypatch):
  from mpl.errors import ConfigError
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else real_find_spec(name, *a))
  with pytest.raises(ConfigError, match=r'pip install "jax\[tpu\]=='):
    bench.tpu_devices('v3', 16)
  with pytest.raises(ConfigError, match='v3'):
    bench.tpu_devices('v9', 16)  # unknown generations list the valid ones


def test_dry_run_compiles_for_a_tpu_when_libtpu_is_installed():
  """Ahead-of-time compilation by libtpu on this CPU machine (not installed in CI: skipped)."""
  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed (pip install "jax[tpu]==<jax version>")')
  config = load_config('two_moons.py', 'method=mpl,runlocal')
  record = bench.dry_run(config, mesh_shape=(2, 2), tpu='v3', name='two_moons')
  assert record['compiled_for'] == 'TPU v3'
  assert record['per_device']['temp_bytes'] > 0
  assert list(record['fits']) == ['TPU v3 (16 GiB per device)'] and record['fits'][
      'TPU v3 (16 GiB per device)']


def test_program_flops_count_convolutions_without_the_backends_own_analysis(monkeypatch):
  """On a GPU the compiled program's cost analysis leaves out cuDNN convolutions, and the CUDA
  plugin has no Lowered.cost_analysis: the bench counts the lowered program on the CPU backend,
  which gives the compiled CPU program's count here (every MAC of a SAME convolution)."""
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  lowered = jax.jit(conv).lower(jax.numpy.ones((8, 16, 16, 4)), jax.numpy.ones((3, 3, 4, 32)))
  want = bench._total_flops(lowered.compile().cost_analysis())
  macs = 8 * 32 * 4 * sum(len([d for d in (-1, 0, 1) if 0 <= i + d < 16]) for i in range(16)) ** 2
  assert want == 2 * macs
  def no_lowered_cost_analysis(self):
    raise NotImplementedError('Lowered.cost_analysis not implemented on platform cuda')
  monkeypatch.setattr(type(lowered), 'cost_analysis', no_lowered_cost_analysis)
  assert bench._program_flops(lowered) == want
