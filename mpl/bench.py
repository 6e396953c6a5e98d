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
blocking every step forgoes the overlap of the next step's dispatch with this step's compute.
`step_ms_back_to_back` is that overlap kept, as the training loop runs: --steps more steps
dispatched one after the other, one wait at the end, the total divided by --steps (the two
differ by the host's dispatch time, which matters only for steps of a few milliseconds).
`images_per_s` = (labeled + unlabeled images per step) / median step time; each unlabeled image
gets a weak and a strong view, counted once.

FLOPs: `flops_per_step` is the whole step's count as written (`flops_counted_on` 'program'): XLA's
HLO cost analysis, run by the CPU backend on any machine, of the lowered program before SPMD
partitioning and the backend's passes, so the same on every accelerator; `achieved_tflops` =
flops_per_step / median step time, for the whole mesh. The compiled program's own count
(`flops_per_step_compiled` = one device's partition, `flops_per_step_per_device`, times the
devices; it counts work every device repeats, such as the update of replicated weights, once per
device, and includes rematerialisation and the partitioner's overhead) is the fallback
(`flops_counted_on` 'compiled') and a cross-check: on a GPU it leaves out the convolutions and
dots (cuDNN / cuBLAS custom calls by then) and is far too low. XLA's cost analysis counts the
body of a loop (`lax.scan`, e.g. RandAugment's layers) once. The networks have no loops, so at
most the augmentation is undercounted, which is small next to the convolutions, except an
EfficientNet with `scan_blocks=True` (the L2 config): each stage's scanned blocks count as one,
and the figure is a lower bound (`--config.model.scan_blocks=False` counts them all).
Memory: `memory_analysis` (per device: temporaries, arguments, outputs, aliased = donated) and the
first local device's `memory_stats()['peak_bytes_in_use']`, the process's peak up to the end of
the timed steps (the resident dataset and compilation's scratch included; null where the backend
has no allocator statistics, e.g. CPU).

--profile DIR: then runs --profile_steps (3) more steps under the profiler, keeps the trace in
DIR, and reports where the step's time goes (record key 'profile'; tables on stderr and in
DIR/profile.txt): per kind of op (convolution, elementwise, ...), per stage of the update (MPL's
named scopes: views, teacher_forward, student_step, ...), the heaviest ops. mpl/step_profile.py
says how to read it. On a GPU the traced program is the same step compiled with XLA's command
buffers off (record key profile.compiler_options): inside a CUDA graph the profiler cannot tell
the ops apart.
  python -m mpl.bench --config configs/cifar10_4k_mpl.py --config.data.standin=if_missing \
      --config.model.dtype=bfloat16 --profile /tmp/profile_bf16

--augment_only: times just the MPL strong view (`mpl.methods.base.strong_view`, called as the MPL
method calls it, with the config's augment settings) on batch_size * mu random uint8 images of
the config's image shape, sharded over the mesh's 'data' axis like a training batch.

--dry_run --mesh MODEL (or DATAxMODEL): memory planning without the hardware. Creates
DATA x MODEL fake CPU devices, builds a ('data', 'model') mesh of that shape, and lowers and
compiles the config's train step on abstract inputs (nothing is allocated, no data is read).
The global batch is scaled to DATA of the config's `mesh.data` replicas (override with
--data_replicas), so each device sees the batch it would see in the real run: per-device memory
of one model-parallel replica is that of the whole pod (data parallelism adds only the gradient
all-reduce). Prints per-device bytes of parameters, optimizer states, EMA, batch statistics,
method state, the batch, the resident data (an in-memory dataset's training set, replicated on
every device, and its share of the test set; 0 when streamed), and XLA's temporaries
(activations kept for the backward pass and scratch), their sum, and which accelerators that
fits (HBM per device, 10 % headroom). The state, batch and resident-data bytes are exact. The
temporaries come from the CPU compiler's buffer assignment, which fuses less than the TPU/GPU
compilers and may compute bfloat16 convolutions in float32: read them as an upper estimate
(the GPU figure of the same step is `memory_analysis.temp_bytes` of the timed bench).
  python -m mpl.bench --config configs/efficientnet_l2_mpl.py:standin --dry_run --mesh 16
--tpu v2|v3|v4|v5e|v5p|v6e: compile with libtpu's TPU compiler instead, for the devices of the
smallest slice of that generation with DATA x MODEL devices, ahead of time on this machine (no
TPU needed; MaxText's train_compile does the same): the temporaries are then the TPU compiler's
own. `fits` is then for that generation only: when the program cannot fit in its HBM the
compiler refuses it and reports the memory it needs, which is printed (`compiler_out_of_memory`,
`fits` false) instead of an error; when it compiles, `fits` is the same 10 % headroom test as
above (a program that compiles with less headroom than that says false). Needs the libtpu that
matches the installed JAX (`pip install "jax[tpu]==<jax version>"`; not in requirements.txt,
200 MB):
  python -m mpl.bench --config configs/efficientnet_l2_mpl.py:standin --dry_run --mesh 16 --tpu v3
`--nocompile` skips the compilation (minutes for EfficientNet-L2 on CPU) and reports the exact
state and batch bytes only.

Speed and memory targets belong here (and in launch/ scripts), not in timed tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app, flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from mpl import config_lib, methods, models, sharding, step_profile, train
from mpl.data import datasets
from mpl.methods import base
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


def _program_flops(lowered) -> float | None:
  """FLOPs of the whole step as written: XLA's HLO cost analysis, run by the CPU backend, of
  the lowered program (every device's share, before SPMD partitioning and before the backend's
  passes). This count does not depend on the accelerator: after GPU compilation convolutions
  and dots are cuDNN / cuBLAS custom calls, which the compiled program's cost analysis counts
  as nothing (jax-ml/jax#16008), and the CUDA plugin has no `Lowered.cost_analysis`. A
  `shard_map` body (the augmentation's, `augment._per_device`) is in the program at one
  device's shapes and counts once, not once per device: on a multi-device mesh the count
  leaves out all but one device's augmentation (small next to the networks).
  None if neither the CPU count nor the backend's own works."""
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    module = lowered.compiler_ir('hlo').as_hlo_module()
    cpu = jax.local_devices(backend='cpu')[0].client
    return _total_flops(_jax.hlo_module_cost_analysis(cpu, module))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('FLOPs: no CPU count of the program (%s: %s); the backend\'s count is '
                    'used (on a GPU it leaves out convolutions and dots: see flops_counted_on).',
                    type(e).__name__, e)
  try:
    return _total_flops(lowered.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    return None


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


def _program_to_profile(lowered, compiled, mesh) -> tuple[Any, dict[str, str]]:
  """The step a profile traces, and the XLA options it was compiled with.

  On a GPU, the same lowered step compiled with command buffers off (the profiler cannot see
  the ops inside one: mpl/step_profile.py); elsewhere the timed program itself. Should this
  XLA refuse the options, the timed program is traced (with a warning), not nothing.
  """
  platform = mesh.devices.flat[0].platform
  options = step_profile.PROFILE_COMPILER_OPTIONS.get(platform, {})
  if not options:
    return compiled, {}
  try:
    return lowered.compile(compiler_options=options), options
  except Exception as e:  # pylint: disable=broad-except  # XLA's error types vary by version
    logging.warning('profiling the timed program: compiling with %s failed (%s)', options, e)
    return compiled, {}


def _profile(lowered, compiled, mesh, state, next_input, *, profile_dir: str,
             profile_steps: int) -> dict[str, Any]:
  """`step_profile.profile_steps` of the step; the summary, with the state after it ('state').

  A profile that fails (a tracer or trace format this code does not know) must not cost the
  timed figures: its summary is then {'error': ...}.
  """
  try:
    profiled, options = _program_to_profile(lowered, compiled, mesh)

    def run_step():
      nonlocal state
      state, step_metrics = profiled(state, jax.block_until_ready(next_input()))
      jax.block_until_ready((state, step_metrics))
    if profiled is not compiled:
      run_step()   # its first run is a warm-up, not traced
    summary = step_profile.profile_steps(run_step, steps=profile_steps, trace_dir=profile_dir,
                                         hlo_text=profiled.as_text(), compiler_options=options)
  except Exception as e:  # pylint: disable=broad-except
    logging.exception('the profile failed; the timed figures stand')
    summary = {'error': f'{type(e).__name__}: {e}'}
  return {**summary, 'state': state}


def _check_counts(steps: int, warmup: int) -> None:
  if steps < 1 or warmup < 0:
    raise ConfigError(f'--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}.')


def bench_train_step(config, *, steps: int = 10, warmup: int = 2, name: str = '',
                     workdir: str | None = None, profile_dir: str | None = None,
                     profile_steps: int = 3) -> dict[str, Any]:
  """Compiles and times `config`'s train step; returns the JSON-able record (module doc).

  With `profile_dir`, `profile_steps` more steps then run under the profiler
  (`mpl.step_profile`): the record's 'profile' says where the step's time goes.
  """
  _check_counts(steps, warmup)
  if profile_dir is not None and profile_steps < 1:
    raise ConfigError(f'--profile_steps must be >= 1, got {profile_steps}.')
  with contextlib.ExitStack() as cleanup:
    if workdir is None:
      workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix='mpl_bench_'))
    experiment = train.build(config, workdir)
    method, stream = experiment.method, experiment.stream
    unlabeled = config.batch_size * config.mu if method.uses_unlabeled else 0
    with experiment.activate():
      if stream is not None:  # a streamed dataset: one global batch a step, read before its
        stream.start(0)       # step is timed (the input pipeline is not what is measured)
        next_input = stream.next_batch
      else:  # in memory: the step slices its batch from the device-resident arrays
        next_input = lambda: experiment.arrays
      state = experiment.init_state(jax.random.PRNGKey(config.seed))
      jax.block_until_ready(state)
      batch = next_input()
      image_shape = (batch['labeled']['image'].shape[1:] if stream is not None
                     else experiment.data.train_images.shape[1:])
      phase = method.phase(0)  # the state is step 0's: its phase's update is timed
      t0 = time.perf_counter()
      lowered = experiment.train_step_for(0).lower(state, batch)
      lower_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      compiled = lowered.compile()
      compile_s = time.perf_counter() - t0
      flops_per_device = _total_flops(compiled.cost_analysis())
      flops_program = _program_flops(lowered)
      memory = _memory_analysis(compiled)

      for _ in range(warmup):
        state, metrics = compiled(state, next_input())   # the old state is donated: re-bind it
      jax.block_until_ready(state)
      times = []
      for _ in range(steps):
        batch = jax.block_until_ready(next_input())
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
      # As training runs: each step dispatched while the previous one computes, one wait at
      # the end (the loop reads metrics a step late). One batch for all: a streamed input's
      # pipeline is not what is timed.
      batch = jax.block_until_ready(next_input())
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      back_to_back_s = (time.perf_counter() - t0) / steps
      peak_bytes = _peak_bytes_in_use()   # before the profile compiles a second program
      profile = None
      if profile_dir is not None:   # after the timing: tracing slows the steps it records
        profile = _profile(lowered, compiled, experiment.mesh, state, next_input,
                           profile_dir=profile_dir, profile_steps=profile_steps)
        state = profile.pop('state')
      step = int(jax.device_get(state.step))

  step_ms = _summary(times)
  median_s = step_ms['median'] / 1e3
  num_devices = int(experiment.mesh.size)
  flops_compiled = flops_per_device * num_devices if flops_per_device else None
  flops = flops_program or flops_compiled
  return {
      'mode': 'train_step',
      'config': name,
      'method': config.method,
      'dataset': config.dataset,
      'model': config.model.name,
      'dtype': str(config.model.get('dtype') or 'float32'),
      # MPL's h passes (mpl.h_dtype, used under h_pass 'paired'): full float32 passes cost time
      'h_dtype': config[config.method].get('h_dtype') if config.method in (
          'mpl', 'reduced_mpl') and config[config.method].h_pass == 'paired' else None,
      'image_shape': list(image_shape),
      'phase': phase,   # None: the method has one update; else the one of step 0 was timed
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
      # `steps` more steps dispatched back to back, as the training loop runs them
      'step_ms_back_to_back': 1e3 * back_to_back_s,
      'images_per_s': (config.batch_size + unlabeled) / median_s,
      'flops_per_step': flops,
      'flops_counted_on': 'program' if flops_program else 'compiled',
      'flops_per_step_compiled': flops_compiled,
      'flops_per_step_per_device': flops_per_device,
      'achieved_tflops': flops / median_s / 1e12 if flops else None,
      # None: XLA's default (on GPUs, TF32 for float32 convolutions and dots)
      'default_matmul_precision': (str(jax.config.jax_default_matmul_precision)
                                   if jax.config.jax_default_matmul_precision else None),
      'peak_bytes_in_use': peak_bytes,
      'memory_analysis': memory,
      'lower_s': lower_s,
      'compile_s': compile_s,
      'profile': profile,
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
      # The whole strong view from raw images: flip and crop, RandAugment, Cutout (and the
      # second jitter with augment.jitter_after). With augment.strong_from_weak the train step
      # shares the first flip and crop with the weak view.
      return base.strong_view(config, key, x)

    key = jax.random.key(config.seed)
    t0 = time.perf_counter()
    compiled = strong.lower(key, images).compile()
    compile_s = time.perf_counter() - t0
    keys = jax.block_until_ready(list(jax.random.split(key, warmup + steps)))  # not timed
    for i in range(warmup):
      out = compiled(keys[i], images)
    if warmup:
      out.block_until_ready()
    times = []
    for i in range(steps):
      t0 = time.perf_counter()
      out = compiled(keys[warmup + i], images)
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


# TPU generations `--dry_run --tpu` compiles for: (topology-name prefix, chip config, HBM GiB per
# JAX device). v2/v3 chips show each of their 2 cores as a device; v4/v5p run as one megacore
# device per chip; v5e/v6e chips have one core.
TPU_GENERATIONS = {
    'v2': ('v2', 'default', 8), 'v3': ('v3', 'default', 16), 'v4': ('v4', 'megacore', 32),
    'v5e': ('v5e', 'default', 16), 'v5p': ('v5p', 'megacore', 95), 'v6e': ('v6e', 'default', 32),
}
# Slice shapes (in chips) tried in order for the smallest slice with enough devices. libtpu's
# default host is 2x2x1 chips, so the smallest slice is 2x2.
_TPU_2D_SHAPES = ('2x2', '2x4', '4x4', '4x8', '8x8', '8x16', '16x16', '16x32', '32x32')
_TPU_3D_SHAPES = ('2x2x1', '2x2x2', '2x2x4', '2x4x4', '4x4x4', '4x4x8', '4x8x8', '8x8x8',
                  '8x8x16', '8x16x16', '16x16x16')


def _tpu_label(generation: str) -> str:
  return f'TPU {generation} ({TPU_GENERATIONS[generation][2]} GiB per device)'


# HBM per JAX device (GiB): the TPUs above, then GPUs.
ACCELERATOR_MEMORY_GIB = {
    **{_tpu_label(g): hbm for g, (_, _, hbm) in TPU_GENERATIONS.items()},
    'A100 40GB': 40, 'A100 80GB': 80, 'H100 80GB': 80, 'H200': 141,
}


def parse_mesh(text: str) -> tuple[int, int]:
  """'16' -> (1, 16) (one data replica, model axis 16); '4x16' -> (4, 16)."""
  parts = text.lower().split('x')
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if len(sizes) not in (1, 2) or min(sizes) < 1:
    raise ConfigError(f'--mesh must be MODEL or DATAxMODEL with positive sizes, got {text!r}.')
  return (1, sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])


def use_fake_cpu_devices(count: int) -> None:
  """Makes JAX start with `count` CPU devices; must run before the backend initialises."""
  flags_now = os.environ.get('XLA_FLAGS', '')
  # No LLVM optimisation: the program is compiled for its buffer sizes, never run.
  os.environ['XLA_FLAGS'] = (flags_now + f' --xla_force_host_platform_device_count={count}'
                             ' --xla_backend_optimization_level=0')
  jax.config.update('jax_platforms', 'cpu')


def tpu_devices(generation: str, count: int) -> list[Any]:
  """The first `count` devices of the smallest `generation` TPU slice that has that many.

  Abstract devices of a topology description, for ahead-of-time compilation with libtpu's
  compiler on a machine without TPUs (as MaxText's train_compile does); nothing runs on them.
  """
  config_lib.check_choice('--tpu', generation, tuple(TPU_GENERATIONS))
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError(f'--tpu compiles with libtpu, which is not installed. Install the one '
                      f'that matches this JAX (no TPU needed): '
                      f'pip install "jax[tpu]=={jax.__version__}"')
  # Nothing runs on a TPU here, so several compiles may share libtpu at once (by default a
  # process takes an exclusive lock on it).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  prefix, chip_config, _ = TPU_GENERATIONS[generation]
  shapes = _TPU_3D_SHAPES if chip_config == 'megacore' else _TPU_2D_SHAPES
  for shape in shapes:
    topology = topologies.get_topology_desc(platform='tpu', topology_name=f'{prefix}:{shape}',
                                            chip_config_name=chip_config)
    if len(topology.devices) >= count:
      return list(topology.devices)[:count]
  raise ConfigError(f'no {generation} slice of up to {shapes[-1]} chips has {count} devices.')


_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
# How libtpu words "does not fit", e.g. "... required for HLO temporaries (118.67G) exceeds
# available HBM (15.48G)" or "Used 20.1G of 15.48G hbm": the first size is what it needs.
_TPU_OOM_SIZES = (r'HLO temporaries \(([\d.]+)([KMGT]?)\)', r'Used ([\d.]+)([KMGT]?) of')


def _hbm_shortfall(message: str) -> dict[str, Any] | None:
  """The TPU compiler's refusal of a program that does not fit its HBM ('RESOURCE_EXHAUSTED:
  Ran out of memory ... HLO temporaries (118.67G) exceeds available HBM (15.48G)', or '... Used
  20.1G of 15.48G hbm ...') as {'temp_bytes', 'message'} (temp_bytes None when no size can be
  read); None for any other error."""
  if 'RESOURCE_EXHAUSTED' not in message or 'hbm' not in message.lower():
    return None
  line = next((l for l in message.splitlines() if 'RESOURCE_EXHAUSTED' in l), message)
  for pattern in _TPU_OOM_SIZES:
    found = re.search(pattern, message)
    if found:
      return {'temp_bytes': int(float(found.group(1)) * _UNITS[found.group(2)]),
              'message': line.strip()}
  return {'temp_bytes': None, 'message': line.strip()}


def _input_info(config) -> tuple[tuple[int, ...], Any, int, bool]:
  """(example shape, dtype, num_classes, is_image) of the config's data.

  Datasets with stand-in shapes (the image datasets users bring) are not read at all; the small
  built-in ones (two_moons, digits, fashion_mnist) are loaded for their shapes.
  """
  if config.dataset in datasets.STANDIN_SHAPES:
    num_classes = datasets.STANDIN_SHAPES[config.dataset][3]
    return _image_shape(config), jnp.uint8, int(num_classes), True
  data = datasets.load_dataset(config.dataset, data_dir=config.data.data_dir,
                               source=config.data.source)
  is_image = data.train_images.ndim == 4
  shape = _image_shape(config) if is_image else data.train_images.shape[1:]
  return tuple(shape), data.train_images.dtype, int(data.num_classes), is_image


def _resident_data_bytes(config, shape, dtype, replicas: int, eval_batch_size: int) -> int:
  """Per-device bytes of the data a real run keeps on the devices between steps.

  In-memory datasets: the whole training set with its labels and the labeled/unlabeled index
  lists, replicated on every device (the step slices its batches there), plus the test set padded
  to whole evaluation batches and sharded over the real run's `replicas` data shards. Streamed
  datasets keep only the batch (counted apart), so 0.
  """
  if train.is_streaming(config):
    return 0
  if config.dataset in datasets.SIZES:
    num_train, num_test = datasets.SIZES[config.dataset]
  else:
    data = datasets.load_dataset(config.dataset, data_dir=config.data.data_dir,
                                 source=config.data.source)
    num_train, num_test = len(data.train_labels), len(data.test_labels)
  example = int(np.prod(shape)) * np.dtype(dtype).itemsize
  num_labeled = num_train if config.num_labeled == -1 else int(config.num_labeled)
  num_unlabeled = num_train - num_labeled if config.data.exclude_labeled else num_train
  train_bytes = num_train * (example + 4) + 4 * (num_labeled + num_unlabeled)
  num_eval = min(config.data.max_eval_examples or num_test, num_test)
  padded = math.ceil(num_eval / eval_batch_size) * eval_batch_size
  test_bytes = math.ceil(padded * (example + 4 + 4) / replicas)  # images, labels, padding mask
  return train_bytes + test_bytes


def dry_run(config, *, mesh_shape: tuple[int, int], data_replicas: int | None = None,
            name: str = '', compile_step: bool = True, tpu: str = '') -> dict[str, Any]:
  """Compiles `config`'s train step for a (data, model) mesh; per-device memory (module doc).

  With `tpu` (a TPU_GENERATIONS key) the step is compiled by libtpu for that TPU's devices
  instead of fake CPU ones, so the temporaries are the TPU compiler's own.
  """
  data, model = mesh_shape
  if tpu:
    devices = tpu_devices(tpu, data * model)
  else:
    devices = jax.devices()
    if len(devices) < data * model:
      raise ConfigError(f'--dry_run needs {data * model} devices but JAX has {len(devices)}; '
                        f'run it as `python -m mpl.bench ... --dry_run`, which creates fake ones.')
  devices = devices[:data * model]
  replicas = data_replicas or (config.mesh.data if config.mesh.data > 0 else data)
  config = config.copy_and_resolve_references()
  eval_batch_size = int(config.eval_batch_size)  # the real run's; the compiled step needs none
  with config.unlocked():
    global_batch = int(config.batch_size)
    if (global_batch * data) % replicas:
      raise ConfigError(f'batch_size {global_batch} does not split over {replicas} replicas.')
    config.batch_size = global_batch * data // replicas
    config.mesh.data, config.mesh.model = data, model
    config.eval_batch_size = data
    config.finetune.steps = 0
  config_lib.validate(config, len(devices))

  shape, dtype, num_classes, is_image = _input_info(config)
  resident_bytes = _resident_data_bytes(config, shape, dtype, replicas, eval_batch_size)
  mesh, rules = sharding.make_mesh(config, devices), sharding.logical_rules(config)
  method_class = methods.get_method(config.method)
  channels = shape[-1] if is_image else 1
  info = base.DataInfo(num_classes=num_classes, mean=(0.5,) * channels, std=(0.25,) * channels,
                       is_image=is_image)
  method = method_class(config, models.from_config(config.model, num_classes), info)
  labeled = int(config.batch_size)
  unlabeled = labeled * config.mu if method.uses_unlabeled else 0

  def images(n):
    return jax.ShapeDtypeStruct((n, *shape), dtype)

  def labels(n):
    return jax.ShapeDtypeStruct((n,), jnp.int32)

  # As the in-memory sampler's batches: 'index' is the example's position in the training set.
  batch = {'labeled': {'image': images(labeled), 'label': labels(labeled),
                       'index': labels(labeled)}}
  if unlabeled:
    batch['unlabeled'] = {'image': images(unlabeled), 'label': labels(unlabeled),
                          'index': labels(unlabeled)}

  # Abstract, like everything here: a concrete key would be placed on the mesh's devices, which
  # with --tpu exist only on paper.
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(method.init, key, images(1))
    state_sharding = sharding.state_shardings(abstract_boxed, mesh, rules)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        sharding.strip_boxes(abstract_boxed), state_sharding)
    batch_sharding = sharding.batch_sharding(mesh)
    abstract_batch = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sharding), batch)
    step = jax.jit(method.update, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(abstract_state, abstract_batch)
    compiled, out_of_memory = None, None
    if compile_step:
      try:
        compiled = lowered.compile()
      except jax.errors.JaxRuntimeError as e:
        out_of_memory = _hbm_shortfall(str(e)) if tpu else None
        if out_of_memory is None:
          raise
    compile_s = time.perf_counter() - t0
  memory = (_memory_analysis(compiled) if compiled else None) or {}
  if out_of_memory:  # the TPU compiler refuses a program that cannot fit, and says by how much
    memory = {'temp_bytes': out_of_memory['temp_bytes']}

  state_bytes = {
      field: sharding.bytes_per_device(getattr(abstract_state, field))
      for field in ('params', 'opt_state', 'ema_params', 'batch_stats', 'ema_batch_stats',
                    'method_state')}
  per_device = {**{f'{k}_bytes': v for k, v in state_bytes.items()},
                'batch_bytes': sharding.bytes_per_device(abstract_batch),
                'resident_data_bytes': resident_bytes,
                'temp_bytes': memory.get('temp_bytes'),
                'generated_code_bytes': memory.get('generated_code_bytes')}
  total = sum(v for v in per_device.values() if v)
  if not compiled and not out_of_memory:
    fits = None  # without the temporaries the total is only a lower bound
  else:
    # The TPU compiler's figures hold for its own generation only.
    accelerators = [_tpu_label(tpu)] if tpu else list(ACCELERATOR_MEMORY_GIB)
    fits = {accel: not out_of_memory and total <= 0.9 * ACCELERATOR_MEMORY_GIB[accel] * 2**30
            for accel in accelerators}
  return {
      'mode': 'dry_run',
      'config': name,
      'method': config.method,
      'model': config.model.name,
      'dtype': str(config.model.get('dtype') or 'float32'),
      'input_shape': list(shape),
      'spatial_partition': config.spatial_partition,
      'mesh': {'data': data, 'model': model},
      'compiled_for': devices[0].device_kind if tpu else 'cpu (fake devices)',
      'data_replicas_of_real_run': replicas,
      'batch_per_replica_labeled': labeled,
      'batch_per_replica_unlabeled': unlabeled,
      'parameters': int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))),
      'per_device': per_device,
      'per_device_total_bytes': total,
      'per_device_total_gib': round(total / 2**30, 3),
      'fits': fits,
      'flops_per_step_per_device': _total_flops(compiled.cost_analysis()) if compiled else None,
      'compiler_out_of_memory': out_of_memory and out_of_memory['message'],
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
  try:
    if len(argv) > 1:
      raise ConfigError(f'unexpected arguments {argv[1:]}: every setting is a flag.')
    if FLAGS.dry_run:
      if FLAGS.profile:
        raise ConfigError('--profile times real steps; it does not go with --dry_run.')
      if not FLAGS.mesh:
        raise ConfigError('--dry_run needs --mesh MODEL or DATAxMODEL, e.g. --mesh 16.')
      data, model = parse_mesh(FLAGS.mesh)
      result = dry_run(FLAGS.config, mesh_shape=(data, model), data_replicas=FLAGS.data_replicas,
                       name=_config_name(), compile_step=FLAGS.compile, tpu=FLAGS.tpu or '')
    elif FLAGS.tpu:
      raise ConfigError('--tpu goes with --dry_run (ahead-of-time compilation for a TPU).')
    elif FLAGS.mesh or FLAGS.data_replicas is not None:
      raise ConfigError('--mesh and --data_replicas go with --dry_run; a timed bench runs on '
                        'the mesh of the config (--config.mesh.data / --config.mesh.model).')
    elif FLAGS.profile and FLAGS.augment_only:
      raise ConfigError('--profile profiles the train step; it does not go with --augment_only.')
    elif FLAGS.augment_only:
      result = bench_augment(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                             name=_config_name())
    else:
      result = bench_train_step(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                                name=_config_name(), workdir=FLAGS.workdir,
                                profile_dir=FLAGS.profile, profile_steps=FLAGS.profile_steps)
      if result['profile'] and 'error' not in result['profile']:
        print(step_profile.format_summary(result['profile']), file=sys.stderr)
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  result['argv'] = sys.argv[1:]    # the flags, overrides included: the record says what it ran
  result['jax_version'] = jax.__version__
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
  flags.DEFINE_bool('dry_run', False, 'Compile for fake CPU devices and print per-device '
                    'memory instead of timing (see the module docstring).')
  flags.DEFINE_string('mesh', None, 'With --dry_run: MODEL (one data replica) or DATAxMODEL.')
  flags.DEFINE_string('tpu', None, 'With --dry_run: compile with libtpu for this TPU generation '
                      f'({", ".join(TPU_GENERATIONS)}) instead of fake CPU devices.')
  flags.DEFINE_integer('data_replicas', None, 'With --dry_run: data-parallel replicas of the '
                       "real run (default: the config's mesh.data).")
  flags.DEFINE_bool('compile', True, 'With --dry_run: compile the step (for the temporaries); '
                    '--nocompile reports the exact state and batch bytes in seconds.')
  flags.DEFINE_string('profile', None, 'Train step only: after the timed steps, profile '
                      '--profile_steps more into this folder and report where the time goes '
                      '(mpl/step_profile.py; tables on stderr and in DIR/profile.txt).')
  flags.DEFINE_integer('profile_steps', 3, 'Steps traced by --profile.')
  flags.DEFINE_string('workdir', None, 'Where train.build writes the labeled split; default: a '
                      'temporary directory, removed afterwards.')
  flags.mark_flags_as_required(['config'])


def parse_flags(argv):
  """absl flag parsing; a config mistake is reported as one line (as mpl.main does)."""
  return config_lib.parse_flags_or_exit(
      argv, 'python -m mpl.bench --config configs/<file>.py[:args] [--steps N] [--warmup N] '
      '[--profile DIR [--profile_steps N] | --augment_only | '
      '--dry_run --mesh [DATAx]MODEL [--tpu v3|v4|...] [--nocompile]] '
      '[--config.key=value ...]')


def _fake_devices_for_dry_run(argv) -> None:
  """Before JAX starts: `--dry_run --mesh D x M` needs D * M (fake CPU) devices."""
  if not any(a == '--dry_run' or a.startswith('--dry_run=') and a.split('=', 1)[1].lower()
             in ('true', '1', 'yes') for a in argv):
    return
  mesh = next((a.split('=', 1)[1] for a in argv if a.startswith('--mesh=')), None)
  if mesh is None and '--mesh' in argv and argv.index('--mesh') + 1 < len(argv):
    mesh = argv[argv.index('--mesh') + 1]
  try:
    data, model = parse_mesh(mesh) if mesh else (1, 1)
  except ConfigError:
    return  # reported after flag parsing
  if mesh:
    use_fake_cpu_devices(data * model)


if __name__ == '__main__':
  _fake_devices_for_dry_run(sys.argv)
  define_flags()
  app.run(main, flags_parser=parse_flags)
