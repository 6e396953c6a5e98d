"""The training loop shared by every method.

  config -> validate -> mesh -> data (device-resident) -> model -> method
  -> state created already sharded (or restored from the latest checkpoint in the workdir)
  -> jitted steps (batch sampled on the device) -> periodic eval / checkpoint / logs
  -> WORKDIR/summary.json and WORKDIR/curves.png (redrawn during long runs)

Small datasets live in device memory; each step draws its batch there from per-epoch
permutations keyed by (seed, epoch), so the batch at step t is a pure function of t: a resumed
run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from mpl import config_lib, methods, models, reporting, sharding
from mpl.data import datasets, split, streaming
from mpl.errors import (ConfigError, DataError, DataMissingError, NonFiniteLossError,
                        WorkdirInUseError)
from mpl.methods import base

# --------------------------------------------------------------------------------------------
# Data on the device.


def is_streaming(config) -> bool:
  return bool(config.data.streaming) or config.dataset in datasets.STREAMING_DATASETS


def load_data(config, workdir):
  """Loads the in-memory dataset and the labeled/unlabeled split (saved in the workdir).

  Returns (data, labeled, unlabeled, save_split). A new split is written by `save_split()`, which
  `build` calls once the method and model are built: a config that fails there leaves no split
  behind to refuse its corrected rerun.
  """
  data = datasets.load_from_config(config, any_host=any_process)
  num_train = len(data.train_labels)
  num_labeled = num_train if config.num_labeled == -1 else int(config.num_labeled)
  if num_labeled > num_train:
    raise ConfigError(
        f'num_labeled={num_labeled} exceeds the {num_train} training examples of {data.name}; '
        f'use at most {num_train} (or -1 for all)'
        + (': the stand-in set is small, for smoke tests.' if 'stand-in' in data.name else '.'))
  meta = {'dataset': config.dataset, 'num_labeled': num_labeled, 'seed': config.data.seed}
  saved = split.load_split(workdir)
  different = saved is not None and {k: saved[1].get(k) for k in meta} != meta
  if different and latest_checkpoint_step(workdir) is None:
    # No checkpoint trained on it (the run failed or was killed before its first one): the
    # corrected command takes a new split rather than being locked out of its workdir.
    logging.warning('%s/%s was made for %s; no checkpoint uses it, so this run replaces it.',
                    workdir, split.SPLIT_FILENAME, {k: saved[1].get(k) for k in meta})
    if jax.process_index() == 0:
      (epath.Path(workdir) / split.SPLIT_FILENAME).unlink()
    saved = None
  if saved is not None:
    labeled = saved[0]
    for key, value in meta.items():
      if saved[1].get(key) != value:
        raise ConfigError(
            f'{workdir}/labeled_split.json was made for {key}={saved[1].get(key)!r}, this run '
            f'asks for {key}={value!r}. Use a new --workdir (or delete the old one).')
    split.check_fits(labeled, saved[1], data.train_labels,
                     str(epath.Path(workdir) / split.SPLIT_FILENAME))
    save_split = lambda: None
  else:
    labeled = split.labeled_indices(data.train_labels, num_labeled, data.num_classes,
                                    seed=config.data.seed)

    def save_split():
      if jax.process_index() == 0:
        split.save_split(workdir, labeled, meta, labels=data.train_labels)
  unlabeled = split.unlabeled_indices(num_train, labeled, config.data.exclude_labeled)
  return data, labeled, unlabeled, save_split


def epoch_stream_indices(key, step, batch_size: int, pool_size: int):
  """Indices (into a pool of `pool_size`) of batch `step` of a stream of epoch permutations.

  Position p = step * batch_size + j lies in epoch p // pool_size, whose order is
  permutation(fold_in(key, epoch)). Batches may span epochs, and may be larger than the pool.
  step * batch_size is never formed (step = q * pool + r): int32 needs pool_size * batch_size
  below 2**31 (checked when the experiment is built) and the epoch number, about
  step * batch_size / pool_size, too (a 6-example pool at batch 64 wraps after 2e8 steps).
  """
  q, r = step // pool_size, step % pool_size
  first_epoch = q * batch_size + (r * batch_size) // pool_size
  within = (r * batch_size) % pool_size + jnp.arange(batch_size)  # from first_epoch's start
  epochs_spanned = batch_size // pool_size + 2  # static upper bound
  keys = jax.vmap(lambda e: jax.random.fold_in(key, e))(first_epoch + jnp.arange(epochs_spanned))
  perms = jax.vmap(lambda k: jax.random.permutation(k, pool_size))(keys)
  return perms[within // pool_size, within % pool_size]


def sample_batch(arrays, step, key, batch_size: int, unlabeled_batch_size: int):
  """The batch of `step`, gathered from the device-resident training set."""
  labeled_key, unlabeled_key = jax.random.split(key)
  pick = arrays['labeled_idx'][epoch_stream_indices(
      labeled_key, step, batch_size, arrays['labeled_idx'].shape[0])]
  # 'index' (position in the training set) lets methods look up per-example state.
  batch = {'labeled': {'image': arrays['images'][pick], 'label': arrays['labels'][pick],
                       'index': pick}}
  if unlabeled_batch_size:
    pick_u = arrays['unlabeled_idx'][epoch_stream_indices(
        unlabeled_key, step, unlabeled_batch_size, arrays['unlabeled_idx'].shape[0])]
    # The label is for monitoring (pseudo-label accuracy) only; methods never train on it.
    batch['unlabeled'] = {'image': arrays['images'][pick_u], 'label': arrays['labels'][pick_u],
                          'index': pick_u}
  return batch


# --------------------------------------------------------------------------------------------
# Evaluation.


def make_eval_set(images, labels, eval_batch_size: int, mesh):
  """Test set padded to whole batches, shaped (num_batches, batch, ...), batch on 'data'."""
  n = len(labels)
  num_batches = math.ceil(n / eval_batch_size)
  pad = num_batches * eval_batch_size - n
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
  shape = lambda x: x.reshape((num_batches, eval_batch_size) + x.shape[1:])
  out = NamedSharding(mesh, P(None, 'data'))
  return tuple(jax.device_put(shape(x), out) for x in (images, labels, mask))


def make_evaluate(method: base.Method):
  """jit(variables, eval set) -> {'accuracy', 'top5'}: one scan over the whole test set."""

  def evaluate(variables, images, labels, mask, which):
    def body(totals, batch):
      x, y, m = batch
      logits = method.predict(variables, x, which)
      correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
      k = min(5, logits.shape[-1])
      top_k = jnp.any(jax.lax.top_k(logits, k)[1] == y[:, None], axis=-1).astype(jnp.float32)
      return totals + jnp.stack([jnp.sum(correct * m), jnp.sum(top_k * m)]), None

    totals, _ = jax.lax.scan(body, jnp.zeros(2), (images, labels, mask))
    count = jnp.sum(mask)
    return {'accuracy': totals[0] / count, 'top5': totals[1] / count}

  return jax.jit(evaluate, static_argnames='which')


def make_evaluate_batch(method: base.Method):
  """jit(variables, batch with 'mask') -> sums of correct / top-5 / count, for streamed eval."""

  def evaluate_batch(variables, batch, which):
    logits = method.predict(variables, batch['image'], which)
    y, m = batch['label'], batch['mask'].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    k = min(5, logits.shape[-1])
    top_k = jnp.any(jax.lax.top_k(logits, k)[1] == y[:, None], axis=-1).astype(jnp.float32)
    return jnp.stack([jnp.sum(correct * m), jnp.sum(top_k * m), jnp.sum(m)])

  return jax.jit(evaluate_batch, static_argnames='which')


# --------------------------------------------------------------------------------------------
# Checkpoints and preemption.


workdir_path = config_lib.workdir_path


def _type_handlers():
  """Orbax's standard type handlers, except that one process saves whole array shards.

  Orbax's replica-parallel saving (its default unless JAX_PLATFORMS names a GPU) cuts every
  replicated array into one slice per replica so that many hosts share the writing, and each
  slice is a compiled program. A single process writes every byte anyway, so there the slicing
  is pure overhead (10 of the 60 s of a two-step EfficientNet run on CPU). Orbax's default
  jax.Array handler also keeps an array-metadata store, which only typed PRNG keys need: the
  state holds raw uint32 keys, and `Checkpoints.save` refuses typed ones.
  """
  if not hasattr(ocp.type_handlers, 'supported_types'):  # an Orbax older than the pinned one
    return None                                           # (Orbax's own defaults)
  handlers = [(kind, ocp.type_handlers.get_type_handler(kind))
              for kind in ocp.type_handlers.supported_types()]
  if jax.process_count() == 1:
    handlers = [(kind, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
                 if kind is jax.Array else handler) for kind, handler in handlers]
  return ocp.type_handlers.create_type_handler_registry(*handlers)


class Checkpoints:
  """Orbax CheckpointManager for (state, json metadata) in WORKDIR/checkpoints."""

  def __init__(self, workdir: str, keep: int, read_only: bool = False):
    """read_only: for tools that only inspect a run (launch/h_noise.py): the checkpoints folder
    is not created and Orbax opens it read-only; such a tool never calls `save`."""
    registry = _type_handlers()
    # Read-only, Orbax wants no saving options, and warns that the folder is read-only: the
    # purpose, not news (it printed three warnings at the start of every run with a finetune
    # stage, from check_resumable).
    options = (ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                            save_interval_steps=0) if read_only else
               ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    with reporting.without_log_message('Given directory is read only'):
      self.manager = ocp.CheckpointManager(
          workdir_path(workdir) / 'checkpoints', options=options,
          item_handlers={'state': ocp.PyTreeCheckpointHandler(**(
                             {'type_handler_registry': registry} if registry is not None else {})),
                         'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    typed_keys = [jax.tree_util.keystr(path)
                  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
                  if jax.dtypes.issubdtype(getattr(leaf, 'dtype', bool), jax.dtypes.prng_key)]
    if typed_keys:  # they would restore as raw uint32 data (see _type_handlers)
      raise TypeError(f'typed PRNG keys in the checkpointed state ({", ".join(typed_keys)}): '
                      'store jax.random.key_data(key) or jax.random.PRNGKey keys instead.')
    self.manager.save(step, args=ocp.args.Composite(
        # A copy: Orbax serialises the JSON in the background while the loop appends to meta.
        state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(copy.deepcopy(meta))),
        force=True)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, step: int | None = None, config_changes: str = ''):
    """(state, meta) of checkpoint `step` (default: the latest). Every leaf of `abstract_state`
    needs a sharding (a leaf without one would come back as a NumPy array). `config_changes`
    (how this config differs from the run's) goes into the error when the state does not fit."""
    step = self.manager.latest_step() if step is None else step

    def does_not_fit(why) -> ConfigError:
      changes = f' This config differs from the run\'s: {config_changes}.' if config_changes else ''
      return ConfigError(
          f'the checkpoint at step {step} in {self.manager.directory} does not fit this config '
          f'(a different method, model or dataset?): {why}.{changes} Use a new --workdir.')

    # Compared before restoring: a restore that fails halfway leaves Orbax's other reads to fail
    # when its event loop closes, and the message names one array where several may differ.
    differences = sharding.shape_differences(self.manager.item_metadata(step)['state'],
                                              abstract_state)
    if differences:
      raise does_not_fit(differences)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract_state,
              restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise does_not_fit(e) from e
    return restored.state, restored.meta

  def restore_numpy(self, step: int | None = None) -> dict:
    """The state of checkpoint `step` (default: the latest) as saved, in nested dicts of NumPy
    arrays: for tests and tools that have no config or mesh to build an abstract state from."""
    step = self.manager.latest_step() if step is None else step
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            self.manager.item_metadata(step)['state'])
    return self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy))).state

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class PreemptionFlag:
  """Set by SIGTERM (a preempted TPU VM / a SLURM time limit) or SIGINT (Ctrl-C): the loop
  saves a checkpoint at the end of the step and exits cleanly; the same command resumes (a signal
  while the run is still being built takes effect after its first step). After Ctrl-C,
  `train_and_evaluate` then raises KeyboardInterrupt, so that callers stop too. A second signal
  exits at once. (Ctrl-C used to raise KeyboardInterrupt wherever the loop was, e.g. in
  the middle of a checkpoint save, whose Orbax threads then kept the process from exiting.)"""

  SIGNALS = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C (SIGINT)'}

  def __init__(self):
    self.requested = False
    self.signal = None  # the first signal received
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    del frame
    name = self.SIGNALS.get(signum, str(signum))
    if self.requested:  # a second one: stop now (the first may wait on a long compile)
      logging.warning('Second signal (%s): exiting without a checkpoint.', name)
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    logging.warning('%s received: saving a checkpoint and stopping after this step (a second '
                    'signal exits at once).', name)
    self.requested = True
    self.signal = signum

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def check_workdir(workdir: str) -> None:
  """ConfigError unless the (local) workdir is, or can be made, a writable directory."""
  if not workdir:
    raise ConfigError('--workdir is empty: name a directory for the run, e.g. --workdir runs/x.')
  if '://' in workdir:  # object stores report their own errors
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is a file, not a directory: choose another path.')
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):  # writable (permissions, read-only mounts)
      pass
  except OSError as e:
    raise ConfigError(f'cannot write in --workdir {workdir}: {e.strerror or e}. Choose a '
                      f'directory this user can write to.') from e


def check_workdir_shared(workdir: str) -> None:
  """Multi-host runs: ConfigError on every host unless every host sees the lead's workdir.

  The hosts decide from the files there whether to resume, and save each checkpoint together,
  so the workdir must be one folder they all see (gs://..., NFS). On each VM's own disk
  (`--workdir /tmp/run` on every worker) they would decide differently after a restart and
  wait forever in their first collective, or save a checkpoint in pieces no host can restore.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  token = int(multihost_utils.broadcast_one_to_all(
      np.int32(np.random.default_rng().integers(2**31 - 1))))  # the lead's, on every host
  marker = workdir_path(workdir) / f'.hosts_see_this_workdir_{token}'
  if jax.process_index() == 0:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text('')
  multihost_utils.sync_global_devices('mpl: workdir marker written')
  not_seen = any_process(not marker.exists())  # every host has looked once this returns
  if jax.process_index() == 0:
    marker.unlink(missing_ok=True)
  if not_seen:
    raise ConfigError(
        f'--workdir {workdir}: some hosts do not see the folder the lead host (process 0) '
        f'writes there: a multi-host run needs one workdir every host reads and writes, e.g. '
        f'gs://BUCKET/run or a shared NFS path, not a path on each VM\'s own disk.')


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds WORKDIR/.lock while a run trains there: the same command started again while the
  first still runs (a second terminal, a forgotten nohup job) stops at once with a clear error,
  on every host, instead of both writing the same checkpoints. The lead process locks; a remote
  workdir (gs://...) cannot be locked, nor one on a filesystem without flock (a warning says so).
  """
  lock, holder = None, None
  if jax.process_index() == 0 and '://' not in workdir:
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, '.lock'), 'a+')
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):  # EAGAIN / EACCES: held by another process
      lock.seek(0)
      holder = lock.read().strip() or 'unknown'
    except OSError as e:  # e.g. Lustre without -o flock, some FUSE mounts
      logging.warning('Cannot lock %s (%s): nothing stops a second run in this workdir.',
                      workdir, e)
      lock.close()
      lock = None
  if any_process(holder is not None):  # all hosts stop, not only the lead
    if lock is not None:
      lock.close()
    raise WorkdirInUseError(
        f'another run is training in {os.path.abspath(workdir)} (process {holder or "on host 0"}).'
        f' Wait for it to finish, stop it (SIGTERM saves a checkpoint; rerunning then resumes),'
        f' or choose another --workdir.')
  try:
    if lock is not None:
      lock.truncate(0)
      lock.write(f'{os.getpid()} on {socket.gethostname()}\n')
      lock.flush()
    yield
  finally:
    if lock is not None:
      lock.close()  # releases the lock


def any_process(flag: bool) -> bool:
  """True on every host if `flag` is True on any host (one tiny all-gather on multi-host runs).

  A SIGTERM reaches the hosts of a pod at different steps; a host that stopped alone would
  start a checkpoint save the others never join, and the run would hang. The all-gather waits
  for the step in flight, so the loop calls it every `stop_check_every` steps, not every step.
  """
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


# --------------------------------------------------------------------------------------------
# Reporting.


def divergence_advice(config, stage: str = '') -> str:
  """Which config keys set the learning rate and clipping of this method and stage ('' or
  'finetune')."""
  if stage == 'finetune':
    return 'learning rate too high (lower --config.finetune.lr), bad input data'
  if config.method in ('mpl', 'reduced_mpl'):  # two optimisers, in the method's own block
    block = config.method
    return (f'learning rate too high (lower --config.{block}.teacher_optimizer.lr or '
            f'--config.{block}.student_optimizer.lr), no gradient clipping (set their '
            f'clip_norm), bad input data')
  return ('learning rate too high (lower --config.optimizer.lr), no gradient clipping (set '
          '--config.optimizer.clip_norm), bad input data')


def check_finite(metrics: dict[str, float], step: int, advice: str = '',
                 checkpointed: bool = True, stage: str = '') -> None:
  """Raises on the first non-finite metric, loss terms first (they are the cause)."""
  ordered = sorted(metrics.items(), key=lambda kv: (not kv[0].startswith('loss'), kv[0]))
  for name, value in ordered:
    if not math.isfinite(value):
      where = f'{stage} step' if stage else 'step'
      kept = ('the last checkpoint is intact' if checkpointed else
              'no checkpoint had been saved yet')
      raise NonFiniteLossError(
          f'non-finite {name} = {value} at {where} {step}. The run stopped without saving this '
          f'state; {kept}. Usual causes: {advice or "learning rate too high, bad input data"}.')


def summarize(config, evals: list[dict], wall_s: float, steps: int, num_labeled: int) -> dict:
  """summary.json: final, best and median-of-last-20 accuracy (top-1 and top-5) for the raw and
  EMA models."""
  model_keys = sorted({k for e in evals for k in e if k != 'step'})
  primary = 'ema' if 'ema' in model_keys else 'raw'

  def block(pick):
    out = {}
    for key in model_keys:
      out.update({f'{name}_{key}': value for name, value in pick(key).items()})
    out.update({name: out[f'{name}_{primary}'] for name in pick(primary)})
    return out

  def scores(result):  # top-1, and top-5 where the evaluation has it (ImageNet reports both)
    return {name: result[name] for name in ('accuracy', 'top5') if name in result}

  def final(key):
    return scores(evals[-1][key])

  def best(key):  # the evaluation with the best top-1, and its top-5
    top = max(evals, key=lambda e: e[key]['accuracy'])
    return {**scores(top[key]), 'step': top['step']}

  def median(key):
    last = [e[key] for e in evals[-20:]]
    return {name: statistics.median(r[name] for r in last) for name in scores(last[-1])}

  return {
      'config': config.to_dict(),
      'method': config.method,
      'dataset': config.dataset,
      'model': config.model.name,
      'num_labeled': num_labeled,
      'steps': steps,
      'wall_s': round(wall_s, 2),
      'evaluated_model': primary,
      'final': block(final) if evals else {},
      'best': block(best) if evals else {},
      'median_last_20': block(median) if evals else {},
      'history': evals,
  }


def plot_curves(stages: list[list[dict]], path: str, title: str) -> None:
  """Test accuracy over training (raw, EMA, teacher; then the finetune stage) to a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  offset = 0
  for i, evals in enumerate(stages):
    if not evals:
      continue
    suffix = '' if i == 0 else ' (finetune)'
    for key in sorted({k for e in evals for k in e if k != 'step'}):
      ax.plot([offset + e['step'] for e in evals], [100 * e[key]['accuracy'] for e in evals],
              marker='.' if len(evals) < 30 else None, label=key + suffix)
    offset += evals[-1]['step']
  ax.set_xlabel('step')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


# A long run redraws WORKDIR/curves.png after an evaluation at most this often: the curve so far,
# for runs on machines without TensorBoard (no TensorFlow). Short runs draw it once, at the end.
PROGRESS_PLOT_EVERY_S = 300.0


def draw_curves(stages: list[list[dict]], workdir: str, title: str) -> None:
  """WORKDIR/curves.png, during or at the end of a run. A plot that fails is logged and never
  fails the run: the summary and metrics.jsonl hold every number it would show."""
  try:
    plot_curves(stages, os.path.join(workdir, 'curves.png'), title)
  except ImportError as e:
    logging.warning('No %s/curves.png: %s; `pip install matplotlib` (requirements.txt) to '
                    'have it drawn.', workdir, e)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Could not draw %s/curves.png (the run goes on): %r', workdir, e)


# --------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class Experiment:
  """Everything a config builds before the first step; shared by training and `mpl.bench`.

  Its jitted functions trace models with logical-axis constraints: call them inside
  `with experiment.activate():` (the mesh and the rule table).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: tuple
  data: Any
  labeled_idx: np.ndarray
  unlabeled_idx: np.ndarray
  method: base.Method
  state_sharding: Any
  abstract_state: Any          # ShapeDtypeStructs carrying the shardings (restore target)
  init_state: Callable         # jitted rng -> state, created directly in its shardings
  init_state_around: Callable  # jitted (rng, params, batch_stats) -> the state init_state
                               # makes, with these networks in place of the random ones
  arrays: dict                 # the training set on the device
  train_step_for: Callable     # step -> jitted (state, arrays) -> (state, metrics), state
                               # donated: the update of the method's phase at that step
  eval_set: tuple
  evaluate: Callable           # jitted (variables, *eval_set, which) -> {'accuracy', 'top5'}
  num_labeled: int
  stream: Any = None           # streaming.StreamingInput for data too large for memory

  @property
  def train_step(self):
    """The jitted update of step 0 (every step's, for a method with one phase)."""
    return self.train_step_for(0)

  def step(self, state, step: int):
    """Training step `step` (= state.step, known on the host): (state, metrics). The state is
    donated."""
    train_step = self.train_step_for(step)
    if self.stream is None:
      return train_step(state, self.arrays)
    return train_step(state, self.stream.next_batch())

  def evaluate_model(self, variables, which: str = 'raw') -> dict[str, float]:
    """Top-1 and top-5 accuracy of one model (`which`: its eval_variables key)."""
    if self.stream is None:
      return {k: float(v) for k, v in jax.device_get(
          self.evaluate(variables, *self.eval_set, which=which)).items()}
    totals = np.zeros(3)
    for batch in self.stream.eval_batches():  # data.max_eval_examples applied there
      totals += np.asarray(jax.device_get(self.evaluate(variables, batch, which=which)))
    return {'accuracy': totals[0] / totals[2], 'top5': totals[1] / totals[2]}

  def activate(self) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack


def build(config: ml_collections.ConfigDict, workdir: str) -> Experiment:
  """Validates `config`, loads the data and builds the method, shardings and jitted steps."""
  config_lib.validate(config, jax.device_count())
  workdir_path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config)
  rules = sharding.logical_rules(config)
  method_class = methods.get_method(config.method)
  stream = None
  if is_streaming(config) and config.data.standin != 'always':
    missing = None
    try:
      stream = streaming.StreamingInput(config, mesh, method_class.uses_unlabeled)
    except DataMissingError as e:  # corrupt data is an error, not missing
      missing = e
    if datasets.missing_on_some_host(config.dataset, missing, config.data.standin, any_process):
      stream = None   # every host on the stand-in data, not only those that lack the real one
  if stream is not None:
    if config.num_labeled != -1:
      raise ConfigError(
          f'num_labeled={config.num_labeled}, but a streamed dataset takes its labeled examples '
          f'from data.labeled_split ({config.data.labeled_split!r}), not a class-balanced '
          f'draw: set num_labeled=-1 and choose the slice there, e.g. '
          f"--config.data.labeled_split='train[:10%]'.")
    info = base.DataInfo(num_classes=stream.num_classes, mean=streaming.IMAGENET_MEAN,
                         std=streaming.IMAGENET_STD, is_image=True)
    sample_images = stream.sample_images()
    num_labeled = stream.builder.info.splits[config.data.labeled_split].num_examples
    data = labeled_idx = unlabeled_idx = None
    save_split = lambda: None
  else:
    data, labeled_idx, unlabeled_idx, save_split = load_data(config, workdir)
    if method_class.uses_unlabeled and not len(unlabeled_idx):
      raise ConfigError(
          f'{config.method} needs unlabeled data, but every training example is labeled and '
          f'data.exclude_labeled=True leaves none: label fewer (num_labeled) or set '
          f'data.exclude_labeled=False.')
    info = base.DataInfo(num_classes=data.num_classes, mean=tuple(data.mean),
                         std=tuple(data.std), is_image=data.train_images.ndim == 4)
    sample_images = data.train_images[:1]
    num_labeled = len(labeled_idx)
  try:
    model = models.from_config(config.model, info.num_classes)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from e
  method = method_class(config, model, info)
  unlabeled_batch = config.batch_size * config.mu if method.uses_unlabeled else 0
  if info.is_image and unlabeled_batch and config.augment.strong != 'none':
    side = max(sample_images.shape[1:3])
    if config.augment.cutout_size > side:
      raise ConfigError(
          f'config.augment.cutout_size={config.augment.cutout_size} exceeds the {side}-pixel '
          f'images: a box larger than the image erases most of every strong view. Use at most '
          f'{side} (the official 16 is for 32x32 images; 0 turns Cutout off).')
  if stream is None:
    for name, pool, batch in (('labeled', len(labeled_idx), config.batch_size),
                              ('unlabeled', len(unlabeled_idx), unlabeled_batch)):
      if pool * batch >= 2**31:  # see epoch_stream_indices
        raise ConfigError(
            f'{name} batches of {batch} drawn from {pool} examples overflow the in-memory '
            f'sampler (pool x batch = {pool * batch} >= 2**31): lower batch_size or mu, or, for '
            f'a TFDS image dataset, stream it (config.data.streaming=True).')

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Shapes first, then the state is created (or restored) directly in its shardings.
    init = functools.partial(method.init, sample_images=sample_images)
    abstract_boxed = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    state_sharding = sharding.state_shardings(abstract_boxed, mesh, rules)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        sharding.strip_boxes(abstract_boxed), state_sharding)
    init_state = jax.jit(lambda r: sharding.strip_boxes(init(r)),
                         out_shardings=state_sharding)
    # The random networks this replaces are never computed (XLA drops what no output uses),
    # and the given ones are donated: the finetune stage of an EfficientNet-L2 neither compiles
    # an L2 init nor holds a second copy of the student.
    init_state_around = jax.jit(
        lambda r, params, batch_stats: sharding.strip_boxes(init(r)).replace(
            params=params, batch_stats=batch_stats),
        out_shardings=state_sharding, donate_argnums=(1, 2))
    save_split()  # the method and its networks are built: the run is on

    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    if stream is not None:
      arrays = eval_set = None

      def jit_update(update):
        return jax.jit(update, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
      evaluate = make_evaluate_batch(method)
    else:
      arrays = jax.device_put({
          'images': data.train_images, 'labels': data.train_labels.astype(np.int32),
          'labeled_idx': labeled_idx.astype(np.int32),
          'unlabeled_idx': unlabeled_idx.astype(np.int32)}, replicated)
      data_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x0DA7A)

      def jit_update(update):
        def train_step(state, arrays):
          with jax.named_scope('batch'):   # a stage of its own in a profile
            batch = sample_batch(arrays, state.step, data_key, config.batch_size,
                                 unlabeled_batch)
          batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
          return update(state, batch)
        return jax.jit(train_step, in_shardings=(state_sharding, replicated),
                       out_shardings=(state_sharding, replicated), donate_argnums=0)
      limit = config.data.max_eval_examples or len(data.test_labels)
      eval_set = make_eval_set(data.test_images[:limit],
                               data.test_labels[:limit].astype(np.int32),
                               config.eval_batch_size, mesh)
      evaluate = make_evaluate(method)
  train_steps = {}  # phase -> jitted update, made when a step of that phase first comes

  def train_step_for(step: int):
    phase = method.phase(step)
    if phase not in train_steps:
      train_steps[phase] = jit_update(method.update_for(phase))
    return train_steps[phase]

  return Experiment(config=config, mesh=mesh, rules=rules, data=data,
                    labeled_idx=labeled_idx, unlabeled_idx=unlabeled_idx, method=method,
                    state_sharding=state_sharding, abstract_state=abstract_state,
                    init_state=init_state, init_state_around=init_state_around, arrays=arrays,
                    train_step_for=train_step_for, eval_set=eval_set, evaluate=evaluate,
                    num_labeled=num_labeled, stream=stream)


NOT_SAVED = '(not in the saved config)'


def config_changes(saved: dict, current: dict) -> dict[str, list]:
  """{'a.b': [saved value, current value]} for every leaf key whose value differs."""
  def leaves(d, prefix=''):
    for key, value in d.items():
      if isinstance(value, dict):
        yield from leaves(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value
  old, new = dict(leaves(saved)), dict(leaves(current))
  return {key: [old.get(key, NOT_SAVED), new.get(key, NOT_SAVED)]
          for key in sorted(old.keys() | new.keys()) if old.get(key, NOT_SAVED) != new.get(
              key, NOT_SAVED)}


def format_changes(changed: dict[str, list]) -> str:
  return '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())


def as_saved(config: ml_collections.ConfigDict) -> dict:
  """`config` as WORKDIR/config.json holds it (tuples as lists, other values as strings)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def changes_from_saved_config(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """config_changes between WORKDIR/config.json and `config`; {} without a readable one."""
  path = workdir_path(workdir) / 'config.json'
  try:
    return config_changes(json.loads(path.read_text()), as_saved(config)) if path.exists() else {}
  except ValueError:  # damaged: write_config replaces it
    return {}


def write_config(config: ml_collections.ConfigDict, workdir: str, resume_step: int | None):
  """Writes WORKDIR/config.json. A run resumed with another config (more steps, a new lr, ...)
  continues, with a warning and a line in WORKDIR/config_changes.jsonl saying what changed at
  which step: config.json then holds the current config, and the history is not lost."""
  path = workdir_path(workdir) / 'config.json'
  current = as_saved(config)
  saved = None
  if resume_step is not None and path.exists():
    try:
      saved = json.loads(path.read_text())
    except ValueError as e:
      logging.warning('%s is damaged (%s); it is replaced by the current config.', path, e)
  if saved is not None:
    changed = config_changes(saved, current)
    if changed:
      logging.warning('Resuming at step %d with a config that differs from the run\'s: %s',
                      resume_step, format_changes(changed))
      log = workdir_path(workdir) / 'config_changes.jsonl'
      before = log.read_text() if log.exists() else ''  # read + write: works on GCS too
      log.write_text(before + json.dumps({'step': resume_step, 'changed': changed}) + '\n')
  path.write_text(json.dumps(current, indent=2))


def run_stage(config: ml_collections.ConfigDict, workdir: str, *,
              should_stop: Callable[[int], bool] | None = None,
              start_from: tuple[Any, Any] | None = None,
              preemption: 'PreemptionFlag | None' = None,
              stage: str = '') -> tuple[dict, Any]:
  """Trains one stage of `config` in `workdir`, resuming from its latest checkpoint.

  Returns (summary, final state). `start_from` = (params, batch_stats), donated: the network a
  fresh run starts from instead of a random one (the finetune stage starts from the MPL
  student). `should_stop(step)` is checked after every step, like SIGTERM: when True the loop
  saves a checkpoint and returns early (the summary then has "stopped_at"). `stage` ('' or
  'finetune') names the stage in messages.
  """
  experiment = build(config, workdir)
  preemption = preemption or PreemptionFlag()
  writer = reporting.Writer(workdir, jax.process_index() == 0)
  checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
  try:
    return _train_loop(config, workdir, experiment, writer, checkpoints, should_stop,
                       start_from, preemption, stage)
  finally:
    # Also on an error (a NaN, Ctrl-C): a checkpoint still being written finishes, and the
    # last metrics reach the TensorBoard files.
    checkpoints.close()
    writer.flush()


def _train_loop(config, workdir, experiment, writer, checkpoints, should_stop, start_from,
                preemption, stage):
  """The body of `run_stage`."""
  method, mesh = experiment.method, experiment.mesh
  is_lead = jax.process_index() == 0
  advice = divergence_advice(config, stage)
  with experiment.activate():
    meta = {'evals': [], 'wall_s': 0.0}
    resume_step = checkpoints.latest_step()  # never past total_steps: see check_resumable
    if resume_step is not None:
      state, meta = checkpoints.restore(
          experiment.abstract_state,
          config_changes=format_changes(changes_from_saved_config(config, workdir)))
      logging.info('Resumed from the checkpoint at step %d.', int(state.step))
    elif start_from is not None:
      state = experiment.init_state_around(jax.random.PRNGKey(config.seed), *start_from)
    else:
      state = experiment.init_state(jax.random.PRNGKey(config.seed))
    if is_lead:  # only now: a config whose checkpoint does not fit leaves the run's record alone
      write_config(config, workdir, resume_step)
      writer.drop_after(int(state.step))  # rows logged after that checkpoint come again

    def run_eval(state, step):
      result = {'step': step}
      for key, variables in method.eval_variables(state).items():
        result[key] = experiment.evaluate_model(variables, key)
      meta['evals'].append(result)
      writer.write_scalars(step, {f'eval/{key}_{name}': value
                                  for key, r in result.items() if key != 'step'
                                  for name, value in r.items()})
      return result

    step = int(state.step)
    total = int(config.total_steps)
    report = reporting.Progress(total, writer)
    pending = None  # (step, device metrics) of the last update: read one step late (no sync)
    # The training metrics summed over the current log window; saved with each checkpoint, so
    # a resumed run logs the same averages as an uninterrupted one.
    window = meta.get('train_window') or {'sums': {}, 'count': 0}
    sums, count = dict(window['sums']), int(window['count'])
    checkpointed = resume_step is not None  # for the NaN message: is there one to go back to?

    def flush_pending():
      """Fetches and checks the pending metrics; before any log, eval or checkpoint."""
      nonlocal pending, count
      if pending is not None:
        done_step, done_metrics = pending[0], jax.device_get(pending[1])
        pending = None
        check_finite(done_metrics, done_step, advice, checkpointed=checkpointed, stage=stage)
        for k, v in done_metrics.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        count += 1

    session_start = time.time()
    loop_start_time, loop_start_step = time.time(), step
    last_plot_time = time.time()
    stopped_at = None
    stop_asked = False
    multihost = jax.process_count() > 1
    stop_check_every = min(config.log_every, 10)
    logging.info('Training %s on %s from step %d to %d on mesh %s.', config.method,
                 config.dataset, step, total, dict(mesh.shape))
    if experiment.stream is not None:
      experiment.stream.start(step)
    while step < total:
      state, metrics = experiment.step(state, step)
      flush_pending()  # the previous step's metrics, while this step runs
      step += 1
      pending = (step, metrics)
      report(step)
      last = step == total
      stop_asked = (stop_asked or preemption.requested or
                    (should_stop is not None and should_stop(step)))
      preempt = stop_asked
      if multihost:  # all hosts stop at the same step, agreed every few steps
        preempt = (step % stop_check_every == 0 or last) and any_process(stop_asked)
      log = step % config.log_every == 0 or last
      evaluate = step % config.eval_every == 0 or last
      save = step % config.checkpoint_every == 0 or last or preempt
      if log or evaluate or save:
        flush_pending()  # never evaluate or save a state whose losses were not checked
      if log:
        writer.write_scalars(step, {f'train/{k}': v / count for k, v in sums.items()})
        sums, count = {}, 0
      if evaluate:
        result = run_eval(state, step)
        rate = (step - loop_start_step) / max(time.time() - loop_start_time, 1e-9)
        logging.info('step %d/%d  %s  (%.2f steps/s, ETA %s)', step, total,
                     '  '.join(f'{k}: {100 * v["accuracy"]:.2f}%'
                               for k, v in result.items() if k != 'step'),
                     rate, reporting.format_duration((total - step) / max(rate, 1e-9)))
        if is_lead and not last and time.time() - last_plot_time >= PROGRESS_PLOT_EVERY_S:
          draw_curves([meta['evals']], workdir,
                      f'{config.method} on {config.dataset}{" (finetune)" if stage else ""}: '
                      f'step {step} of {total}')
          last_plot_time = time.time()
      if save:
        meta['wall_s'] = meta.get('wall_s', 0.0) + time.time() - session_start
        session_start = time.time()
        meta['train_window'] = {'sums': dict(sums), 'count': count}
        checkpoints.save(step, state, meta)
        checkpointed = True
      if preempt:
        stopped_at = step
        break

  summary = summarize(config, meta['evals'], meta['wall_s'], step, experiment.num_labeled)
  if stopped_at is not None:
    summary['stopped_at'] = stopped_at
    logging.info('Stopped at step %d; rerun the same command to resume.', stopped_at)
  return summary, state


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The finetune stage after MPL (paper): the student on labeled data only, SGD at a tiny lr."""
  ft = ml_collections.ConfigDict(config.to_dict())
  ft.method = 'supervised'
  ft.batch_size = config.finetune.batch_size
  ft.total_steps = config.finetune.steps
  ft.eval_every = min(config.eval_every, config.finetune.steps)
  ft.checkpoint_every = min(config.checkpoint_every, config.finetune.steps)
  ft.log_every = min(config.log_every, config.finetune.steps)
  ft.ema_decay = 0.0
  ft.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', lr=config.finetune.lr, scale_lr_by_batch=False, momentum=0.9, nesterov=True,
      weight_decay=0.0, clip_norm=0.0, wait_steps=0, warmup_steps=0, decay='constant'))
  ft.finetune.steps = 0
  return ft


def latest_checkpoint_step(directory: str) -> int | None:
  """The step of the latest checkpoint in `directory` (a workdir or stage dir), or None."""
  if not (workdir_path(directory) / 'checkpoints').exists():
    return None
  checkpoints = Checkpoints(directory, keep=1, read_only=True)
  step = checkpoints.latest_step()
  checkpoints.close()
  return step


# Config keys that do not change what a run computes.
NOT_RESULTS = frozenset({'data.data_dir', 'log_every', 'checkpoint_every', 'keep_checkpoints'})


def check_resumable(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Before anything runs or is written, the checkpoints already in `workdir` must fit this
  config: a run cannot go back to fewer steps than a checkpoint holds, a finetune stage, which
  starts from the MPL stage's last student, would be left stale by more MPL steps, and a
  finished run is not relabelled with a config it was not trained with. Returns whether the
  run is finished (nothing left to train)."""
  def not_past(directory, step, key, total):
    if step is not None and step > total:
      raise ConfigError(
          f'{directory} holds a checkpoint at step {step}, past this config\'s {key}={total}: '
          f'a run cannot go back. Set {key} >= {step} to continue it, or use a new --workdir.')

  mpl_step = latest_checkpoint_step(workdir)
  not_past(workdir, mpl_step, 'total_steps', config.total_steps)
  finetune_step = None
  if config.finetune.steps > 0:
    finetune_dir = os.path.join(workdir, 'finetune')
    finetune_step = latest_checkpoint_step(finetune_dir)
    not_past(finetune_dir, finetune_step, 'finetune.steps', config.finetune.steps)
    if finetune_step is not None and mpl_step is not None and mpl_step < config.total_steps:
      raise ConfigError(
          f'{finetune_dir} finetuned the student of step {mpl_step}, and this config trains it '
          f'to step {config.total_steps}: that finetune stage would be stale. Remove '
          f'{finetune_dir} to finetune the longer run, or use a new --workdir.')
  finished = mpl_step == config.total_steps and (
      config.finetune.steps <= 0 or finetune_step == config.finetune.steps)
  if finished:  # nothing would train: the summary would carry settings it was not trained with
    # Not counted: keys one version of this code has and another not, and where the run's
    # files are kept or how often it logged (the same run from another path or checkout).
    changed = {key: values for key, values in changes_from_saved_config(config, workdir).items()
               if NOT_SAVED not in values and key not in NOT_RESULTS}
    if changed:
      raise ConfigError(
          f'{workdir} holds a finished run, and this config differs from the one it was trained '
          f'with ({format_changes(changed)}): nothing would train, and its summary would be '
          f'relabelled. Use a new --workdir for a new run, or raise total_steps (or '
          f'finetune.steps) to continue this one.')
  return finished


def stopped_by_ctrl_c(summary: dict) -> str:
  """The message for a run that Ctrl-C stopped at summary['stopped_at']."""
  where = f'step {summary["stopped_at"]}'
  if 'before_finetune' in summary:  # the finetune stage counts its own steps
    where = (f'finetune step {summary["stopped_at"] - summary["before_finetune"]["steps"]}'
             f' (step {summary["stopped_at"]} overall)')
  return (f'stopped by Ctrl-C at {where}, after saving a checkpoint; rerun the same command '
          f'to resume.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       should_stop: Callable[[int], bool] | None = None) -> dict:
  """Trains `config` in `workdir` (resuming where it stopped); returns and writes the summary.

  Writes WORKDIR/summary.json and WORKDIR/curves.png at the end. With `config.finetune.steps`
  > 0 (MPL), a finetune stage follows in WORKDIR/finetune; the summary's `final` is then the
  finetuned student and `before_finetune` holds the MPL stage's results.
  """
  config_lib.validate(config, jax.device_count())  # a typo leaves no workdir behind
  with removed_if_unused(workdir):  # nor does a mistake found while building the run
    bad_workdir = None
    if jax.process_index() == 0:
      try:
        check_workdir(workdir)
      except ConfigError as e:
        bad_workdir = e
    if any_process(bad_workdir is not None):  # every host stops, not only the lead
      raise bad_workdir or ConfigError(f'--workdir {workdir} is not usable: the lead host '
                                       f'(process 0) says why.')
    check_workdir_shared(workdir)
    finished = check_resumable(config, workdir)
    return _train_and_evaluate(config, workdir, should_stop, finished)


@contextlib.contextmanager
def removed_if_unused(workdir: str):
  """A workdir this command created is removed again if the config or the data fail before it
  holds more than the lock file, so that the corrected command starts afresh."""
  created = (jax.process_index() == 0 and '://' not in workdir and bool(workdir) and
             not os.path.exists(workdir))
  try:
    yield
  except (ConfigError, DataError):
    if created and os.path.isdir(workdir) and set(os.listdir(workdir)) <= {'.lock'}:
      shutil.rmtree(workdir, ignore_errors=True)
    raise


def _train_and_evaluate(config, workdir, should_stop, finished):
  """The body of `train_and_evaluate`, in a checked workdir."""
  # The workdir is locked until summary.json is written: a second run started meanwhile in it
  # stops at once (workdir_lock).
  with workdir_lock(workdir):
    if not finished and jax.process_index() == 0:
      # A finished run continued (more steps, a finetune stage added): its summary.json is the
      # shorter run's until this one ends, and tools take a summary.json for a finished run.
      (workdir_path(workdir) / 'summary.json').unlink(missing_ok=True)
    # One SIGTERM handler for both stages: a request during the last MPL step stops the run
    # before the finetune stage starts.
    with PreemptionFlag() as preemption:
      summary, state = run_stage(config, workdir, should_stop=should_stop, preemption=preemption)
      stages = [summary]
      finetune = 'stopped_at' not in summary and config.finetune.steps > 0
      # A SIGTERM after the first stage's last step stops the run before the finetune stage
      # (every host, as in the loop: one host alone would leave the others waiting).
      if finetune and any_process(preemption.requested):
        summary['stopped_at'] = summary['steps']
        logging.info('Stopped before the finetune stage; rerun the same command to resume.')
        finetune = False
      if finetune:
        # Start from the evaluated student: the EMA when there is one (see the MPL docstring).
        if state.ema_params is not None:
          student = (state.ema_params, state.ema_batch_stats)
        elif 'student' in state.params:  # teacher and student (MPL)
          student = (state.params['student'], state.batch_stats['student'])
        else:  # one network
          student = (state.params, state.batch_stats)
        del state
        ft_summary, _ = run_stage(finetune_config(config), os.path.join(workdir, 'finetune'),
                                  should_stop=should_stop, start_from=student,
                                  preemption=preemption, stage='finetune')
        stages.append(ft_summary)
        summary = {**ft_summary, 'config': config.to_dict(), 'method': config.method,
                   'before_finetune': {k: summary[k] for k in ('final', 'best', 'median_last_20',
                                                               'steps', 'wall_s', 'history')},
                   'finetune_steps': ft_summary['steps'],
                   'steps': summary['steps'] + ft_summary['steps'],
                   'wall_s': round(summary['wall_s'] + ft_summary['wall_s'], 2)}
        if 'stopped_at' in ft_summary:
          summary['stopped_at'] = summary['before_finetune']['steps'] + ft_summary['stopped_at']
    if 'stopped_at' in summary:
      if preemption.signal == signal.SIGINT:
        # Ctrl-C means stop, also for whatever called this (a shell loop over seeds, a script):
        # the checkpoint is saved, and the interrupt goes on up.
        raise KeyboardInterrupt(stopped_by_ctrl_c(summary))
      return summary
    if jax.process_index() == 0:
      (workdir_path(workdir) / 'summary.json').write_text(
          json.dumps(summary, indent=2, default=str))
      if summary['final']:
        draw_curves([s['history'] for s in stages], workdir,
                    f'{config.method} on {config.dataset} ({summary["num_labeled"]} labels)')
    logging.info('Done: %s', {k: summary[k] for k in ('final', 'best', 'median_last_20')})
    return summary
