"""Supervised baseline (METHODS.md section 1): cross-entropy on the labeled batch only.

The floor every semi-supervised method must beat. Options: label smoothing, a weak view
(flip + pad-and-crop) of the labeled images, an EMA of the weights for evaluation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mpl import optim
from mpl.methods import base


class Supervised(base.Method):
  name = 'supervised'
  uses_unlabeled = False

  def __init__(self, config, model, info):
    super().__init__(config, model, info)
    self.tx, self.lr_schedule = optim.make_optimizer(
        config.optimizer, config.total_steps, config.batch_size)
    self.ema_decay = float(config.get('ema_decay', 0.0))

  def init(self, rng, sample_images):
    net_rng, state_rng = jax.random.split(rng)
    params, batch_stats = self.init_network(net_rng, sample_images)
    use_ema = self.ema_decay > 0
    return base.TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=state_rng,
        params=params,
        batch_stats=batch_stats,
        opt_state=self.tx.init(params),
        ema_params=params if use_ema else None,
        ema_batch_stats=batch_stats if use_ema else None,
    )

  def update(self, state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    augment_rng, dropout_rng = jax.random.split(rng)
    images, labels = batch['labeled']['image'], batch['labeled']['label']
    images = base.labeled_view(self.config, augment_rng, images)
    x = self.prepare(images)

    def loss_fn(params):
      logits, batch_stats = base.apply_train(self.model, params, state.batch_stats, x,
                                             dropout_rng)
      loss = jnp.mean(base.cross_entropy(logits, labels, self.config.label_smoothing))
      return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    ema_params, ema_batch_stats = base.updated_ema(state, params, batch_stats, self.ema_decay)

    metrics = {
        'loss': loss,
        'train_accuracy': base.accuracy(logits, labels),
        'lr': self.lr_schedule(state.step),
        'grad_norm': optax.tree.norm(grads),
    }
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state, ema_params=ema_params,
                              ema_batch_stats=ema_batch_stats)
    return new_state, metrics

  def eval_variables(self, state):
    models = {'raw': base.variables_of(state.params, state.batch_stats)}
    if self.ema_decay > 0:
      models['ema'] = base.variables_of(state.ema_params, state.ema_batch_stats)
    return models

