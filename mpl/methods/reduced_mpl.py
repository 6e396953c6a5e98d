"""Reduced Meta Pseudo Labels (METHODS.md section 6, "Reduced MPL"), for when two big networks
do not fit next to each other.

Two stages.
  Stage 1 (any ordinary run, e.g. `supervised` or `mpl`, in a workdir A): the LARGE teacher.
    `config.reduced_mpl.teacher_workdir = A` (local or gs://). At construction this method
    rebuilds the network from A/config.json with `mpl.models.get_model`, reads just that
    network's variables from A's final checkpoint (Orbax, A/checkpoints; A/finetune/checkpoints
    when that run had a finetune stage) straight into the sharding this run's mesh gives it
    (`restore_variables`: tensor-parallel over 'model' when it is > 1, never whole on one
    device), and computes its softmax distribution p_L(x) on EVERY training image once: eval
    mode (no dropout, batch-norm running statistics), no augmentation, batches of
    `config.eval_batch_size` split over 'data' (`teacher_distribution`). The result, float32
    [num_train, num_classes] in training-set order, lives in
    `state.method_state['teacher_probs']`: replicated on every device and saved in every
    checkpoint, 4 * num_train * num_classes bytes (digits 57 KB, CIFAR-10 2 MB, ImageNet
    5.1 GB: too much there; a top-k or bf16 table would be the next step).
    Which network of run A is the large teacher (`reduced_mpl.teacher_source`):
      auto     what run A reported as its result: the finetuned student if A had a finetune
               stage, else its EMA network if it kept one, else its raw network (default)
      ema      the EMA network (the EMA student of an MPL run)
      raw      the raw network (the raw student of an MPL / offline pseudo-label run)
      teacher  the teacher of an MPL / offline pseudo-label run (built from `mpl.teacher_model`
               when A set one)
    Checks (ConfigError): A has config.json and a checkpoint; A trained on the same dataset
    (same name, image_size, and for two_moons noise and seed), so row i of the table is training
    image i as the loop indexes it (both runs use the same `load_dataset`); and A's labeled
    split is a subset of this run's, so the large teacher has seen no label this run treats
    as unlabeled. Batches find their rows with `batch[...]['index']` (position in the training
    set); the streaming input has no such index and is rejected.
  Stage 2 (this method): a small REDUCED teacher T_r and the student S train together.
    T_r(p) = log p + MLP([p, log p / 13.8])   (log p clipped at log 1e-6 = -13.8)
    The MLP (`reduced_mpl.hidden_sizes`, ReLU, LeCun-normal kernels) sees only the large
    teacher's distribution of an example, never its pixels: p in [0, 1] and the scaled log in
    [-1, 0] (the log keeps the order of the small probabilities that p squashes to ~0). Its
    last layer starts at zero, so at initialisation T_r reproduces the large teacher exactly
    (softmax T_r(p) = p up to the 1e-6 clip), and weight decay on that layer (if the teacher
    optimiser has any) pulls T_r back towards the large teacher: a residual correction of a
    converged teacher, not a new classifier trained from scratch.
    One update, the first_order MPL update of mpl.py with T(s(x_u)) replaced by T_r(p_L(x_u)):
      1. Pseudo labels: hard labels yhat for the unlabeled batch, sampled from softmax
         T_r(p_L(x_u)) (the paper) or its argmax (`reduced_mpl.pseudo_label`).
      2. Student step on CE(yhat, S(s(x_u))): the student sees the strong views
         (`base.unlabeled_views`) of the images whose clean-image distributions T_r labelled.
         f_old = CE(y_l, S(x_l)) before it, f_new = CE(y_l, S'(x_l)) after it, exactly as mpl.py
         (student in training mode both times, `reduced_mpl.h_pass` as `mpl.h_pass`: by default
         one labeled-only pass with the same dropout masks before and after, at full float32
         precision for any network dtype, `reduced_mpl.h_dtype` as `mpl.h_dtype`; batch
         statistics of these passes are discarded). The student never trains on the labels
         directly.
      3. Feedback h = f_old - f_new, moving baseline b <- d b + (1 - d) h (updated with the
         current h before it is subtracted, decay `reduced_mpl.baseline_decay`), and the
         reduced teacher's loss
           CE_ls(y_l, T_r(p_L(x_l))) + sg(h - b) * CE(yhat, T_r(p_L(x_u)))
         (label smoothing `config.label_smoothing` on the labeled term). No UDA term: T_r never
         sees pixels, so there is no weak/strong pair to make consistent. The labeled term uses
         the large teacher's distributions of the labeled examples, which it fitted: it mostly
         keeps T_r faithful to the labels; the feedback term is what T_r learns from.
    Optimisers: `reduced_mpl.teacher_optimizer` and `reduced_mpl.student_optimizer` (the
    fields of `mpl.*_optimizer`, mpl/optim.py). Student EMA with `config.ema_decay` (decay
    min(d, (t+1)/(t+10))). Evaluated: {'raw': student, 'ema': student EMA when on}; T_r is not
    an image model, so its accuracy is a training metric: `reduced_teacher_accuracy_labeled`
    (argmax on the labeled batch) and, for monitoring only, `pseudo_label_accuracy`,
    `reduced_teacher_accuracy_unlabeled` and `large_teacher_accuracy_unlabeled` on the unlabeled
    batch (their labels are never trained on).
  Without a stage-1 run (`teacher_workdir = ''`) construction fails with a ConfigError, unless
  `reduced_mpl.standin_teacher_steps > 0`: then a throw-away large teacher (`config.model`,
  Adam 1e-3) trains on this run's labeled examples for that many steps at construction, and its
  distributions are computed as above. The `runlocal` smoke variants use this so that they run
  alone; it is never a result.
  Tests and notebooks can pass the table directly: `ReducedMPL(config, model, info,
  teacher_probs=...)`.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from mpl import config_lib, models, optim, reporting, sharding
from mpl.data import datasets, split
from mpl.errors import ConfigError
from mpl.methods import base
from mpl.methods.mpl import H_DTYPES, H_PASSES, PSEUDO_LABELS, h_measurement, smooth

TEACHER_SOURCES = ('auto', 'ema', 'raw', 'teacher')
LOG_EPS = 1e-6                     # log p is clipped at log(LOG_EPS) = -13.8
LOG_SCALE = -float(np.log(LOG_EPS))
STANDIN_LR = 1e-3


# --------------------------------------------------------------------------------------------
# The reduced teacher.


class ReducedTeacher(nn.Module):
  """logits = log p + MLP([p, log p / 13.8]); the last layer starts at zero (identity at init)."""
  num_classes: int
  hidden_sizes: Sequence[int] = (64,)

  @nn.compact
  def __call__(self, probs: jax.Array) -> jax.Array:
    log_p = jnp.log(jnp.maximum(probs.astype(jnp.float32), LOG_EPS))
    x = jnp.concatenate([probs, log_p / LOG_SCALE], axis=-1)
    for i, size in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(size, name=f'hidden_{i}')(x))
    correction = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                          bias_init=nn.initializers.zeros, name='correction')(x)
    return log_p + correction


# --------------------------------------------------------------------------------------------
# Stage 1: the large teacher's distributions.


def teacher_distribution(model: nn.Module, variables, images, *, prepare=None,
                         batch_size: int = 1000, mesh=None, rules=()) -> np.ndarray:
  """softmax(model(prepare(images))) in eval mode: float32 [len(images), num_classes].

  Row i belongs to images[i]. Batches of `batch_size` (the last one padded, so one compile).
  With a `mesh` (and its logical `rules`), each batch is split over 'data' and the network runs
  with the variables as they are sharded (see `restore_variables`): a large teacher is never
  gathered whole on one device. The batch is built from the full image array every host holds,
  so this works across hosts too.
  """
  prepare = prepare or (lambda x: x)
  apply = lambda v, x: jax.nn.softmax(model.apply(v, prepare(x), train=False))
  n = len(images)
  context = contextlib.nullcontext()
  if mesh is None:
    probs_of = jax.jit(apply)
    put = lambda x: x
  else:
    context = _mesh_context(mesh, rules)
    probs_of = jax.jit(apply, out_shardings=sharding.replicated(mesh))
    batch_sharding = sharding.batch_sharding(mesh)
    put = lambda x: jax.make_array_from_callback(x.shape, batch_sharding, lambda i: x[i])
  rows = []
  with context:
    for start in range(0, n, batch_size):
      chunk = np.asarray(images[start:start + batch_size])
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      rows.append(np.asarray(probs_of(variables, put(chunk)))[:batch_size - pad])
  return np.concatenate(rows).astype(np.float32)


@contextlib.contextmanager
def _mesh_context(mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def read_run_config(workdir: str) -> dict[str, Any]:
  path = config_lib.workdir_path(workdir) / 'config.json'
  if not path.parent.exists():
    raise ConfigError(f'reduced_mpl.teacher_workdir={workdir!r} does not exist: pass the workdir '
                      f'of a finished stage-1 run (see configs/digits_reduced_mpl.py).')
  if not path.exists():
    raise ConfigError(
        f'reduced_mpl.teacher_workdir={workdir!r} has no config.json: run stage 1 there first '
        f'(see configs/digits_reduced_mpl.py).')
  return json.loads(path.read_text())


def latest_state_path(checkpoint_dir) -> epath.Path | None:
  """`checkpoint_dir/<latest step>/state` of a run of mpl.train, or None if it has none."""
  checkpoint_dir = epath.Path(checkpoint_dir)
  if not checkpoint_dir.exists():
    return None
  with ocp.CheckpointManager(checkpoint_dir) as manager:
    step = manager.latest_step()
  return None if step is None else checkpoint_dir / str(step) / 'state'


METADATA_NOTICE = 'Metadata file does not exist'


def state_metadata(state_path) -> dict[str, Any]:
  """The saved TrainState as a tree of shape/dtype metadata (no array is read)."""
  # The run's checkpoint metadata lives one folder up, with the step; Orbax looks for it here
  # and warns that it is missing, harmlessly.
  with reporting.without_log_message(METADATA_NOTICE):
    return ocp.StandardCheckpointer().metadata(state_path).item_metadata.tree


def get_in(tree, keys: tuple[str, ...]):
  for key in keys:
    tree = (tree or {}).get(key)
  return tree


def select_teacher(state: dict[str, Any], run_config: dict[str, Any], source: str,
                   finetuned: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], str, tuple[str, ...], tuple[str, ...]]:
  """Where the large teacher is in a stage-1 run: (model config, 'run' or 'finetune', keys of
  its params, keys of its batch stats) in the state of that checkpoint.

  `state` and `finetuned` (the state of the run's finetune stage, if it had one; used by
  'auto') are nested dicts of anything: restored arrays or checkpoint metadata.
  """
  params = state['params']
  two_networks = isinstance(params, dict) and set(params) == {'teacher', 'student'}
  model_config = run_config['model']
  if source == 'auto':
    if finetuned is not None:
      return model_config, 'finetune', ('params',), ('batch_stats',)
    source = 'ema' if state.get('ema_params') else 'raw'
  if source == 'ema':
    if not state.get('ema_params'):
      raise ConfigError('reduced_mpl.teacher_source=ema but the stage-1 run kept no EMA '
                        '(its ema_decay was 0); use raw or auto.')
    return model_config, 'run', ('ema_params',), ('ema_batch_stats',)
  if source == 'raw':
    if two_networks:
      return model_config, 'run', ('params', 'student'), ('batch_stats', 'student')
    return model_config, 'run', ('params',), ('batch_stats',)
  if not two_networks:  # source == 'teacher'
    raise ConfigError(f'reduced_mpl.teacher_source=teacher but the stage-1 run '
                      f'({run_config.get("method")}) has no teacher network; use auto, ema or '
                      f'raw.')
  teacher_model = (run_config.get('mpl') or {}).get('teacher_model') or model_config
  return teacher_model, 'run', ('params', 'teacher'), ('batch_stats', 'teacher')


def restore_variables(state_path, params_keys, stats_keys, model: nn.Module, sample_input,
                      mesh, rules) -> dict[str, Any]:
  """The variables of `model` stored at `params_keys`/`stats_keys` of the checkpointed state,
  read straight into the sharding this run's mesh and rules give `model` (tensor-parallel over
  'model' when it is > 1): only that network is read, and never whole onto one device.
  """
  metadata = state_metadata(state_path)
  with _mesh_context(mesh, rules):
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    boxed = jax.eval_shape(lambda k: model.init({'params': k, 'dropout': k}, sample_input,
                                                train=False), key)
  shardings = sharding.state_shardings(boxed, mesh, rules)
  target = {}
  for name, keys in (('params', params_keys), ('batch_stats', stats_keys)):
    saved, wanted = get_in(metadata, keys), shardings.get(name) or {}
    if not saved and not wanted:
      continue
    differences = sharding.shape_differences(
        saved or {}, sharding.strip_boxes(boxed.get(name) or {}), 'the checkpoint',
        'the model its config.json names', prefix='/'.join(keys) + '/')
    if differences:
      raise ConfigError(f'the network at {"/".join(keys)} in {state_path} does not match the '
                        f'model its config.json names: {differences}.')
    abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype,
                                                              sharding=s), saved, wanted)
    node = target
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = abstract
  with reporting.without_log_message(METADATA_NOTICE):
    restored = ocp.PyTreeCheckpointer().restore(state_path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  return base.variables_of(get_in(restored, params_keys), get_in(restored, stats_keys) or {})


def check_same_data(run_config: dict[str, Any], config, teacher_workdir: str) -> None:
  """The stage-1 run must index the same training set as this run (ConfigError if not)."""
  keys = [('dataset', run_config.get('dataset'), config.dataset),
          ('data.image_size', run_config.get('data', {}).get('image_size'),
           config.data.image_size)]
  if config.dataset == 'two_moons':
    keys += [(f'data.{k}', run_config.get('data', {}).get(k), config.data[k])
             for k in ('noise', 'seed')]
  for name, theirs, ours in keys:
    if theirs != ours:
      raise ConfigError(
          f'the large teacher in {teacher_workdir} trained with {name}={theirs!r}, this run has '
          f'{name}={ours!r}: its distributions would belong to other images. Stage 2 must use '
          f'the training set of stage 1.')


def training_set(config) -> datasets.InMemoryDataset:
  """The training set as mpl.train.load_data loads it (same images, same order)."""
  if config.data.streaming or config.dataset in datasets.STREAMING_DATASETS:
    raise ConfigError('reduced_mpl needs the in-memory input (batches carry training-set '
                      'indices there); the streaming input has no index.')
  from mpl import train  # pylint: disable=g-import-not-at-top  (train imports the methods)
  return datasets.load_from_config(config, any_host=train.any_process)


def train_standin_teacher(model: nn.Module, prepare, images, labels, steps: int,
                          batch_size: int, rng) -> Any:
  """A throw-away large teacher for runlocal smoke runs: Adam on CE over the given examples."""
  tx = optax.adam(STANDIN_LR)
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({'params': params_rng, 'dropout': params_rng},
                         prepare(jnp.asarray(images[:1])), train=False)
  params = nn.meta.unbox(variables['params'])
  stats = nn.meta.unbox(variables.get('batch_stats', {}))
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, stats, opt_state, x, y, key):
    def loss_fn(p):
      logits, new_stats = base.apply_train(model, p, stats, prepare(x), key)
      return jnp.mean(base.cross_entropy(logits, y)), new_stats
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  n = len(labels)
  for step in range(steps):
    pick = (step * batch_size + np.arange(batch_size)) % n
    params, stats, opt_state = step_fn(params, stats, opt_state, images[pick], labels[pick],
                                       jax.random.fold_in(dropout_rng, step))
  return base.variables_of(params, stats)


# --------------------------------------------------------------------------------------------
# The method.


class ReducedMPL(base.Method):
  name = 'reduced_mpl'
  uses_unlabeled = True

  def __init__(self, config, model, info, teacher_probs=None):
    super().__init__(config, model, info)
    c = config.reduced_mpl
    if c.pseudo_label not in PSEUDO_LABELS:
      raise ConfigError(f'unknown reduced_mpl.pseudo_label {c.pseudo_label!r}; valid choices: '
                        f'{list(PSEUDO_LABELS)}')
    if c.h_pass not in H_PASSES:
      raise ConfigError(f'unknown reduced_mpl.h_pass {c.h_pass!r}; valid choices: '
                        f'{list(H_PASSES)}')
    if c.h_dtype not in H_DTYPES:
      raise ConfigError(f'unknown reduced_mpl.h_dtype {c.h_dtype!r}; valid choices: '
                        f'{list(H_DTYPES)}')
    if c.teacher_source not in TEACHER_SOURCES:
      raise ConfigError(f'unknown reduced_mpl.teacher_source {c.teacher_source!r}; valid '
                        f'choices: {list(TEACHER_SOURCES)}')
    self.student = model
    self.student_for_h, self.h_context = h_measurement(model, c.h_pass, c.h_dtype)
    self.teacher = ReducedTeacher(info.num_classes, tuple(c.hidden_sizes))
    steps, batch = config.total_steps, config.batch_size
    self.teacher_tx, self.teacher_lr = optim.make_optimizer(c.teacher_optimizer, steps, batch)
    self.student_tx, self.student_lr = optim.make_optimizer(c.student_optimizer, steps, batch)
    self.ema_decay = float(config.get('ema_decay', 0.0))
    if teacher_probs is None:
      teacher_probs = self.large_teacher_probs()
    teacher_probs = np.asarray(teacher_probs, np.float32)
    if teacher_probs.ndim != 2 or teacher_probs.shape[1] != info.num_classes:
      raise ConfigError(f'large-teacher distributions of shape {teacher_probs.shape}; expected '
                        f'[num_train, {info.num_classes}].')
    self.teacher_probs = teacher_probs

  def large_teacher_probs(self) -> np.ndarray:
    """Stage 1's distributions on every training image (see the module docstring)."""
    config, c = self.config, self.config.reduced_mpl
    run_config = None
    if c.teacher_workdir:
      run_config = read_run_config(c.teacher_workdir)
      check_same_data(run_config, config, c.teacher_workdir)
    elif int(c.get('standin_teacher_steps', 0)) <= 0:
      raise ConfigError(
          'reduced_mpl.teacher_workdir is empty: reduced MPL needs a trained large teacher. Run '
          'stage 1 (any method) in a workdir A, then pass teacher_workdir=A (see '
          'configs/digits_reduced_mpl.py).')
    data = training_set(config)
    mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
    labeled = split.labeled_indices(
        data.train_labels, len(data.train_labels) if config.num_labeled == -1
        else int(config.num_labeled), data.num_classes, seed=config.data.seed)
    if run_config is not None:
      saved = split.load_split(c.teacher_workdir)
      if saved is None or not np.isin(saved[0], labeled).all():
        raise ConfigError(
            f'the large teacher in {c.teacher_workdir} trained on labels this run treats as '
            f'unlabeled (its labeled_split.json is missing or not a subset of this run\'s '
            f'{len(labeled)} labeled examples): use the same labels (num_labeled, data.seed) '
            f'in both stages.')
      workdir = config_lib.workdir_path(c.teacher_workdir)
      run_path = latest_state_path(workdir / 'checkpoints')
      if run_path is None:
        raise ConfigError(f'no checkpoints in {workdir / "checkpoints"}: did stage 1 finish?')
      if not (workdir / 'summary.json').exists():
        logging.warning('reduced_mpl: the stage-1 run %s has no summary.json: it has not '
                        'finished (stopped or still training). Its latest checkpoint, %s, is the '
                        'large teacher; finish stage 1 (rerun its command) for the documented '
                        'recipe.', c.teacher_workdir, run_path.parent.name)
      # Only 'auto' looks at the finetune stage (its result is what run A reported).
      finetune_path = (latest_state_path(workdir / 'finetune' / 'checkpoints')
                       if c.teacher_source == 'auto' else None)
      model_config, where, params_keys, stats_keys = select_teacher(
          state_metadata(run_path), run_config, c.teacher_source,
          state_metadata(finetune_path) if finetune_path else None)
      teacher_path = finetune_path if where == 'finetune' else run_path
      logging.info('reduced_mpl: large teacher = %s of %s.', '/'.join(params_keys),
                   teacher_path)
      try:
        model = models.from_config(model_config, self.info.num_classes)
      except ValueError as e:
        raise ConfigError(f'the stage-1 model in {c.teacher_workdir}: {e}') from e
      variables = restore_variables(teacher_path, params_keys, stats_keys, model,
                                    self.prepare(jnp.asarray(data.train_images[:1])), mesh, rules)
      what = f'{run_config.get("method")} run {c.teacher_workdir} ({c.teacher_source})'
    else:
      logging.warning('reduced_mpl: no teacher_workdir; training a throw-away large teacher '
                      'for %d steps on the labeled examples (a smoke test, not a result).',
                      c.standin_teacher_steps)
      model = self.model
      variables = train_standin_teacher(
          model, self.prepare, data.train_images[labeled], data.train_labels[labeled],
          int(c.standin_teacher_steps), config.batch_size, jax.random.PRNGKey(config.seed))
      variables = jax.device_put(variables, sharding.replicated(mesh))
      what = 'stand-in teacher'
    num_train = len(data.train_labels)
    probs = teacher_distribution(  # the test images only for the log line below
        model, variables, np.concatenate([data.train_images, data.test_images]),
        prepare=self.prepare, batch_size=config.eval_batch_size, mesh=mesh, rules=rules)
    probs, test = probs[:num_train], probs[num_train:]
    correct = np.argmax(probs, -1) == data.train_labels
    logging.info('reduced_mpl: large teacher = %s: accuracy %.2f%% on all %d training images, '
                 '%.2f%% on the labeled ones, %.2f%% on the test set.', what,
                 100 * correct.mean(), len(correct), 100 * correct[labeled].mean(),
                 100 * np.mean(np.argmax(test, -1) == data.test_labels))
    return probs

  # -- state ----------------------------------------------------------------------------------

  def init(self, rng, sample_images):
    teacher_rng, student_rng, state_rng = jax.random.split(rng, 3)
    num_classes = self.info.num_classes
    teacher = self.teacher.init(teacher_rng, jnp.full((1, num_classes), 1.0 / num_classes))
    student, student_stats = self.init_network(student_rng, sample_images)
    params = {'teacher': teacher['params'], 'student': student}
    use_ema = self.ema_decay > 0
    return base.TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=state_rng,
        params=params,
        batch_stats={'teacher': {}, 'student': student_stats},
        opt_state={'teacher': self.teacher_tx.init(params['teacher']),
                   'student': self.student_tx.init(student)},
        ema_params=student if use_ema else None,
        ema_batch_stats=student_stats if use_ema else None,
        method_state={'baseline': jnp.zeros((), jnp.float32),
                      'teacher_probs': jnp.asarray(self.teacher_probs)},
    )

  def eval_variables(self, state):
    out = {'raw': base.variables_of(state.params['student'], state.batch_stats['student'])}
    if self.ema_decay > 0:
      out['ema'] = base.variables_of(state.ema_params, state.ema_batch_stats)
    return out

  def predict(self, variables, images, which='raw'):
    del which  # 'raw' and 'ema' are both the student network
    return self.student.apply(base.for_compute(self.student, variables), self.prepare(images),
                              train=False)

  # -- the update -------------------------------------------------------------------------------

  def update(self, state, batch):
    c = self.config.reduced_mpl
    step = state.step
    rng = jax.random.fold_in(state.rng, step)
    labeled_rng, unlabeled_rng, student_rng, student_new_rng, label_rng = jax.random.split(rng, 5)
    x_l = self.prepare(base.labeled_view(self.config, labeled_rng, batch['labeled']['image']))
    _, x_s = base.unlabeled_views(self.config, unlabeled_rng, batch['unlabeled']['image'])
    x_s = self.prepare(x_s)
    y_l = batch['labeled']['label']
    n_l = x_l.shape[0]
    table = state.method_state['teacher_probs']
    p_l, p_u = table[batch['labeled']['index']], table[batch['unlabeled']['index']]
    teacher_params, student_params = state.params['teacher'], state.params['student']
    reduced_teacher = lambda params, probs: self.teacher.apply({'params': params}, probs)

    # 1. Hard pseudo labels from the reduced teacher on the large teacher's distributions.
    t_u = reduced_teacher(teacher_params, p_u)
    if c.pseudo_label == 'sample':
      pseudo = jax.random.categorical(label_rng, t_u)
    else:
      pseudo = jnp.argmax(t_u, axis=-1)
    targets = jax.nn.one_hot(pseudo, t_u.shape[-1])

    # 2. The student step on the strong views, and its labeled loss before and after (mpl.py).
    def loss_fn(params):
      logits, new_stats = base.apply_train(
          self.student, params, state.batch_stats['student'], jnp.concatenate([x_l, x_s]),
          student_rng)
      loss_u = jnp.mean(base.soft_cross_entropy(
          logits[n_l:], smooth(targets, c.student_label_smoothing)))
      f_old = jnp.mean(base.cross_entropy(logits[:n_l], y_l))
      return loss_u, (f_old, new_stats)

    def labeled_loss(params, stats):   # in float32 under h_dtype 'float32' (see mpl.py)
      with self.h_context():
        logits, _ = base.apply_train(self.student_for_h, params, stats, x_l, student_new_rng)
      return jnp.mean(base.cross_entropy(logits, y_l))

    (loss_u, (f_old, student_stats)), student_grads = jax.value_and_grad(
        loss_fn, has_aux=True)(student_params)
    if c.h_pass == 'paired':   # f_old from the same pass as f_new (see mpl.py)
      f_old = labeled_loss(student_params, state.batch_stats['student'])
    updates, student_opt = self.student_tx.update(student_grads, state.opt_state['student'],
                                                  student_params)
    student_params = optax.apply_updates(student_params, updates)
    f_new = labeled_loss(student_params, student_stats)

    # 3. First-order feedback against a moving baseline; the reduced teacher's step.
    h = f_old - f_new
    baseline = c.baseline_decay * state.method_state['baseline'] + (1 - c.baseline_decay) * h
    coefficient = jax.lax.stop_gradient(h - baseline)

    def teacher_loss(params):
      t_l = reduced_teacher(params, p_l)
      t_u = reduced_teacher(params, p_u)
      labeled = jnp.mean(base.cross_entropy(t_l, y_l, self.config.label_smoothing))
      feedback = coefficient * jnp.mean(base.cross_entropy(t_u, pseudo))
      total = labeled + feedback
      return total, {'loss_teacher': total, 'loss_teacher_labeled': labeled,
                     'loss_mpl': feedback,
                     'reduced_teacher_accuracy_labeled': base.accuracy(t_l, y_l)}

    teacher_grads, teacher_metrics = jax.grad(teacher_loss, has_aux=True)(teacher_params)
    updates, teacher_opt = self.teacher_tx.update(teacher_grads, state.opt_state['teacher'],
                                                  teacher_params)
    teacher_params = optax.apply_updates(teacher_params, updates)

    ema_params, ema_batch_stats = base.updated_ema(state, student_params, student_stats, self.ema_decay)

    metrics = {
        **teacher_metrics,
        'loss_student': loss_u,
        'f_old': f_old, 'f_new': f_new, 'h': h, 'baseline': baseline,
        'lr_teacher': self.teacher_lr(step), 'lr_student': self.student_lr(step),
        'teacher_grad_norm': optax.tree.norm(teacher_grads),
        'student_grad_norm': optax.tree.norm(student_grads),
    }
    if 'label' in batch['unlabeled']:  # monitoring only: never used for training
      y_u = batch['unlabeled']['label']
      metrics['pseudo_label_accuracy'] = jnp.mean(pseudo == y_u)
      metrics['reduced_teacher_accuracy_unlabeled'] = base.accuracy(t_u, y_u)
      metrics['large_teacher_accuracy_unlabeled'] = base.accuracy(p_u, y_u)
    new_state = state.replace(
        step=step + 1,
        params={'teacher': teacher_params, 'student': student_params},
        batch_stats={'teacher': state.batch_stats['teacher'], 'student': student_stats},
        opt_state={'teacher': teacher_opt, 'student': student_opt},
        ema_params=ema_params, ema_batch_stats=ema_batch_stats,
        method_state={'baseline': baseline, 'teacher_probs': table})
    return new_state, metrics
