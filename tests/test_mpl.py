"""Meta Pseudo Labels: the three feedback modes against their mathematical definitions."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import make_moons

from mpl import models, sharding, train
from mpl.errors import ConfigError
from mpl.methods import base
from mpl.methods.mpl import MPL
from jaxpr_util import HIGHEST, matmul_precisions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moons_config(arg='method=mpl,labels=6'):
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, 'configs/two_moons.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def plain_sgd(opt, lr):
  opt.update(dict(lr=lr, momentum=0.0, weight_decay=0.0, wait_steps=0, warmup_steps=0,
                  decay='constant', scale_lr_by_batch=False))


def make_method(feedback, *, student_lr=1e-3, teacher_lr=1.0, uda_weight=0.0, label_smoothing=0.0,
                pseudo_label='argmax', h_pass='paired', dropout_rate=0.0, dtype=jnp.float32,
                h_dtype='float32'):
  config = moons_config()
  config.mpl.feedback = feedback
  config.mpl.pseudo_label = pseudo_label
  config.mpl.h_pass = h_pass
  config.mpl.h_dtype = h_dtype
  config.mpl.uda_weight = uda_weight
  config.mpl.uda_ramp_steps = 1
  config.mpl.uda_threshold = 0.0
  config.label_smoothing = label_smoothing
  config.ema_decay = 0.0
  plain_sgd(config.mpl.student_optimizer, student_lr)
  plain_sgd(config.mpl.teacher_optimizer, teacher_lr)
  model = models.get_model('mlp', 2, hidden_sizes=(8, 8), activation='tanh',
                           initializer='lecun', dropout_rate=dropout_rate, dtype=dtype)
  info = base.DataInfo(num_classes=2, mean=(0.0,), std=(1.0,), is_image=False)
  return MPL(config, model, info)


def moons_batch(n_l=8, n_u=16, seed=0):
  x, y = make_moons(n_l + n_u, noise=0.1, random_state=seed)
  x = jnp.asarray(x, jnp.float32)
  return {'labeled': {'image': x[:n_l], 'label': jnp.asarray(y[:n_l], jnp.int32)},
          'unlabeled': {'image': x[n_l:]}}


def init_state(method, batch, seed=0):
  return sharding.strip_boxes(method.init(jax.random.PRNGKey(seed),
                                          batch['labeled']['image'][:1]))


def mlp_apply(method, params, x):
  return method.model.apply({'params': params}, x, train=False)


def labeled_loss(method, params, batch):
  logits = mlp_apply(method, params, batch['labeled']['image'])
  return jnp.mean(base.cross_entropy(logits, batch['labeled']['label']))


def test_first_order_h_matches_exact_inner_product():
  """h = f_old - f_new ~= eta_S <grad f(theta_S'), g_u> for a small student step."""
  eta = 2e-3  # the Taylor error is O(eta^2): 2.5% at 1e-2, 0.5% at 2e-3
  method = make_method('first_order', student_lr=eta)
  batch = moons_batch()
  state = init_state(method, batch)
  _, metrics = method.update(state, batch)

  teacher, student = state.params['teacher'], state.params['student']
  x_u = batch['unlabeled']['image']
  pseudo = jnp.argmax(mlp_apply(method, teacher, x_u), -1)
  g_u = jax.grad(lambda p: jnp.mean(base.cross_entropy(mlp_apply(method, p, x_u), pseudo)))(
      student)
  updated = jax.tree.map(lambda p, g: p - eta * g, student, g_u)
  grad_f_new = jax.grad(lambda p: labeled_loss(method, p, batch))(updated)
  inner = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad_f_new), jax.tree.leaves(g_u)))
  expected = eta * inner
  assert abs(float(expected)) > 1e-4  # a non-trivial step, far above float32 rounding
  np.testing.assert_allclose(float(metrics['h']), float(expected), rtol=1e-2)
  np.testing.assert_allclose(float(metrics['f_old'] - metrics['f_new']), float(metrics['h']))


def test_paired_h_measures_only_the_student_update_under_dropout():
  """With dropout, 'paired' h is 0 for a still student and linear in its lr; 'official' is not.

  The released measurement (f_old from the pass on concat(x_l, s(x_u)), f_new from a new pass
  with new dropout masks) gives h != 0 even when the student does not move: noise the teacher
  would learn from.
  """
  batch = moons_batch(n_l=64, n_u=64)

  def h(h_pass, eta):
    method = make_method('first_order', student_lr=eta, h_pass=h_pass, dropout_rate=0.5)
    _, metrics = method.update(init_state(method, batch), batch)
    return float(metrics['h'])

  assert h('paired', 0.0) == 0.0
  assert abs(h('official', 0.0)) > 1e-3
  # First order in eta: h(eta) / eta is the same at eta and 2 eta (up to the O(eta) Taylor term).
  eta = 2e-3
  slope, slope_2 = h('paired', eta) / eta, h('paired', 2 * eta) / (2 * eta)
  assert abs(slope) > 1e-2
  np.testing.assert_allclose(slope_2, slope, rtol=2e-2)


def test_f_old_comes_from_the_pass_each_h_pass_names():
  """'official': f_old is the CE of the x_l rows of the student's pass on concat(x_l, s(x_u))
  (with that pass's dropout key); 'paired': a pass on x_l alone with f_new's dropout key."""
  batch = moons_batch(n_l=16, n_u=32)
  x_l, y_l, x_u = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']
  for h_pass in ('official', 'paired'):
    method = make_method('first_order', student_lr=0.1, h_pass=h_pass, dropout_rate=0.5)
    state = init_state(method, batch)
    _, metrics = method.update(state, batch)
    # The update's keys, in its order: views, teacher, student, student (f_new), labels.
    _, _, student_rng, student_new_rng, _ = jax.random.split(
        jax.random.fold_in(state.rng, state.step), 5)
    student = state.params['student']

    def f_old(x, rng):
      logits = method.model.apply({'params': student}, x, train=True, rngs={'dropout': rng})
      return float(jnp.mean(base.cross_entropy(logits[:len(x_l)], y_l)))

    concat_pass = f_old(jnp.concatenate([x_l, x_u]), student_rng)
    labeled_pass = f_old(x_l, student_new_rng)
    expected, other = ((concat_pass, labeled_pass) if h_pass == 'official'
                       else (labeled_pass, concat_pass))
    np.testing.assert_allclose(float(metrics['f_old']), expected, rtol=1e-5)
    assert abs(float(metrics['f_old']) - other) > 1e-3   # the two passes do differ


def test_a_bfloat16_student_is_measured_in_float32_for_h():
  """With h_dtype 'float32', f_old and f_new of a bfloat16 student are its labeled losses before
  and after its (bfloat16) step computed in float32, and h = 0 exactly when it does not move;
  measured in bfloat16 ('model'), f is off by rounding errors as large as a small update's h."""
  batch = moons_batch(n_l=64, n_u=64)

  def run(h_dtype, eta):
    method = make_method('first_order', student_lr=eta, dropout_rate=0.0, dtype=jnp.bfloat16,
                         h_dtype=h_dtype)
    state = init_state(method, batch)
    new_state, metrics = method.update(state, batch)
    float32_net = method.model.clone(dtype=jnp.float32)

    def loss(params):   # at full float32 precision also where the default is TF32 (GPUs)
      with jax.default_matmul_precision('highest'):
        logits = float32_net.apply({'params': params}, batch['labeled']['image'], train=True)
      return float(jnp.mean(base.cross_entropy(logits, batch['labeled']['label'])))
    return (metrics, loss(state.params['student']), loss(new_state.params['student']))

  metrics, f_old, f_new = run('float32', 1e-2)
  np.testing.assert_allclose(float(metrics['f_old']), f_old, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['f_new']), f_new, rtol=1e-6)
  assert abs(f_old - f_new) > 1e-4   # the step moved the student
  assert float(run('float32', 0.0)[0]['h']) == 0.0
  metrics, f_old, f_new = run('model', 1e-2)
  assert abs(float(metrics['f_old']) - f_old) > 1e-4   # bfloat16 rounding of the losses
  assert abs(float(metrics['f_old']) - f_old) < 2e-2
  with pytest.raises(ConfigError, match='mpl.h_dtype'):
    make_method('first_order', h_dtype='bfloat16')


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_h_passes_alone_ask_for_full_float32_matmul_precision(dtype):
  """GPUs (TF32) and TPUs (one bfloat16 pass) round float32 matmul inputs by default: the two
  labeled passes that measure h ask for 'highest' (each of the MLP's 3 layers in each pass, and
  under 'exact' the 5 matmuls of f_new's backward), nothing else in the step does; h_dtype
  'model' leaves every precision at the default, and so does a global setting (kept, not reset)."""
  batch = moons_batch()
  for feedback, h_dtype, expected in (('first_order', 'float32', 2 * 3), ('exact', 'float32', 11),
                                      ('first_order', 'model', 0), ('exact', 'model', 0)):
    method = make_method(feedback, dtype=dtype, h_dtype=h_dtype)
    found = matmul_precisions(jax.make_jaxpr(method.update)(init_state(method, batch), batch))
    assert len(found) > expected                  # the other passes exist ...
    assert found.count(HIGHEST) == expected, (feedback, h_dtype)
    assert found.count(None) == len(found) - expected   # ... at the default precision
  method = make_method('first_order', dtype=dtype, h_dtype='model')
  with jax.default_matmul_precision('highest'):   # a user's global setting reaches every pass
    found = matmul_precisions(jax.make_jaxpr(method.update)(init_state(method, batch), batch))
  assert found and all(p == HIGHEST for p in found)


def bilevel_objective(method, teacher, student, batch):
  """w CE_l(T) + f(theta_S - eta grad_S CE(softmax(T(x_u)), S(x_u))): what `exact` minimises
  (w = mpl.teacher_labeled_weight)."""
  eta = method.config.mpl.student_optimizer.lr
  x_u = batch['unlabeled']['image']
  soft = jax.nn.softmax(mlp_apply(method, teacher, x_u))
  g_u = jax.grad(lambda p: jnp.mean(base.soft_cross_entropy(mlp_apply(method, p, x_u), soft)))(
      student)
  updated = jax.tree.map(lambda p, g: p - eta * g, student, g_u)
  teacher_labeled = jnp.mean(base.cross_entropy(
      mlp_apply(method, teacher, batch['labeled']['image']), batch['labeled']['label']))
  weight = method.config.mpl.teacher_labeled_weight
  return weight * teacher_labeled + labeled_loss(method, updated, batch)


@pytest.mark.parametrize('teacher_labeled_weight', [1.0, 0.0])
def test_exact_teacher_gradient_matches_finite_differences(teacher_labeled_weight):
  """At weight 0 the teacher learns from the student's feedback alone (the paper's section 2)."""
  method = make_method('exact', student_lr=0.5, teacher_lr=1.0)
  method.config.mpl.teacher_labeled_weight = teacher_labeled_weight
  batch = moons_batch()
  state = init_state(method, batch)
  new_state, _ = method.update(state, batch)
  teacher = state.params['teacher']
  # Plain SGD with lr 1: the teacher's step is minus its gradient.
  grad = jax.tree.map(lambda old, new: old - new, teacher, new_state.params['teacher'])

  objective = lambda t: bilevel_objective(method, t, state.params['student'], batch)
  with jax.default_matmul_precision('highest'):
    for i in range(4):
      leaves, treedef = jax.tree.flatten(teacher)
      keys = jax.random.split(jax.random.PRNGKey(i), len(leaves))
      direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
      eps = 1e-2
      plus = objective(jax.tree.map(lambda t, d: t + eps * d, teacher, direction))
      minus = objective(jax.tree.map(lambda t, d: t - eps * d, teacher, direction))
      numeric = (plus - minus) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad),
                                                    jax.tree.leaves(direction)))
      np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2, atol=2e-4)


def test_exact_student_meta_gradient_is_not_trivial():
  """The second-order term changes the teacher's step (else `exact` would be plain CE_l)."""
  batch = moons_batch()
  exact = make_method('exact', student_lr=0.5)
  state = init_state(exact, batch)
  with_feedback = exact.update(state, batch)[0].params['teacher']
  only_labeled = jax.grad(lambda t: jnp.mean(base.cross_entropy(
      mlp_apply(exact, t, batch['labeled']['image']), batch['labeled']['label'])))(
          state.params['teacher'])
  plain = jax.tree.map(lambda t, g: t - g, state.params['teacher'], only_labeled)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(with_feedback),
                                                            jax.tree.leaves(plain)))
  assert diff > 1e-4


def test_official_release_teacher_term_has_zero_gradient():
  """official_release's teacher update equals a teacher trained on CE_l + UDA alone."""
  method = make_method('official_release', student_lr=0.5, teacher_lr=1.0, uda_weight=1.0,
                       label_smoothing=0.1)
  batch = moons_batch()
  state = init_state(method, batch).replace(step=jnp.int32(5))  # past the 1-step UDA ramp
  new_state, metrics = method.update(state, batch)
  assert float(metrics['uda_weight']) == 1.0
  assert abs(float(metrics['h'] - metrics['baseline'])) > 1e-4  # the coefficient is not zero

  x_l, y_l, x_u = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']

  def uda_only(t):
    labeled = jnp.mean(base.cross_entropy(mlp_apply(method, t, x_l), y_l, 0.1))
    logits_u = mlp_apply(method, t, x_u)  # no augmentation on points: weak == strong view
    target = jax.nn.softmax(jax.lax.stop_gradient(logits_u) / method.config.mpl.uda_temperature)
    return labeled + jnp.mean(base.soft_cross_entropy(logits_u, target))

  grad = jax.grad(uda_only)(state.params['teacher'])
  expected = jax.tree.map(lambda t, g: t - g, state.params['teacher'], grad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_state.params['teacher'], expected)


@pytest.mark.parametrize('previous_baseline, direction', [(-1000.0, 1), (1000.0, -1)])
def test_teacher_moves_pseudo_label_probability_with_the_feedback_sign(previous_baseline,
                                                                       direction):
  """coefficient h - b > 0 raises p(yhat) under the teacher; < 0 lowers it."""
  method = make_method('first_order', student_lr=0.1, teacher_lr=1e-5)
  batch = moons_batch(n_u=8)
  state = init_state(method, batch)
  state = state.replace(method_state={'baseline': jnp.float32(previous_baseline)})
  new_state, metrics = method.update(state, batch)
  coefficient = float(metrics['h'] - metrics['baseline'])
  assert np.sign(coefficient) == direction

  x_u = batch['unlabeled']['image']
  before = jax.nn.log_softmax(mlp_apply(method, state.params['teacher'], x_u))
  after = jax.nn.log_softmax(mlp_apply(method, new_state.params['teacher'], x_u))
  pseudo = jnp.argmax(before, -1)
  change = jnp.take_along_axis(after - before, pseudo[:, None], -1).sum()
  assert np.sign(float(change)) == direction


def test_baseline_is_a_moving_average_of_h():
  method = make_method('first_order', student_lr=0.1)
  batch = moons_batch()
  state = init_state(method, batch)
  state = state.replace(method_state={'baseline': jnp.float32(0.5)})
  _, metrics = method.update(state, batch)
  np.testing.assert_allclose(float(metrics['baseline']), 0.99 * 0.5 + 0.01 * float(metrics['h']),
                             rtol=1e-6)


def test_sampled_pseudo_labels_vary_from_step_to_step():
  method = make_method('first_order', pseudo_label='sample')
  batch = moons_batch(n_u=16)
  state = init_state(method, batch)
  accuracies = [float(method.update(state.replace(step=jnp.int32(s)),
                                    {**batch, 'unlabeled': {**batch['unlabeled'],
                                                            'label': jnp.zeros(16, jnp.int32)}}
                                    )[1]['pseudo_label_accuracy']) for s in range(40)]
  # Sampled labels vary from step to step (argmax labels would not).
  assert len(set(accuracies)) > 1


def test_mpl_resume_reproduces_uninterrupted_run(tmp_path):
  """Baseline, both optimiser states and the EMA survive a preemption."""
  def config():
    c = moons_config('method=mpl,labels=6')
    c.total_steps, c.checkpoint_every, c.eval_every, c.log_every = 30, 15, 15, 5
    c.ema_decay = 0.9
    return c

  train.train_and_evaluate(config(), str(tmp_path / 'straight'))
  train.train_and_evaluate(config(), str(tmp_path / 'resumed'), should_stop=lambda s: s == 15)
  train.train_and_evaluate(config(), str(tmp_path / 'resumed'))

  def final_state(workdir):
    with train.Checkpoints(str(workdir), keep=1, read_only=True) as checkpoints:
      return checkpoints.restore_numpy()

  a, b = final_state(tmp_path / 'straight'), final_state(tmp_path / 'resumed')
  for key in ('params', 'opt_state', 'ema_params', 'method_state'):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a[key], b[key])
  assert float(a['method_state']['baseline']) != 0.0


def test_finetune_stage_follows_mpl_and_resumes(tmp_path):
  def config():
    c = moons_config('method=mpl,labels=6,runlocal')
    c.total_steps, c.checkpoint_every, c.eval_every = 10, 5, 5
    c.finetune.steps, c.finetune.batch_size, c.finetune.lr = 6, 64, 0.5
    return c

  # Preempted inside the finetune stage (step 10 + 3), then resumed.
  calls = []
  def stop_in_finetune(step):
    calls.append(step)
    return len(calls) == 13
  stopped = train.train_and_evaluate(config(), str(tmp_path), should_stop=stop_in_finetune)
  assert stopped['stopped_at'] == 13
  assert os.path.exists(tmp_path / 'finetune' / 'checkpoints')
  summary = train.train_and_evaluate(config(), str(tmp_path))
  assert summary['steps'] == 16 and summary['finetune_steps'] == 6
  assert summary['before_finetune']['steps'] == 10
  assert summary['final']['accuracy'] == summary['history'][-1]['raw']['accuracy']
  assert os.path.exists(tmp_path / 'summary.json')
  # 'final' and 'history' are the finetune stage's (its own evaluations), not the MPL stage's.
  assert summary['history'] != summary['before_finetune']['history']
  finetune_evals = [row for row in map(json.loads, open(tmp_path / 'finetune' / 'metrics.jsonl'))
                    if 'eval/raw_accuracy' in row]
  assert summary['final']['accuracy'] == pytest.approx(finetune_evals[-1]['eval/raw_accuracy'])
  assert [h['raw']['accuracy'] for h in summary['history']] == pytest.approx(
      [row['eval/raw_accuracy'] for row in finetune_evals])
  # The resumed finetune stage continues exactly: the same network and evaluations as a run
  # that was never stopped.
  straight = train.train_and_evaluate(config(), str(tmp_path / 'straight'))
  assert summary['history'] == straight['history']
  finetuned = []
  for workdir in (tmp_path, tmp_path / 'straight'):
    with train.Checkpoints(str(workdir / 'finetune'), keep=1, read_only=True) as checkpoints:
      finetuned.append(checkpoints.restore_numpy()['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), *finetuned)

  # More MPL steps would leave the finetuned student stale: refused before training.
  longer = config()
  longer.total_steps = 12
  with pytest.raises(ConfigError, match='would be stale'):
    train.train_and_evaluate(longer, str(tmp_path))


def test_teacher_with_its_own_architecture_is_evaluated_with_it(tmp_path):
  """mpl.teacher_model: a wider teacher than the student; evaluation must use each network."""
  c = moons_config('method=mpl,labels=6,runlocal')
  c.total_steps, c.eval_every, c.checkpoint_every = 4, 4, 4
  c.mpl.teacher_model = type(c.model)(dict(name='mlp', hidden_sizes=(16, 16),
                                            activation='sigmoid'))
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert 'accuracy_teacher' in summary['final']


@pytest.mark.parametrize('feedback', ['first_order', 'exact', 'official_release'])
def test_recomputing_the_teacher_forward_changes_memory_not_results(feedback):
  """mpl.recompute_teacher reruns the teacher's forward for its backward (jax.checkpoint)
  instead of keeping its activations through the student's step: the same new state."""
  batch = moons_batch()
  results = {}
  for recompute in (False, True):
    method = make_method(feedback, student_lr=0.1, uda_weight=1.0, label_smoothing=0.1)
    method.config.mpl.recompute_teacher = recompute
    state = init_state(method, batch)
    jaxpr = str(jax.make_jaxpr(method.update)(state, batch))
    assert ('checkpoint' in jaxpr or 'remat' in jaxpr) == recompute
    results[recompute] = jax.jit(method.update)(state, batch)
  for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


# -- The teacher's and the student's updates written out by hand -------------------------------
# (Each test below pins down a part of `MPL.update` that the ones above leave free: the scale of
# the first_order feedback term, the sampled labels' distribution, batch statistics, UDA's
# mask / views / ramp, and the student's label smoothing.)


def sgd_step(params, grads, lr=1.0):
  return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
               actual, expected)


def max_abs_difference(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b)))


def test_first_order_teacher_step_is_minus_the_gradient_of_the_teacher_loss():
  """first_order, plain SGD lr 1: the teacher's step is minus the gradient of
    w_l CE_l(smoothed) + lambda_uda UDA + sg(h - b) * mean_u CE(yhat, T(s(x_u))),
  b the baseline already updated with this step's h. A baseline decay of 0.5 from a baseline of 0
  makes the coefficient h / 2 (h if b were updated after it is subtracted), of the same order as
  the other terms, so neither the feedback's scale nor the labeled weight can hide."""
  eta, w_l, lambda_uda, decay = 0.3, 0.3, 0.7, 0.5
  method = make_method('first_order', student_lr=eta, teacher_lr=1.0, uda_weight=lambda_uda,
                       label_smoothing=0.1)
  c = method.config.mpl
  c.teacher_labeled_weight, c.baseline_decay = w_l, decay
  batch = moons_batch()
  state = init_state(method, batch).replace(step=jnp.int32(5))  # past the 1-step UDA ramp
  new_state, metrics = method.update(state, batch)

  x_l, y_l, x_u = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']
  teacher, student = state.params['teacher'], state.params['student']
  pseudo = jnp.argmax(mlp_apply(method, teacher, x_u), -1)
  g_u = jax.grad(lambda p: jnp.mean(base.cross_entropy(mlp_apply(method, p, x_u), pseudo)))(
      student)
  h = labeled_loss(method, student, batch) - labeled_loss(method, sgd_step(student, g_u, eta),
                                                          batch)
  baseline = decay * 0.0 + (1 - decay) * h
  coefficient = h - baseline
  assert abs(float(coefficient)) > 0.05
  np.testing.assert_allclose(float(metrics['h']), float(h), rtol=1e-4)
  np.testing.assert_allclose(float(metrics['baseline']), float(baseline), rtol=1e-4)

  def teacher_loss(t):
    labeled = jnp.mean(base.cross_entropy(mlp_apply(method, t, x_l), y_l, 0.1))
    logits_u = mlp_apply(method, t, x_u)  # weak == strong view on points; threshold 0
    target = jax.nn.softmax(jax.lax.stop_gradient(logits_u) / c.uda_temperature)
    uda = jnp.mean(base.soft_cross_entropy(logits_u, target))
    feedback = coefficient * jnp.mean(base.cross_entropy(logits_u, pseudo))
    return w_l * labeled + lambda_uda * uda + feedback

  expected = sgd_step(teacher, jax.grad(teacher_loss)(teacher))
  assert_trees_close(new_state.params['teacher'], expected)
  np.testing.assert_allclose(float(metrics['loss_teacher']), float(teacher_loss(teacher)),
                             rtol=1e-5)


def _sampling_teacher_and_points(wanted):
  """An MPL method sampling its pseudo labels, a batch of one unlabeled point, and its state
  with a sharper teacher (classifier x 8); then the two-moons points whose p(class 0) under
  that teacher are nearest each of `wanted`."""
  method = make_method('first_order', pseudo_label='sample', student_lr=0.1)
  batch = moons_batch(n_l=8, n_u=1)
  state = init_state(method, batch)
  teacher = dict(state.params['teacher'])
  teacher['classifier'] = jax.tree.map(lambda w: 8.0 * w, teacher['classifier'])
  state = state.replace(params={**state.params, 'teacher': teacher})
  candidates = jnp.asarray(make_moons(400, noise=0.3, random_state=1)[0], jnp.float32)
  p_candidates = jax.nn.softmax(mlp_apply(method, teacher, candidates))[:, 0]
  points = candidates[np.array([int(jnp.argmin(jnp.abs(p_candidates - w))) for w in wanted])]
  return method, batch, state, teacher, points


def test_sampled_pseudo_labels_have_each_examples_teacher_probabilities():
  """Over many steps (keys), the label sampled for an unlabeled point is class 0 with the
  teacher's softmax probability of that point, for points the teacher sees very differently.
  One unlabeled point per batch, so `pseudo_label_accuracy` against label 0 reads its label."""
  wanted = np.array([0.08, 0.3, 0.7, 0.92])
  method, batch, state, teacher, points = _sampling_teacher_and_points(wanted)
  p0 = np.asarray(jax.nn.softmax(mlp_apply(method, teacher, points))[:, 0])
  np.testing.assert_allclose(p0, wanted, atol=0.03)

  def label_is_0(point, step):
    b = {**batch, 'unlabeled': {'image': point[None], 'label': jnp.zeros(1, jnp.int32)}}
    return method.update(state.replace(step=step), b)[1]['pseudo_label_accuracy']

  n = 500
  per_step = jax.jit(jax.vmap(jax.vmap(label_is_0, (None, 0)), (0, None)))(
      points, jnp.arange(n, dtype=jnp.int32))
  frequency = np.asarray(per_step).mean(axis=1)
  # 4.5 standard errors (0.05 to 0.09); labels drawn from -logits (frequency 1 - p) or
  # uniformly (0.5) would be 0.2 to 0.84 away.
  np.testing.assert_array_less(np.abs(frequency - p0), 4.5 * np.sqrt(p0 * (1 - p0) / n))


def test_each_network_keeps_the_batch_statistics_of_its_own_training_pass():
  """A batch-norm CNN: the new teacher statistics are those of its pass on
  concat(x_l, w(x_u), s(x_u)), the student's those of its pass on concat(x_l, s(x_u)); f_new is
  the updated student's training-mode CE on x_l (batch statistics of x_l itself: the running
  statistics it is given do not enter it)."""
  config = moons_config()
  config.mpl.update(dict(feedback='first_order', pseudo_label='argmax', uda_weight=1.0,
                         uda_ramp_steps=1, uda_threshold=0.0))
  config.ema_decay = 0.0
  plain_sgd(config.mpl.student_optimizer, 0.5)
  plain_sgd(config.mpl.teacher_optimizer, 0.5)
  model = models.get_model('cnn', 3, features=(4,))
  info = base.DataInfo(num_classes=3, mean=(0.0,), std=(1.0,), is_image=True)
  method = MPL(config, model, info)
  rng = np.random.RandomState(0)
  x_l, x_w = (jnp.asarray(rng.normal(size=(n, 6, 6, 1)), jnp.float32) for n in (4, 6))
  x_s = 2.0 * x_w[::-1] + 1.0   # a strong view unlike the weak one: other statistics
  y_l = jnp.asarray([0, 1, 2, 0], jnp.int32)
  method.views = lambda rng, batch: (x_l, x_w, x_s)
  batch = {'labeled': {'image': x_l, 'label': y_l}, 'unlabeled': {'image': x_w}}
  state = sharding.strip_boxes(method.init(jax.random.PRNGKey(0), x_l[:1]))
  state = state.replace(step=jnp.int32(3))
  new_state, metrics = jax.jit(method.update)(state, batch)

  def train_pass(name, params, x):
    return base.apply_train(model, params, state.batch_stats[name], x, jax.random.PRNGKey(0))

  _, teacher_stats = train_pass('teacher', state.params['teacher'],
                                jnp.concatenate([x_l, x_w, x_s]))
  _, student_stats = train_pass('student', state.params['student'], jnp.concatenate([x_l, x_s]))
  assert max_abs_difference(teacher_stats, student_stats) > 1e-2
  assert max_abs_difference(teacher_stats, state.batch_stats['teacher']) > 1e-2
  assert_trees_close(new_state.batch_stats['teacher'], teacher_stats)
  assert_trees_close(new_state.batch_stats['student'], student_stats)

  new_student = new_state.params['student']
  logits, _ = train_pass('student', new_student, x_l)
  np.testing.assert_allclose(float(metrics['f_new']),
                             float(jnp.mean(base.cross_entropy(logits, y_l))), rtol=1e-5)
  logits_before, _ = train_pass('student', state.params['student'], x_l)
  np.testing.assert_allclose(float(metrics['f_old']),
                             float(jnp.mean(base.cross_entropy(logits_before, y_l))), rtol=1e-5)
  assert abs(float(metrics['h'])) > 1e-3


def test_without_a_ramp_the_uda_weight_is_full_from_the_first_step():
  method = make_method('first_order', uda_weight=2.0)
  method.config.mpl.uda_ramp_steps = 0
  batch = moons_batch(n_u=16)
  _, metrics = method.update(init_state(method, batch), batch)
  assert float(metrics['uda_weight']) == 2.0


def test_uda_masks_on_the_weak_view_predicts_the_strong_one_and_ramps_up():
  """Distinct weak and strong views: the target is the sharpened teacher softmax on w(x_u), kept
  where its maximum reaches the threshold 0.6, predicted from s(x_u); the UDA weight is
  uda_weight * min(1, t / ramp). Student lr 0 makes h = 0, hence no feedback term: the teacher's
  step (SGD lr 1) is minus the gradient of CE_l + lambda_uda(t) UDA."""
  lambda_uda, ramp = 2.0, 8
  method = make_method('first_order', student_lr=0.0, teacher_lr=1.0, uda_weight=lambda_uda)
  c = method.config.mpl
  c.uda_threshold, c.uda_ramp_steps, c.uda_temperature = 0.6, ramp, 0.5
  batch = moons_batch(n_u=16)
  x_l, y_l, x_w = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']
  x_s = x_w[::-1] + 0.5
  method.views = lambda rng, batch: (x_l, x_w, x_s)
  state = init_state(method, batch)
  teacher = state.params['teacher']

  def uda(t):
    target = jax.nn.softmax(jax.lax.stop_gradient(mlp_apply(method, t, x_w)) / c.uda_temperature)
    mask = jnp.max(target, -1) >= 0.6
    return jnp.mean(mask * base.soft_cross_entropy(mlp_apply(method, t, x_s), target)), mask

  uda_value, mask = uda(teacher)
  assert 0.2 < float(jnp.mean(mask)) < 0.8   # the threshold does mask some examples out

  def teacher_loss(t, weight):
    labeled = jnp.mean(base.cross_entropy(mlp_apply(method, t, x_l), y_l))
    return labeled + weight * uda(t)[0]

  for step, weight in ((0, 0.0), (2, lambda_uda * 2 / ramp)):
    new_state, metrics = method.update(state.replace(step=jnp.int32(step)), batch)
    assert float(metrics['h']) == 0.0
    np.testing.assert_allclose(float(metrics['uda_weight']), weight, rtol=1e-6)
    np.testing.assert_allclose(float(metrics['loss_uda']), float(uda_value), rtol=1e-5)
    np.testing.assert_allclose(float(metrics['uda_mask_rate']), float(jnp.mean(mask)))
    expected = sgd_step(teacher, jax.grad(teacher_loss)(teacher, weight))
    assert_trees_close(new_state.params['teacher'], expected)


def test_student_learns_label_smoothed_pseudo_labels():
  """mpl.student_label_smoothing 0.15: the student's step (SGD lr 1) is minus the gradient of
  CE(0.85 one_hot(yhat) + 0.15 / K, S(s(x_u))), yhat = argmax T(s(x_u)): labels and inputs both
  from the strong view (distinct from the weak one here, and labelled otherwise by the teacher
  on some examples)."""
  method = make_method('first_order', student_lr=1.0)
  method.config.mpl.student_label_smoothing = 0.15
  batch = moons_batch()
  x_l, x_w = batch['labeled']['image'], batch['unlabeled']['image']
  x_s = -x_w[::-1]
  method.views = lambda rng, batch: (x_l, x_w, x_s)
  state = init_state(method, batch)
  new_state, metrics = method.update(state, batch)

  x_u = x_s
  pseudo = jnp.argmax(mlp_apply(method, state.params['teacher'], x_u), -1)
  assert 0 < int(jnp.sum(pseudo)) < len(pseudo)   # both classes among the pseudo labels
  on_weak = jnp.argmax(mlp_apply(method, state.params['teacher'], x_w), -1)
  assert bool(jnp.any(on_weak != pseudo))   # labels from the weak view would differ
  targets = 0.85 * jax.nn.one_hot(pseudo, 2) + 0.15 / 2
  student_loss = lambda p: jnp.mean(base.soft_cross_entropy(mlp_apply(method, p, x_u), targets))
  student = state.params['student']
  np.testing.assert_allclose(float(metrics['loss_student']), float(student_loss(student)),
                             rtol=1e-5)
  assert_trees_close(new_state.params['student'],
                     sgd_step(student, jax.grad(student_loss)(student)))


def test_the_ema_follows_the_student():
  """ema_decay 0.99: after the first update (step 0, decay min(0.99, 1 / 10) = 0.1) the EMA is
  0.1 x the initial student + 0.9 x the updated student, not the teacher's."""
  method = make_method('first_order', student_lr=1.0)
  method.ema_decay = 0.99
  batch = moons_batch()
  state = init_state(method, batch)
  new_state, _ = method.update(state, batch)
  old, new = state.params['student'], new_state.params['student']
  assert max_abs_difference(old, new) > 1e-3 and max_abs_difference(new, new_state.params[
      'teacher']) > 1e-3
  assert_trees_close(new_state.ema_params, jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, old, new))


# -- Parts of the update the tests above leave free (a mutation audit) -------------------------


def test_uda_mask_keeps_a_sharpened_confidence_equal_to_the_threshold():
  """METHODS.md section 4, written out with numbers: q = softmax(z_w / tau); an example counts
  where max(q) >= threshold (equal logits give q = 1/2 exactly: kept at threshold 0.5), the
  confidence is that of the sharpened q (0.599 for logits (0.2, 0) at tau 0.5, 0.550 unsharpened:
  kept at 0.58), and the loss sums CE(q, z_s) (z_s not sharpened) over kept examples divided by
  the whole batch."""
  from mpl.methods.mpl import uda_loss  # pylint: disable=g-import-not-at-top
  weak = np.array([[0.0, 0.0], [2.0, 0.0], [0.2, 0.0]], np.float32)
  strong = np.array([[1.0, -0.5], [0.3, 0.4], [-1.0, 0.7]], np.float32)
  tau = 0.5
  q = np.exp(weak / tau) / np.exp(weak / tau).sum(-1, keepdims=True)
  log_p = strong - np.log(np.exp(strong).sum(-1, keepdims=True))
  ce = -(q * log_p).sum(-1)
  for threshold, kept in ((0.5, [1, 1, 1]), (0.58, [0, 1, 1]), (0.9, [0, 1, 0])):
    loss, rate = uda_loss(jnp.asarray(weak), jnp.asarray(strong), tau, threshold)
    kept = np.array(kept, np.float32)
    np.testing.assert_allclose(float(rate), kept.mean(), err_msg=str(threshold))
    np.testing.assert_allclose(float(loss), (kept * ce).sum() / 3, rtol=1e-5,
                               err_msg=str(threshold))


def test_official_release_student_learns_soft_labels_and_h_is_new_minus_old():
  """official_release, as the released code: the student's step (SGD lr 1) is minus the gradient
  of CE(softmax(T(s(x_u))), S(s(x_u))) with the soft labels (not hard ones), and its h is
  f_new - f_old (the reverse of the paper's sign), which the baseline averages (decay 0.99)."""
  method = make_method('official_release', student_lr=1.0)
  batch = moons_batch()
  state = init_state(method, batch).replace(method_state={'baseline': jnp.float32(0.5)})
  new_state, metrics = method.update(state, batch)

  x_u = batch['unlabeled']['image']
  teacher, student = state.params['teacher'], state.params['student']
  soft = jax.nn.softmax(mlp_apply(method, teacher, x_u))
  assert float(jnp.max(soft)) < 0.9   # far from one-hot labels
  student_loss = lambda p: jnp.mean(base.soft_cross_entropy(mlp_apply(method, p, x_u), soft))
  expected = sgd_step(student, jax.grad(student_loss)(student))
  assert_trees_close(new_state.params['student'], expected)

  h = labeled_loss(method, expected, batch) - labeled_loss(method, student, batch)
  assert abs(float(h)) > 1e-3
  np.testing.assert_allclose(float(metrics['h']), float(h), rtol=1e-4)
  np.testing.assert_allclose(float(metrics['baseline']), 0.99 * 0.5 + 0.01 * float(h), rtol=1e-5)


def test_each_smoothing_reaches_only_its_own_loss():
  """Three targets in one step: the student learns 0.7 one_hot(yhat) + 0.15
  (mpl.student_label_smoothing 0.3), the teacher's labeled CE uses 0.9 one_hot(y) + 0.05
  (label_smoothing 0.1), and its feedback term is sg(h - b) * CE(one_hot(yhat), T(s(x_u))) with
  the hard label, the one REINFORCE scores (METHODS.md section 6); h is measured without
  smoothing. Plain SGD (teacher lr 1), baseline decay 0.5 from 0, no UDA."""
  eta = 0.3
  method = make_method('first_order', student_lr=eta, teacher_lr=1.0, label_smoothing=0.1)
  method.config.mpl.student_label_smoothing = 0.3
  method.config.mpl.baseline_decay = 0.5
  batch = moons_batch()
  state = init_state(method, batch)
  new_state, metrics = method.update(state, batch)

  x_l, y_l, x_u = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']
  teacher, student = state.params['teacher'], state.params['student']
  pseudo = jax.nn.one_hot(jnp.argmax(mlp_apply(method, teacher, x_u), -1), 2)
  student_targets = 0.7 * pseudo + 0.15
  student_loss = lambda p: jnp.mean(base.soft_cross_entropy(mlp_apply(method, p, x_u),
                                                            student_targets))
  new_student = sgd_step(student, jax.grad(student_loss)(student), eta)
  assert_trees_close(new_state.params['student'], new_student)
  h = labeled_loss(method, student, batch) - labeled_loss(method, new_student, batch)
  coefficient = h - 0.5 * h
  assert abs(float(coefficient)) > 0.02
  np.testing.assert_allclose(float(metrics['h']), float(h), rtol=1e-4)

  labeled_targets = 0.9 * jax.nn.one_hot(y_l, 2) + 0.05

  def teacher_loss(t):
    labeled = jnp.mean(base.soft_cross_entropy(mlp_apply(method, t, x_l), labeled_targets))
    return labeled + coefficient * jnp.mean(base.soft_cross_entropy(mlp_apply(method, t, x_u),
                                                                    pseudo))

  expected = sgd_step(teacher, jax.grad(teacher_loss)(teacher))
  assert_trees_close(new_state.params['teacher'], expected)


def test_logged_metrics_measure_what_they_are_named():
  """A run is read from its log: lr_teacher / lr_student are each network's lr (0.5, 0.3 here),
  *_grad_norm the global norm of each network's gradient (the SGD step / lr), loss_teacher_labeled
  the teacher's smoothed CE_l before its weight (0.4), loss_mpl the feedback term
  sg(h - b) * CE(yhat, T(s(x_u))), loss_teacher their weighted sum, and pseudo_label_accuracy the
  accuracy of the labels the student learns (from the strong view, distinct here)."""
  eta_t, eta_s, w_l = 0.5, 0.3, 0.4
  method = make_method('first_order', student_lr=eta_s, teacher_lr=eta_t, label_smoothing=0.1)
  method.config.mpl.teacher_labeled_weight = w_l
  batch = moons_batch()
  x_l, y_l, x_w = batch['labeled']['image'], batch['labeled']['label'], batch['unlabeled']['image']
  x_s = -x_w[::-1]
  method.views = lambda rng, batch: (x_l, x_w, x_s)
  y_u = jnp.asarray(make_moons(48, noise=0.1, random_state=0)[1][8:24], jnp.int32)
  batch = {**batch, 'unlabeled': {'image': x_w, 'label': y_u}}
  state = init_state(method, batch)
  new_state, metrics = method.update(state, batch)

  np.testing.assert_allclose(float(metrics['lr_teacher']), eta_t, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['lr_student']), eta_s, rtol=1e-6)
  for name, lr in (('teacher', eta_t), ('student', eta_s)):
    step = jax.tree.map(lambda a, b: (a - b) / lr, state.params[name], new_state.params[name])
    norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(step)))
    np.testing.assert_allclose(float(metrics[f'{name}_grad_norm']), norm, rtol=1e-3)

  teacher = state.params['teacher']
  labeled = jnp.mean(base.soft_cross_entropy(mlp_apply(method, teacher, x_l),
                                             0.9 * jax.nn.one_hot(y_l, 2) + 0.05))
  pseudo = jnp.argmax(mlp_apply(method, teacher, x_s), -1)
  assert bool(jnp.any(pseudo != jnp.argmax(mlp_apply(method, teacher, x_w), -1)))
  feedback = (metrics['h'] - metrics['baseline']) * jnp.mean(
      base.cross_entropy(mlp_apply(method, teacher, x_s), pseudo))
  assert abs(float(feedback)) > 1e-5
  np.testing.assert_allclose(float(metrics['loss_teacher_labeled']), float(labeled), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss_mpl']), float(feedback), rtol=1e-4)
  np.testing.assert_allclose(float(metrics['loss_teacher']), float(w_l * labeled + feedback),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics['pseudo_label_accuracy']),
                             float(jnp.mean(pseudo == y_u)))


def test_sampled_pseudo_labels_follow_the_teachers_unsharpened_softmax():
  """pseudo_label 'sample' draws yhat ~ softmax(T(s(x_u))) itself: 16384 copies of one point with
  p(class 0) = 0.3 in one step give a class-0 frequency within 5 standard errors (0.018) of
  0.3. A draw from a sharpened softmax (the UDA temperature 0.7: 0.23) or a flattened one would
  give the teacher's REINFORCE term labels of other probabilities than the ones it scores."""
  method, batch, state, teacher, (point,) = _sampling_teacher_and_points([0.3])
  p0 = float(jax.nn.softmax(mlp_apply(method, teacher, point[None]))[0, 0])
  assert abs(p0 - 0.3) < 0.03
  n = 16384
  b = {**batch, 'unlabeled': {'image': jnp.tile(point[None], (n, 1)),
                              'label': jnp.zeros(n, jnp.int32)}}
  frequency = float(method.update(state, b)[1]['pseudo_label_accuracy'])
  assert abs(frequency - p0) < 5 * np.sqrt(p0 * (1 - p0) / n)


def test_accuracy_is_the_fraction_of_argmax_predictions_equal_to_the_labels():
  """base.accuracy (the train_accuracy every method logs): the top class of each row against its
  label, averaged over the batch (2 of 4 here)."""
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [4.0, 0.0, 1.0]])
  np.testing.assert_allclose(float(base.accuracy(logits, jnp.array([0, 1, 0, 2]))), 0.5)
