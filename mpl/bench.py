r"""Speed and memory of one config's train step (or of its strong augmentation), as one JSON line.

  python -m mpl.bench --config configs/fashion_mnist.py:method=mpl,runlocal --steps 3
  python -m mpl.bench --config configs/cifar10_4k_mpl.py --steps 20 \
      --config.data.standin=if_missing     # stand-in pixels if cifar10 is not prepared
  python -m mpl.bench --config configs/imagenet10_mpl.py:standin --config.batch_size=16
  python -m mpl.bench --config configs/cifar10_4k_mpl.py --augment_only

Train step (default): builds the experiment exactly as training does (`train.build`, in a
temporary workdir unless --workdir is given), creates the state, lowers and compiles the jitted
train step once (ahead of time), reads XLA's cost and memory analysis of the compiled program,
runs --warmup steps, then times --steps steps. Each timed step is ended by `block_until_ready`
on the new state and metrics, so `step_ms_*` are per-step wall times (mean, median, min, max);
blocking every step forgoes the overlap of dispatch with compute, which matters only for steps
of a few milliseconds.
`images_per_s` = (labeled + unlabeled images per step) / median step time; each unlabeled image
gets a weak and a strong view, counted once.

FLOPs: `compiled.cost_analysis()` of the SPMD program is that of ONE device's partition;
`flops_per_step` multiplies it by the number of devices in the mesh (the whole-mesh count under
data parallelism, including the partitioner's small overhead) and `achieved_tflops` =
flops_per_step / median step time, for the whole mesh. XLA's cost analysis may count the body of
a loop (`lax.scan`, e.g. RandAugment's layers) once; the networks have no loops, so at most the
augmentation is undercounted, which is small next to the convolutions.
Memory: `memory_analysis` (per device: temporaries, arguments, outputs, aliased = donated) and the
first local device's `memory_stats()['peak_bytes_in_use']` (null where the backend has no
allocator statistics, e.g. CPU).

--augment_only: times just the MPL strong view (`mpl.data.augment.strong_view`, called as the MPL
method calls it, with the config's augment settings) on batch_size * mu random uint8 images of
the config's image shape, sharded over the mesh's 'data' axis like a training batch.

Speed and memory targets belong here (and in launch/ scripts), not in timed tests.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mpl import config_lib, sharding, train
from mpl.data import augment, datasets
from mpl.errors import ConfigError, DataError

FLAGS = flags.FLAGS


def _total_flops(cost: Any) -> float | None:
  """FLOPs from `Compiled.cost_analysis()`: a dict (new jax) or a list of per-module dicts."""
  if cost is None:
    return None
  entries = cost if isinstance(cost, (list, tuple)) else [cost]
  flops = [float(e['flops']) for e in entries if isinstance(e, dict) and 'flops' in e]
  total = sum(f for f in flops if f > 0)
  return total if total > 0 else None


def _memory_analysis(compiled) -> dict[str, int] | None:
  """Per-device byte counts of the compiled program, or None where the backend has none."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None
  if stats is None:
    return None
  out = {}
  for name in ('temp', 'argument', 'output', 'alias', 'generated_code'):
    value = getattr(stats, f'{name}_size_in_bytes', None)
    if value is not None:
      out[f'{name}_bytes'] = int(value)
  return out or None


def _peak_bytes_in_use() -> int | None:
  try:
    stats = jax.local_devices()[0].memory_stats()
  except (NotImplementedError, AttributeError, RuntimeError):
    return None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return int(stats['peak_bytes_in_use'])


def _summary(times_s: list[float]) -> dict[str, float]:
  ms = [1e3 * t for t in times_s]
  return {'mean': statistics.fmean(ms), 'median': statistics.median(ms), 'min': min(ms),
          'max': max(ms)}


def _device_info(mesh) -> dict[str, Any]:
  device = jax.devices()[0]
  return {'devices': int(mesh.size), 'device_kind': device.device_kind,
          'platform': device.platform, 'mesh': {k: int(v) for k, v in mesh.shape.items()}}


def _check_counts(steps: int, warmup: int) -> None:
  if steps < 1 or warmup < 0:
    raise ConfigError(f'--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}.')


def bench_train_step(config, *, steps: int = 10, warmup: int = 2, name: str = '',
                     workdir: str | None = None) -> dict[str, Any]:
  """Compiles and times `config`'s train step; returns the JSON-able record (module doc)."""
  _check_counts(steps, warmup)
  with contextlib.ExitStack() as cleanup:
    if workdir is None:
      workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix='mpl_bench_'))
    experiment = train.build(config, workdir)
    method, arrays = experiment.method, experiment.arrays
    unlabeled = config.batch_size * config.mu if method.uses_unlabeled else 0
    with experiment.activate():
      state = experiment.init_state(jax.random.PRNGKey(config.seed))
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      lowered = experiment.train_step.lower(state, arrays)
      lower_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      compiled = lowered.compile()
      compile_s = time.perf_counter() - t0
      flops_per_device = _total_flops(compiled.cost_analysis())
      memory = _memory_analysis(compiled)

      for _ in range(warmup):
        state, metrics = compiled(state, arrays)   # the old state is donated: re-bind it
      jax.block_until_ready(state)
      times = []
      for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, arrays)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
      step = int(jax.device_get(state.step))

  step_ms = _summary(times)
  median_s = step_ms['median'] / 1e3
  num_devices = int(experiment.mesh.size)
  flops = flops_per_device * num_devices if flops_per_device else None
  return {
      'mode': 'train_step',
      'config': name,
      'method': config.method,
      'dataset': config.dataset,
      'model': config.model.name,
      'dtype': str(config.model.get('dtype') or 'float32'),
      'image_shape': list(experiment.data.train_images.shape[1:]),
      'global_batch_labeled': int(config.batch_size),
      'global_batch_unlabeled': int(unlabeled),
      **_device_info(experiment.mesh),
      'steps': steps,
      'warmup': warmup,
      'final_step': step,
      'timing': 'per step, each ended by block_until_ready; after compile and warm-up',
      'step_ms_mean': step_ms['mean'],
      'step_ms_median': step_ms['median'],
      'step_ms_min': step_ms['min'],
      'step_ms_max': step_ms['max'],
      'images_per_s': (config.batch_size + unlabeled) / median_s,
      'flops_per_step': flops,
      'flops_per_step_per_device': flops_per_device,
      'achieved_tflops': flops / median_s / 1e12 if flops else None,
      'peak_bytes_in_use': _peak_bytes_in_use(),
      'memory_analysis': memory,
      'lower_s': lower_s,
      'compile_s': compile_s,
  }


def _image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of the config's stored images, without loading the dataset where avoidable."""
  if config.dataset in datasets.STANDIN_SHAPES:
    height, width, channels, _ = datasets.STANDIN_SHAPES[config.dataset]
  else:
    data = datasets.load_dataset(config.dataset, data_dir=config.data.data_dir,
                                 source=config.data.source)
    if data.train_images.ndim != 4:
      raise ConfigError(f'--augment_only needs an image dataset; {config.dataset} is not one.')
    height, width, channels = data.train_images.shape[1:]
  if config.data.image_size:
    height = width = int(config.data.image_size)
  return int(height), int(width), int(channels)


def bench_augment(config, *, steps: int = 10, warmup: int = 2,
                  name: str = '') -> dict[str, Any]:
  """Times the MPL strong view of one unlabeled batch; returns the JSON-able record."""
  _check_counts(steps, warmup)
  aug = config.augment
  if aug.strong == 'none':
    raise ConfigError('config.augment.strong is "none": there is no strong view to time.')
  config_lib.validate(config, jax.device_count())
  batch = int(config.batch_size * config.mu)
  if batch < 1:
    raise ConfigError('--augment_only times batch_size * mu images; config.mu is 0.')
  shape = _image_shape(config)
  mesh = sharding.make_mesh(config)
  images = np.random.default_rng(0).integers(0, 256, (batch,) + shape, dtype=np.uint8)
  with jax.set_mesh(mesh):
    images = jax.device_put(jnp.asarray(images), sharding.batch_sharding(mesh))

    @jax.jit
    def strong(key, x):
      return augment.strong_view(key, x, variant=aug.strong, magnitude=aug.magnitude,
                                 num_layers=aug.num_layers, cutout_size=aug.cutout_size,
                                 pad=aug.pad, pad_mode=aug.pad_mode)

    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    compiled = strong.lower(key, images).compile()
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
      out = compiled(jax.random.fold_in(key, i), images)
    if warmup:
      out.block_until_ready()
    times = []
    for i in range(steps):
      t0 = time.perf_counter()
      out = compiled(jax.random.fold_in(key, warmup + i), images)
      out.block_until_ready()
      times.append(time.perf_counter() - t0)
  ms = _summary(times)
  return {
      'mode': 'augment_only',
      'config': name,
      'dataset': config.dataset,
      'variant': aug.strong,
      'magnitude': float(aug.magnitude),
      'num_layers': int(aug.num_layers),
      'cutout_size': int(aug.cutout_size),
      'image_shape': list(shape),
      'batch': batch,
      **_device_info(mesh),
      'steps': steps,
      'warmup': warmup,
      'timing': 'per call, each ended by block_until_ready; after compile and warm-up',
      'batch_ms_mean': ms['mean'],
      'batch_ms_median': ms['median'],
      'batch_ms_min': ms['min'],
      'batch_ms_max': ms['max'],
      'images_per_s': batch / (ms['median'] / 1e3),
      'compile_s': compile_s,
  }


def _config_name() -> str:
  """'configs/x.py:args' as given on the command line (the flag keeps only the path)."""
  for i, arg in enumerate(sys.argv):
    if arg == '--config' and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return config_flags.get_config_filename(FLAGS['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    if FLAGS.augment_only:
      result = bench_augment(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                             name=_config_name())
    else:
      result = bench_train_step(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                                name=_config_name(), workdir=FLAGS.workdir)
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result), flush=True)


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so that importing this module
  (tests, notebooks) never clashes with mpl.main's flags of the same names."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:args]).',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 10, 'Timed steps (after the warm-up).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_bool('augment_only', False,
                    'Time only the strong augmentation of the unlabeled batch.')
  flags.DEFINE_string('workdir', None, 'Where train.build writes the labeled split; default: a '
                      'temporary directory, removed afterwards.')
  flags.mark_flags_as_required(['config'])


def parse_flags(argv):
  """absl flag parsing; a config mistake is reported as one line (as mpl.main does)."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    from mpl import config_lib  # pylint: disable=g-import-not-at-top
    message = config_lib.flag_error_message(e)
  print(f'error: {message}\nUsage: python -m mpl.bench --config configs/<file>.py[:args] '
        f'[--steps N] [--warmup N] [--augment_only] [--config.key=value ...]', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
