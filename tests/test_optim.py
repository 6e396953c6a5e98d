"""Schedules, optimiser and EMA of the official MPL recipe (mpl/optim.py, mpl/methods/base.py).

Expected values are written out by hand, or computed by a plain numpy Nesterov SGD, from the
official code (google-research meta_pseudo_labels): `common_utils.get_learning_rate`,
`tf.train.MomentumOptimizer(momentum=0.9, use_nesterov=True)` on `loss + wd * l2_loss(non-BN
variables)` with `tf.clip_by_global_norm` on the gradients, and `common_utils.setup_ema`.
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from mpl import optim
from mpl.methods import base


def opt_config(**overrides):
  """An optimiser block with the keys of the recipe's (config_lib) blocks."""
  block = dict(name='sgd', lr=0.1, scale_lr_by_batch=True, momentum=0.9, nesterov=True,
               weight_decay=0.0, clip_norm=0.0, wait_steps=0, warmup_steps=0, decay='cosine')
  block.update(overrides)
  return ml_collections.ConfigDict(block)


# -- learning-rate schedule --------------------------------------------------------------------

# The MPL student's schedule in miniature: lr 0.1 at batch 128 -> 0.1 * 128 / 256 = 0.05; wait
# 10 steps at lr 0; warm-up 20 steps, lr = 0.05 * (t + 1) / 20 with t = step - 10; then cosine
# 0.05 * (1 + cos(pi * (t - 20) / 80)) / 2 over the remaining 110 - 10 - 20 = 80 steps.
STUDENT_SCHEDULE = [
    (0, 0.0),
    (5, 0.0),                      # inside the wait
    (9, 0.0),                      # last step of the wait
    (10, 0.0025),                  # wait end: first warm-up step, 0.05 * 1 / 20
    (19, 0.025),                   # 0.05 * 10 / 20
    (29, 0.05),                    # last warm-up step, 0.05 * 20 / 20
    (30, 0.05),                    # warm-up end: cosine at progress 0
    (50, 0.04267766952966369),     # progress 1/4: 0.05 * (1 + cos(pi / 4)) / 2
    (70, 0.025),                   # progress 1/2: the cosine's midpoint
    (90, 0.0073223304703363135),   # progress 3/4: 0.05 * (1 + cos(3 pi / 4)) / 2
    (109, 1.9274093981927477e-05),  # last step, progress 79/80
    (110, 0.0),                    # total_steps: 0
    (500, 0.0),                    # past the end: stays 0
]


def test_lr_schedule_matches_official_formula():
  """Wait at 0, linear warm-up from lr/warmup, cosine to 0, lr scaled by batch / 256."""
  schedule = optim.learning_rate_schedule(
      opt_config(lr=0.1, wait_steps=10, warmup_steps=20, decay='cosine'),
      total_steps=110, batch_size=128)
  for step, expected in STUDENT_SCHEDULE:
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-8,
                               err_msg=f'lr at step {step}')


def test_lr_schedule_teacher_large_batch():
  """No wait (the teacher), batch 512 doubles lr: 0.2; warm-up 0.2 * (step + 1) / 5."""
  schedule = optim.learning_rate_schedule(
      opt_config(lr=0.1, warmup_steps=5, decay='cosine'), total_steps=25, batch_size=512)
  # cosine over 25 - 5 = 20 steps: midpoint at step 15.
  for step, expected in [(0, 0.04), (3, 0.16), (4, 0.2), (5, 0.2), (15, 0.1), (25, 0.0)]:
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-8,
                               err_msg=f'lr at step {step}')


def test_lr_schedule_constant_unscaled():
  """'constant' keeps lr after the warm-up; scale_lr_by_batch=False leaves lr as given."""
  schedule = optim.learning_rate_schedule(
      opt_config(lr=0.1, scale_lr_by_batch=False, wait_steps=2, warmup_steps=4,
                 decay='constant'),
      total_steps=20, batch_size=128)
  for step, expected in [(0, 0.0), (1, 0.0), (2, 0.025), (4, 0.075), (5, 0.1), (6, 0.1),
                         (12, 0.1), (19, 0.1)]:
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-8,
                               err_msg=f'lr at step {step}')



def test_lr_schedule_linear_and_fixmatch_cosine():
  """After 2 wait + 4 warm-up steps, K = 20 - 6 = 14 decay steps at progress k / K:
  'linear' lr (1 - k / K); 'fixmatch_cosine' lr cos(7 pi k / (16 K)) (FixMatch's schedule,
  which ends at lr cos(7 pi / 16) = 0.195 lr, not 0)."""
  for decay, factor in (('linear', lambda k: 1 - k / 14),
                        ('fixmatch_cosine', lambda k: np.cos(7 * np.pi * k / (16 * 14)))):
    schedule = optim.learning_rate_schedule(
        opt_config(lr=0.1, scale_lr_by_batch=False, wait_steps=2, warmup_steps=4, decay=decay),
        total_steps=20, batch_size=128)
    for step, expected in [(1, 0.0), (3, 0.05), (5, 0.1)] + [
        (6 + k, 0.1 * factor(k)) for k in (0, 3, 7, 13, 14)] + [(40, 0.1 * factor(14))]:
      np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-8,
                                 err_msg=f'{decay}: lr at step {step}')

# -- optimiser ---------------------------------------------------------------------------------

# A tiny network named like the real models (mpl/models/cnn.py): conv and dense parameters are
# decayed, batch-norm ('bn_*') scale and bias are not.
PARAMS = {
    ('conv_1', 'kernel'): np.array([[[[0.5, -1.0]]]]),
    ('bn_1', 'scale'): np.array([1.0, 0.8]),
    ('bn_1', 'bias'): np.array([0.1, -0.2]),
    ('classifier', 'kernel'): np.array([[0.3], [-0.6]]),
    ('classifier', 'bias'): np.array([0.05]),
}
DECAYED = {('conv_1', 'kernel'), ('classifier', 'kernel'), ('classifier', 'bias')}
GRADS = [  # one gradient per step
    {('conv_1', 'kernel'): np.array([[[[0.4, 0.2]]]]),
     ('bn_1', 'scale'): np.array([-0.3, 0.5]),
     ('bn_1', 'bias'): np.array([0.1, 0.0]),
     ('classifier', 'kernel'): np.array([[-0.6], [0.2]]),
     ('classifier', 'bias'): np.array([0.3])},
    {('conv_1', 'kernel'): np.array([[[[-0.2, 0.5]]]]),
     ('bn_1', 'scale'): np.array([0.1, 0.4]),
     ('bn_1', 'bias'): np.array([-0.3, 0.2]),
     ('classifier', 'kernel'): np.array([[0.7], [-0.1]]),
     ('classifier', 'bias'): np.array([-0.2])},
]
# lr 0.1, no batch scaling, 2 warm-up steps then constant: lr(0) = 0.05, lr(1) = 0.1.
LRS = [0.05, 0.1]


def reference_sgd(lrs, momentum, weight_decay, clip_norm, nesterov=True):
  """Plain numpy: TF's (Nesterov) MomentumOptimizer on the gradient of loss + wd * l2_loss(p)
  (i.e. g + wd * p for decayed p), the whole gradient clipped to global norm clip_norm (0 = off).

    accum <- momentum * accum + g;   p <- p - lr * (g + momentum * accum)   (Nesterov)
                                     p <- p - lr * accum                    (plain momentum)
  """
  params = {k: v.astype(np.float64) for k, v in PARAMS.items()}
  accum = {k: np.zeros_like(v) for k, v in params.items()}
  for lr, grads in zip(lrs, GRADS):
    g = {k: grads[k] + (weight_decay * params[k] if k in DECAYED else 0.0) for k in params}
    norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    if clip_norm and norm > clip_norm:
      g = {k: v * clip_norm / norm for k, v in g.items()}
    for k in params:
      accum[k] = momentum * accum[k] + g[k]
      params[k] = params[k] - lr * ((g[k] + momentum * accum[k]) if nesterov else accum[k])
  return params


def reference_adam(lrs, weight_decay, decoupled, b1=0.9, b2=0.999, eps=1e-8):
  """Plain numpy Adam. Coupled (name 'adam'): the gradient g + wd * p goes through Adam.
  Decoupled (AdamW): p <- p - lr * (adam(g) + wd * p). Decay on the decayed params only."""
  params = {k: v.astype(np.float64) for k, v in PARAMS.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for t, (lr, grads) in enumerate(zip(lrs, GRADS), start=1):
    for k in params:
      decay = weight_decay * params[k] if k in DECAYED else 0.0
      g = grads[k] + (0.0 if decoupled else decay)
      m[k] = b1 * m[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g ** 2
      step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
      params[k] = params[k] - lr * (step + (decay if decoupled else 0.0))
  return params


def nested(flat, boxed=False):
  """The flax params tree of a flat {(module, name): array}; boxed like the real models' params
  (nn.LogicallyPartitioned, which the optimiser sees)."""
  def leaf(v):
    v = jnp.asarray(v, jnp.float32)
    return nn.LogicallyPartitioned(v, names=(None,) * v.ndim) if boxed else v
  return traverse_util.unflatten_dict({k: leaf(v) for k, v in flat.items()})


def run_optimizer(opt, grads_per_step, boxed=False):
  """Final params (flat numpy) after one update per gradient, as the train steps apply them."""
  tx, _ = optim.make_optimizer(opt, total_steps=10, batch_size=128)
  params = nested(PARAMS, boxed)
  state = tx.init(params)
  for grads in grads_per_step:
    updates, state = tx.update(nested(grads, boxed), state, params)
    params = optax.apply_updates(params, updates)
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  return {k: np.asarray(v) for k, v in flat.items()}


def assert_params_close(actual, expected, atol=1e-7):
  for k in PARAMS:
    np.testing.assert_allclose(actual[k], expected[k], rtol=1e-5, atol=atol, err_msg=str(k))


def test_weight_decay_coupled_nesterov_and_masked():
  """Zero gradient, one step: decayed params shrink by lr * wd * (1 + momentum) (Nesterov),
  batch-norm scale and bias do not move."""
  opt = opt_config(lr=0.1, scale_lr_by_batch=False, weight_decay=0.05, decay='constant')
  zero = {k: np.zeros_like(v) for k, v in PARAMS.items()}
  after = run_optimizer(opt, [zero])
  # p * (1 - 0.1 * 0.05 * 1.9) = 0.9905 p
  assert_params_close(after, {
      ('conv_1', 'kernel'): np.array([[[[0.49525, -0.9905]]]]),
      ('bn_1', 'scale'): np.array([1.0, 0.8]),
      ('bn_1', 'bias'): np.array([0.1, -0.2]),
      ('classifier', 'kernel'): np.array([[0.29715], [-0.5943]]),
      ('classifier', 'bias'): np.array([0.049525]),
  })


@pytest.mark.parametrize('boxed', [False, True], ids=['plain', 'boxed'])
def test_sgd_nesterov_weight_decay_two_steps(boxed):
  """Two updates (warm-up lr 0.05 then 0.1) match the numpy Nesterov SGD with coupled weight
  decay, on plain and on logically-boxed params (as the real models' are)."""
  opt = opt_config(lr=0.1, scale_lr_by_batch=False, weight_decay=0.05, warmup_steps=2,
                   decay='constant')
  expected = reference_sgd(LRS, momentum=0.9, weight_decay=0.05, clip_norm=0.0)
  assert_params_close(run_optimizer(opt, GRADS, boxed), expected)


def test_plain_momentum_adam_and_adamw():
  """nesterov=False is TF's plain momentum; 'adam' puts the coupled decay through Adam,
  'adamw' decays the weights outside it (each once, batch norm exempt)."""
  common = dict(lr=0.1, scale_lr_by_batch=False, weight_decay=0.05, warmup_steps=2,
                decay='constant')
  assert_params_close(run_optimizer(opt_config(nesterov=False, **common), GRADS),
                      reference_sgd(LRS, momentum=0.9, weight_decay=0.05, clip_norm=0.0,
                                    nesterov=False))
  for name, decoupled in (('adam', False), ('adamw', True)):
    # float32 Adam: m / sqrt(v) of small gradients is accurate to ~1e-6 (the decay is 1e-2)
    assert_params_close(run_optimizer(opt_config(name=name, **common), GRADS),
                        reference_adam(LRS, weight_decay=0.05, decoupled=decoupled), atol=1e-5)


def test_global_norm_clipping_after_weight_decay():
  """With clip_norm below the gradient's norm, two updates match the numpy reference that
  clips g + wd * p to that global norm."""
  opt = opt_config(lr=0.1, scale_lr_by_batch=False, weight_decay=0.05, clip_norm=0.5,
                   warmup_steps=2, decay='constant')
  expected = reference_sgd(LRS, momentum=0.9, weight_decay=0.05, clip_norm=0.5)
  unclipped = reference_sgd(LRS, momentum=0.9, weight_decay=0.05, clip_norm=0.0)
  assert not np.allclose(expected[('conv_1', 'kernel')], unclipped[('conv_1', 'kernel')])
  assert_params_close(run_optimizer(opt, GRADS), expected)


# -- EMA ---------------------------------------------------------------------------------------


def test_ema_decay_ramp():
  """The official EMA decay min(d, (t + 1) / (t + 10)): 0.1 at step 0, then d."""
  for step, expected in [(0, 0.1), (1, 2 / 11), (5, 0.4), (90, 0.91), (1000, 0.99),
                         (10**6, 0.99)]:
    np.testing.assert_allclose(float(base.ema_decay_at(step, 0.99)), expected, rtol=1e-6,
                               err_msg=f'EMA decay at step {step}')


def test_ema_update_weights():
  """ema <- decay * ema + (1 - decay) * new."""
  np.testing.assert_allclose(float(optim.ema_update(1.0, 3.0, 0.9)), 1.2, rtol=1e-6)
  np.testing.assert_allclose(float(optim.ema_update(10.0, 0.0, 0.999)), 9.99, rtol=1e-6)


def test_updated_ema_uses_step_decay():
  """updated_ema at state.step 5 (decay 0.4 < 0.999) averages params and batch statistics;
  ema_decay 0 leaves the EMA off."""
  state = base.TrainState(
      step=jnp.asarray(5, jnp.int32), rng=None, params=None, batch_stats=None, opt_state=None,
      ema_params={'conv_1': {'kernel': jnp.array([1.0, 2.0])}},
      ema_batch_stats={'bn_1': {'mean': jnp.array([0.5])}})
  params = {'conv_1': {'kernel': jnp.array([3.0, -2.0])}}
  stats = {'bn_1': {'mean': jnp.array([1.5])}}
  ema_params, ema_stats = base.updated_ema(state, params, stats, 0.999)
  # 0.4 * [1, 2] + 0.6 * [3, -2] = [2.2, -0.4];  0.4 * 0.5 + 0.6 * 1.5 = 1.1
  np.testing.assert_allclose(np.asarray(ema_params['conv_1']['kernel']), [2.2, -0.4], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ema_stats['bn_1']['mean']), [1.1], rtol=1e-6)
  off = state.replace(ema_params=None, ema_batch_stats=None)
  assert base.updated_ema(off, params, stats, 0.0) == (None, None)
