"""Pseudo Labels / Noisy Student: each phase's update against an independent computation."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import make_moons

from mpl import models, sharding
from mpl.errors import ConfigError
from mpl.methods import base
from mpl.methods.pseudo_label import PseudoLabel, pseudo_targets
from mpl.methods.supervised import Supervised

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 0.5


def make_config(**pseudo_label):
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, 'configs/two_moons.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('method=pseudo_label,labels=6')
  config.total_steps = 10
  config.ema_decay = 0.0
  config.label_smoothing = 0.0
  config.optimizer.update(dict(lr=LR, momentum=0.0, weight_decay=0.0, wait_steps=0,
                               warmup_steps=0, decay='constant', scale_lr_by_batch=False))
  config.pseudo_label.update(pseudo_label)
  return config


def make(config, cls=PseudoLabel):
  model = models.get_model('mlp', 2, hidden_sizes=(8, 8), activation='tanh', initializer='lecun')
  info = base.DataInfo(num_classes=2, mean=(0.0,), std=(1.0,), is_image=False)
  return cls(config, model, info)


def moons_batch(n_l=8, n_u=32, seed=0):
  x, y = make_moons(n_l + n_u, noise=0.1, random_state=seed)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)
  return {'labeled': {'image': x[:n_l], 'label': y[:n_l]},
          'unlabeled': {'image': x[n_l:], 'label': y[n_l:]}}


def init_state(method, batch, seed=0):
  return sharding.strip_boxes(method.init(jax.random.PRNGKey(seed),
                                          batch['labeled']['image'][:1]))


@functools.cache
def jitted_update(method):
  return jax.jit(method.update)


def update(method, state, batch):
  """One jitted update, as the loop runs it (compiled once per method)."""
  return jitted_update(method)(state, batch)


def apply(method, params, x):
  return method.model.apply({'params': params}, x, train=False)


def sgd_step(params, grads, lr=LR):
  return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def assert_trees_close(a, b, **kw):
  kw = {'rtol': 1e-5, 'atol': 1e-6, **kw}
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def self_training_grad(method, student, teacher_logits, batch, weight, threshold=0.0):
  """grad of CE_l + weight * mean(mask * CE(argmax teacher, student(x_u))), written out."""
  x_l, y_l, x_u = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']
  yhat = jnp.argmax(teacher_logits, -1)
  keep = jnp.max(jax.nn.softmax(teacher_logits), -1) >= threshold

  def loss(p):
    labeled = jnp.mean(base.cross_entropy(apply(method, p, x_l), y_l))
    per_example = base.cross_entropy(apply(method, p, x_u), yhat)
    return labeled + weight * jnp.mean(jnp.where(keep, per_example, 0.0))

  return jax.grad(loss)(student)


def test_phase1_trains_the_teacher_like_supervised_and_leaves_the_student():
  config = make_config(rounds=1, teacher_steps=5)
  method, batch = make(config), moons_batch()
  state = init_state(method, batch)
  new_state, metrics = update(method, state, batch)

  supervised = make(config, Supervised)
  sup_state = init_state(supervised, batch).replace(params=state.params['teacher'])
  sup_state = sup_state.replace(opt_state=supervised.tx.init(sup_state.params))
  sup_new, sup_metrics = update(supervised, sup_state, batch)
  assert_trees_close(new_state.params['teacher'], sup_new.params)
  np.testing.assert_allclose(metrics['loss_labeled'], sup_metrics['loss'], rtol=1e-6)
  assert_trees_equal(new_state.params['student'], state.params['student'])
  assert_trees_equal(new_state.opt_state['student'], state.opt_state['student'])
  assert int(metrics['round']) == 0 and float(metrics['loss_unlabeled']) == 0.0
  assert int(new_state.step) == 1


@pytest.mark.parametrize('weight', [0.7, 2.0])
def test_phase2_freezes_the_teacher_and_student_follows_ce_plus_pseudo_ce(weight):
  config = make_config(rounds=1, teacher_steps=5, weight=weight)
  method, batch = make(config), moons_batch()
  state = init_state(method, batch).replace(step=jnp.int32(5))
  new_state, metrics = update(method, state, batch)
  assert int(metrics['round']) == 1
  assert_trees_equal(new_state.params['teacher'], state.params['teacher'])

  teacher_logits = apply(method, state.params['teacher'], batch['unlabeled']['image'])
  grads = self_training_grad(method, state.params['student'], teacher_logits, batch, weight)
  assert optax_norm(grads) > 1e-2
  assert_trees_close(new_state.params['student'], sgd_step(state.params['student'], grads))
  np.testing.assert_allclose(metrics['loss'],
                             metrics['loss_labeled'] + weight * metrics['loss_unlabeled'],
                             rtol=1e-6)


def optax_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))


def test_threshold_masks_low_confidence_pseudo_labels():
  batch = moons_batch(n_u=64)
  method = make(make_config(rounds=1, teacher_steps=5))
  state = init_state(method, batch, seed=1)
  teacher_logits = apply(method, state.params['teacher'], batch['unlabeled']['image'])
  confidence = jnp.max(jax.nn.softmax(teacher_logits), -1)
  threshold = float(jnp.median(confidence))
  expected_rate = float(jnp.mean(confidence >= threshold))
  assert 0.2 < expected_rate < 0.8

  method = make(make_config(rounds=1, teacher_steps=5, threshold=threshold))
  state = state.replace(step=jnp.int32(5))
  new_state, metrics = update(method, state, batch)
  np.testing.assert_allclose(float(metrics['mask_rate']), expected_rate)
  grads = self_training_grad(method, state.params['student'], teacher_logits, batch, 1.0,
                             threshold)
  assert_trees_close(new_state.params['student'], sgd_step(state.params['student'], grads))

  everything = make(make_config(rounds=1, teacher_steps=5, threshold=0.0))
  assert float(update(everything, state, batch)[1]['mask_rate']) == 1.0


def test_online_with_zero_weight_is_the_supervised_update():
  config = make_config(rounds=0, weight=0.0)
  method, batch = make(config), moons_batch()
  state = init_state(method, batch)
  new_state, metrics = update(method, state, batch)
  supervised = make(config, Supervised)
  sup_new, _ = update(supervised, state, batch)  # same state structure: one network
  assert_trees_close(new_state.params, sup_new.params, rtol=1e-6, atol=1e-7)
  assert 'teacher' not in method.eval_variables(new_state)


def test_online_labels_its_own_predictions_above_095():
  config = make_config(rounds=0)
  method, batch = make(config), moons_batch()
  assert method.threshold == 0.95  # the online default
  state = init_state(method, batch)
  # Scaled-up weights make the network confident on some of the points, not all.
  params = jax.tree.map(lambda p: 6.0 * p, state.params)
  state = state.replace(params=params)
  new_state, metrics = update(method, state, batch)
  logits = apply(method, params, batch['unlabeled']['image'])
  grads = self_training_grad(method, params, logits, batch, 1.0, threshold=0.95)
  assert 0.0 < float(metrics['mask_rate']) < 1.0
  assert_trees_close(new_state.params, sgd_step(params, grads))


def test_round_switch_copies_the_student_into_the_teacher():
  # teacher_steps 2, then 2 rounds of 4 steps: round 2 starts at step 6.
  config = make_config(rounds=2, teacher_steps=2)
  method, batch = make(config), moons_batch()
  assert method.round_steps == 4
  state = init_state(method, batch)
  for step, expected_round, switch in ((5, 1, False), (6, 2, True), (7, 2, False)):
    at = state.replace(step=jnp.int32(step))
    new_state, metrics = update(method, at, batch)
    assert int(metrics['round']) == expected_round
    teacher = state.params['student'] if switch else state.params['teacher']
    assert_trees_equal(new_state.params['teacher'], teacher)
    # The student learns from the labels of the teacher in charge at this step.
    logits = apply(method, teacher, batch['unlabeled']['image'])
    grads = self_training_grad(method, state.params['student'], logits, batch, 1.0)
    assert_trees_close(new_state.params['student'], sgd_step(state.params['student'], grads))


def schedule_count(opt_state):
  """The step count of an optax schedule inside an optimiser state."""
  counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
            if 'count' in jax.tree_util.keystr(path)]
  assert len(counts) == 1
  return int(counts[0])


def test_jitted_run_crosses_every_phase():
  config = make_config(rounds=2, teacher_steps=2)
  config.total_steps = 7  # 2 teacher steps, then rounds of 2 and 3 steps
  config.optimizer.momentum = 0.9
  method, batch = make(config), moons_batch()
  state = init_state(method, batch)
  jitted = jax.jit(method.update, donate_argnums=0)
  rounds = []
  for step in range(7):
    student_before = jax.tree.map(np.asarray, state.params['student'])
    state, metrics = jitted(state, batch)
    rounds.append(int(metrics['round']))
    assert np.isfinite(float(metrics['loss']))
    if step == 4:  # the first step of round 2: the teacher is the student of round 1
      assert_trees_equal(state.params['teacher'], student_before)
  assert rounds == [0, 0, 1, 1, 2, 2, 2]
  # The teacher stepped twice; the student's optimiser restarted at round 2 (3 steps since).
  assert schedule_count(state.opt_state['teacher']) == 2
  assert schedule_count(state.opt_state['student']) == 3
  assert set(method.eval_variables(state)) == {'raw', 'teacher'}


def test_phases_chosen_on_the_host_equal_the_device_choice():
  """The loop jits one update per phase (`phase`, `update_for`); run across both phases and
  a round switch, it gives the state that the single update with its `lax.cond` gives."""
  config = make_config(rounds=2, teacher_steps=2)
  config.total_steps = 7
  method, batch = make(config), moons_batch()
  assert [method.phase(s) for s in range(4)] == ['teacher', 'teacher', 'student', 'student']
  assert make(make_config(rounds=0)).phase(0) is None
  per_phase = {p: jax.jit(method.update_for(p)) for p in ('teacher', 'student')}
  on_device, on_host = init_state(method, batch), init_state(method, batch)
  for step in range(7):
    on_device, _ = update(method, on_device, batch)
    on_host, _ = per_phase[method.phase(step)](on_host, batch)
  assert_trees_close(on_host.params, on_device.params)
  assert_trees_close(on_host.opt_state, on_device.opt_state)
  # The teacher's program has no student step in it: no conditional at all (the single
  # update has its lax.cond, lowered as stablehlo.case).
  state = init_state(method, batch)
  assert 'stablehlo.case' in jax.jit(method.update).lower(state, batch).as_text()
  assert 'stablehlo.case' not in per_phase['teacher'].lower(state, batch).as_text()


def test_offline_ema_warms_up_from_the_students_first_step():
  """The EMA (the evaluated model) does not keep the untrained student of the teacher phase:
  its decay min(d, (t + 1) / (t + 10)) counts t from the student's first step (0.1 there)."""
  config = make_config(rounds=1)   # 10 steps: 5 teacher, 5 student
  config.ema_decay = 0.99
  method = make(config)
  batch = moons_batch()
  state = init_state(method, batch)
  for _ in range(method.teacher_steps):
    state, _ = update(method, state, batch)
  before = state.ema_params
  state, _ = update(method, state, batch)   # the student's first step
  assert_trees_close(state.ema_params, jax.tree.map(lambda e, s: 0.1 * e + 0.9 * s, before,
                                                    state.params['student']))


def test_config_errors():
  with pytest.raises(ConfigError, match='rounds'):
    make(make_config(rounds=-1))
  with pytest.raises(ConfigError, match='teacher_steps'):
    make(make_config(rounds=2, teacher_steps=9))
  # teacher_steps unset: the message names the key that was set.
  with pytest.raises(ConfigError, match=r'rounds=30 needs total_steps >= 31 .* total_steps is 10'):
    make(make_config(rounds=30))
  assert make(make_config(rounds=1)).threshold == 0.0
  assert make(make_config(rounds=1)).teacher_steps == 5


# -- what the TwoMoons MLP cannot see: train vs eval mode, two views, soft targets, smoothing ----


def written_grad(method, params, batch, x_u=None, targets=None, weight=1.0, smoothing=0.0):
  """grad of CE(q_l, f(x_l)) + weight * mean CE(targets, f(x_u)), every term written out:
  q_l = (1 - smoothing) * one_hot(y_l) + smoothing / 2, targets given (hard or soft), no mask."""
  x_l, y_l = batch['labeled']['image'], batch['labeled']['label']
  q_l = (1.0 - smoothing) * jax.nn.one_hot(y_l, 2) + smoothing / 2

  def loss(p):
    total = -jnp.mean(jnp.sum(q_l * jax.nn.log_softmax(apply(method, p, x_l)), -1))
    if x_u is not None:
      total += -weight * jnp.mean(jnp.sum(targets * jax.nn.log_softmax(apply(method, p, x_u)),
                                          -1))
    return total

  return jax.grad(loss)(params)


def with_distinct_views(method):
  """The method's views replaced: s(x_u) = -w(x_u), w(x_u) = x_u (points have no augmentation).
  The lecun MLP is odd (tanh, zero biases), so every label on s(x_u) is the flip of w(x_u)'s."""
  def views(rng, batch):
    del rng
    x_u = method.prepare(batch['unlabeled']['image'])
    return method.prepare(batch['labeled']['image']), x_u, -x_u
  method.views = views
  return method


def test_frozen_teacher_labels_in_eval_mode():
  """Batch norm (running statistics vs the batch's) and dropout make the teacher's train-mode
  labels differ from its eval-mode ones; the student must get the eval-mode labels."""
  config = make_config(rounds=1, teacher_steps=5)
  model = models.get_model('cnn', 10, features=(4,), dropout_rate=0.5)
  info = base.DataInfo(num_classes=10, mean=(0.0,), std=(1.0,), is_image=False)
  method = PseudoLabel(config, model, info)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(72, 6, 6, 1)), jnp.float32)
  batch = {'labeled': {'image': x[:8], 'label': jnp.asarray(np.arange(8) % 10, jnp.int32)},
           'unlabeled': {'image': x[8:]}}
  state = init_state(method, batch).replace(step=jnp.int32(5))
  teacher = base.variables_of(state.params['teacher'], state.batch_stats['teacher'])
  eval_labels = jnp.argmax(model.apply(teacher, x[8:], train=False), -1)
  train_logits, _ = model.apply(teacher, x[8:], train=True, rngs={'dropout': jax.random.key(1)},
                                mutable=['batch_stats'])
  assert float(jnp.mean(jnp.argmax(train_logits, -1) != eval_labels)) > 0.2  # the test can fail
  # 'label' of the unlabeled batch is monitoring only: set it to the labels expected.
  batch['unlabeled']['label'] = eval_labels
  new_state, metrics = update(method, state, batch)
  assert float(metrics['pseudo_label_accuracy']) == 1.0
  assert_trees_equal(new_state.params['teacher'], state.params['teacher'])
  assert_trees_equal(new_state.batch_stats['teacher'], state.batch_stats['teacher'])


@pytest.mark.parametrize('hard', [True, False])
def test_offline_labels_come_from_the_weak_view_and_train_the_strong_one(hard):
  config = make_config(rounds=1, teacher_steps=5, hard=hard)
  method, batch = with_distinct_views(make(config)), moons_batch()
  state = init_state(method, batch).replace(step=jnp.int32(5))
  x_w = batch['unlabeled']['image']
  teacher_w = apply(method, state.params['teacher'], x_w)
  teacher_s = apply(method, state.params['teacher'], -x_w)
  assert bool(jnp.all(jnp.argmax(teacher_w, -1) != jnp.argmax(teacher_s, -1)))
  batch['unlabeled']['label'] = jnp.argmax(teacher_w, -1)
  new_state, metrics = update(method, state, batch)
  assert float(metrics['pseudo_label_accuracy']) == 1.0

  targets = jax.nn.one_hot(jnp.argmax(teacher_w, -1), 2) if hard else jax.nn.softmax(teacher_w)
  grads = written_grad(method, state.params['student'], batch, -x_w, targets)
  assert_trees_close(new_state.params['student'], sgd_step(state.params['student'], grads))


@pytest.mark.parametrize('hard', [True, False])
def test_online_labels_its_weak_view_and_trains_its_strong_view(hard):
  config = make_config(rounds=0, threshold=0.0, hard=hard)
  method, batch = with_distinct_views(make(config)), moons_batch()
  state = init_state(method, batch)
  x_w = batch['unlabeled']['image']
  logits_w = apply(method, state.params, x_w)  # no dropout or batch norm: train = eval mode
  batch['unlabeled']['label'] = jnp.argmax(logits_w, -1)
  new_state, metrics = update(method, state, batch)
  assert float(metrics['pseudo_label_accuracy']) == 1.0

  # Soft targets on distinct views: the unlabeled term has a gradient (none on identical views).
  targets = jax.nn.one_hot(jnp.argmax(logits_w, -1), 2) if hard else jax.nn.softmax(logits_w)
  grads = written_grad(method, state.params, batch, -x_w, targets)
  assert_trees_close(new_state.params, sgd_step(state.params, grads))


def test_soft_targets_are_the_teachers_softmax():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 0.5], [-1.0, 3.0]])
  soft, mask = pseudo_targets(logits, hard=False, threshold=0.7)
  np.testing.assert_allclose(soft, jax.nn.softmax(logits), rtol=1e-6)
  np.testing.assert_array_equal(mask, [1.0, 0.0, 1.0])
  hard, _ = pseudo_targets(logits, hard=True, threshold=0.7)
  np.testing.assert_array_equal(hard, [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])

  # The offline student trains on CE(softmax T(x_u), S(x_u)), not on its argmax.
  config = make_config(rounds=1, teacher_steps=5, hard=False)
  method, batch = make(config), moons_batch()
  state = init_state(method, batch).replace(step=jnp.int32(5))
  x_u = batch['unlabeled']['image']
  targets = jax.nn.softmax(apply(method, state.params['teacher'], x_u))
  assert float(jnp.max(targets)) < 0.99  # far from one-hot
  new_state, _ = update(method, state, batch)
  grads = written_grad(method, state.params['student'], batch, x_u, targets)
  assert_trees_close(new_state.params['student'], sgd_step(state.params['student'], grads))


@pytest.mark.parametrize('where', ['supervised', 'online', 'teacher_phase', 'student_phase'])
def test_label_smoothing_on_the_labeled_cross_entropy(where):
  """config.label_smoothing = 0.1: the labeled term is CE((0.9 one_hot + 0.05), f(x_l))."""
  smoothing = 0.1
  config = make_config(rounds=0 if where in ('supervised', 'online') else 1, teacher_steps=5,
                       weight=0.0 if where == 'online' else 1.0)
  config.label_smoothing = smoothing
  method = make(config, Supervised if where == 'supervised' else PseudoLabel)
  batch = moons_batch()
  state = init_state(method, batch)
  if where == 'student_phase':
    state = state.replace(step=jnp.int32(5))
  new_state, _ = update(method, state, batch)
  if where in ('supervised', 'online'):
    params, new_params, grads = state.params, new_state.params, written_grad(
        method, state.params, batch, smoothing=smoothing)
  elif where == 'teacher_phase':
    params, new_params = state.params['teacher'], new_state.params['teacher']
    grads = written_grad(method, params, batch, smoothing=smoothing)
  else:
    x_u = batch['unlabeled']['image']
    targets = jax.nn.one_hot(jnp.argmax(apply(method, state.params['teacher'], x_u), -1), 2)
    params, new_params = state.params['student'], new_state.params['student']
    grads = written_grad(method, params, batch, x_u, targets, smoothing=smoothing)
  assert_trees_close(new_params, sgd_step(params, grads))


def test_each_phase_decays_its_lr_over_its_own_length():
  """Cosine decay: the teacher's schedule spans teacher_steps, the student's a round (the last,
  longest one: 11 - 2 = 9 student steps in rounds of 4 and 5), each restarting per round."""
  config = make_config(rounds=2, teacher_steps=2)
  config.total_steps = 11
  config.optimizer.decay = 'cosine'
  method = make(config)
  cosine = lambda step, length: LR * (1 + np.cos(np.pi * step / length)) / 2
  for step in range(2):
    np.testing.assert_allclose(float(method.teacher_lr(step)), cosine(step, 2), rtol=1e-5)
  for step in range(5):
    np.testing.assert_allclose(float(method.student_lr(step)), cosine(step, 5), rtol=1e-5)
  # Through the updates: the lr a round's steps log restarts with the round.
  state, batch = init_state(method, moons_batch()), moons_batch()
  logged = []
  for step in range(11):
    state, metrics = update(method, state, batch)
    logged.append(float(metrics['lr']))
  np.testing.assert_allclose(logged, [cosine(s, 2) for s in range(2)] +
                             [cosine(s, 5) for s in range(4)] +
                             [cosine(s, 5) for s in range(5)], rtol=1e-5, atol=1e-7)


def test_a_new_round_takes_the_students_batch_statistics_too():
  """Noisy Student with batch norm: at a round switch the teacher becomes the student whole,
  weights and batch statistics, and the student's optimiser starts afresh."""
  config = make_config(rounds=2, teacher_steps=2)
  model = models.get_model('cnn', 2, features=(4,))
  method = PseudoLabel(config, model, base.DataInfo(num_classes=2, mean=(0.0,), std=(1.0,),
                                                    is_image=True))
  state = sharding.strip_boxes(method.init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 1))))
  bump = lambda tree: jax.tree.map(lambda x: x + 1.0, tree)
  state = state.replace(
      params={**state.params, 'student': bump(state.params['student'])},
      batch_stats={**state.batch_stats, 'student': bump(state.batch_stats['student'])})
  assert jax.tree.leaves(state.batch_stats['student'])   # the CNN has batch statistics
  new = method.start_round(state)
  assert_trees_equal(new.params['teacher'], state.params['student'])
  assert_trees_equal(new.batch_stats['teacher'], state.batch_stats['student'])
  assert_trees_equal(new.opt_state['student'], method.student_tx.init(state.params['student']))


# --------------------------------------------------------------------------------------------
# The supervised baseline's own state: randomness per step, batch statistics, EMA.


def supervised_cnn(**config_overrides):
  config = make_config(rounds=0)
  config.update(config_overrides)
  model = models.get_model('cnn', 2, features=(4,))
  info = base.DataInfo(num_classes=2, mean=(0.5,), std=(0.25,), is_image=True)
  return Supervised(config, model, info)


def image_batch(n=8, size=6, seed=0):
  rng = np.random.default_rng(seed)
  return {'labeled': {'image': jnp.asarray(rng.integers(0, 256, (n, size, size, 1)), jnp.uint8),
                      'label': jnp.asarray(np.arange(n) % 2, jnp.int32)}}


def test_supervised_step_draws_new_randomness_at_each_step():
  """The step's dropout comes from fold_in(state.rng, state.step): the same state gives the same
  update at the same step and another one at the next step (a key reused every step would
  drop the same units throughout training)."""
  config = make_config(rounds=0)
  model = models.get_model('mlp', 2, hidden_sizes=(8, 8), activation='tanh',
                           initializer='lecun', dropout_rate=0.5)
  method = Supervised(config, model, base.DataInfo(num_classes=2, mean=(0.0,), std=(1.0,),
                                                   is_image=False))
  batch = moons_batch()
  state = init_state(method, batch)
  at_0 = update(method, state, batch)[0].params
  assert_trees_equal(at_0, update(method, state, batch)[0].params)
  at_1 = update(method, state.replace(step=jnp.int32(1)), batch)[0].params
  differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                             at_0, at_1))
  assert max(differences) > 1e-4, differences


def test_supervised_step_keeps_the_batch_statistics_of_its_forward_pass():
  method, batch = supervised_cnn(), image_batch()
  state = sharding.strip_boxes(method.init(jax.random.PRNGKey(0), batch['labeled']['image'][:1]))
  new_state, _ = update(method, state, batch)
  _, expected = base.apply_train(method.model, state.params, state.batch_stats,
                                 method.prepare(batch['labeled']['image']), jax.random.PRNGKey(1))
  assert jax.tree.leaves(expected)
  assert_trees_close(new_state.batch_stats, expected)
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_state.batch_stats),
                                                   jax.tree.leaves(state.batch_stats)))


def test_supervised_ema_decay_is_warmed_up_then_capped_and_is_what_ema_evaluates():
  """The EMA decay is min(ema_decay, (t + 1) / (t + 10)): 1 / 10 at step 0, 4 / 13 at step 3,
  and ema_decay itself (0.9) late in training, where (t + 1) / (t + 10) alone would go to 1
  and freeze the EMA; for the weights and the batch statistics. eval_variables' 'ema' is that
  average, 'raw' the weights."""
  method, batch = supervised_cnn(ema_decay=0.9), image_batch()
  init = sharding.strip_boxes(method.init(jax.random.PRNGKey(0), batch['labeled']['image'][:1]))
  for step, decay in [(0, 1 / 10), (3, 4 / 13), (1000, 0.9)]:
    state = init.replace(step=jnp.int32(step))
    new_state, _ = update(method, state, batch)
    mix = lambda old, new, d=decay: jax.tree.map(lambda o, n: d * o + (1 - d) * n, old, new)
    assert not np.allclose(jax.tree.leaves(new_state.params)[0], jax.tree.leaves(state.params)[0])
    assert_trees_close(new_state.ema_params, mix(state.ema_params, new_state.params))
    assert_trees_close(new_state.ema_batch_stats, mix(state.ema_batch_stats,
                                                      new_state.batch_stats))
  evaluated = method.eval_variables(new_state)
  assert set(evaluated) == {'raw', 'ema'}
  assert_trees_equal(evaluated['ema']['params'], new_state.ema_params)
  assert_trees_equal(evaluated['ema']['batch_stats'], new_state.ema_batch_stats)
  assert_trees_equal(evaluated['raw']['params'], new_state.params)
  assert not np.allclose(jax.tree.leaves(new_state.ema_params)[0],
                         jax.tree.leaves(new_state.params)[0])


def test_predict_is_the_eval_mode_pass_on_the_normalised_images():
  """predict(variables, uint8 images) = the network in eval mode (running batch statistics) on
  (images / 255 - mean) / std, the input it trained on."""
  method, batch = supervised_cnn(), image_batch()
  state = sharding.strip_boxes(method.init(jax.random.PRNGKey(0), batch['labeled']['image'][:1]))
  state, _ = update(method, state, batch)   # running statistics away from their initial values
  variables = base.variables_of(state.params, state.batch_stats)
  images = batch['labeled']['image']
  x = (np.asarray(images, np.float32) / 255.0 - 0.5) / 0.25
  expected = method.model.apply(variables, jnp.asarray(x), train=False)
  assert_trees_close(method.predict(variables, images), expected)
  in_train_mode, _ = method.model.apply(variables, jnp.asarray(x), train=True,
                                        mutable=['batch_stats'])
  assert not np.allclose(in_train_mode, expected, atol=1e-3)


def test_supervised_logs_the_lr_its_step_applies():
  """Cosine decay over 6 steps, plain SGD: each step moves the weights by lr * grad, and the
  'lr' it logs is that lr (not the next step's)."""
  config = make_config(rounds=0)
  config.total_steps, config.optimizer.decay = 6, 'cosine'
  method, batch = make(config, Supervised), moons_batch()
  state = init_state(method, batch)
  for _ in range(4):
    grads = written_grad(method, state.params, batch)
    new_state, metrics = update(method, state, batch)
    applied = jax.tree.map(lambda old, new, g: (old - new) / g, state.params, new_state.params,
                           grads)
    kernel = applied['classifier']['kernel']
    np.testing.assert_allclose(kernel, float(metrics['lr']), rtol=1e-3)
    state = new_state
  assert float(metrics['lr']) < 0.5 * LR  # the schedule really decays
