"""Learning-rate schedules and optimisers, as the official MPL/UDA/FixMatch recipes define them.

Optimiser config (a ConfigDict, e.g. `config.optimizer` or `config.mpl.teacher_optimizer`):
  name          'sgd' (Nesterov momentum, the recipe of every paper here) | 'adam' | 'adamw'
  lr            base learning rate
  scale_lr_by_batch  multiply lr by batch_size / 256 (the official MPL code does: 0.1 -> 0.05
                at batch 128)
  momentum, nesterov
  weight_decay  *coupled* decay: wd * param is added to the gradient before momentum, as the
                official TF code adds an L2 term to the loss. Every parameter is decayed
                except those of normalisation layers (as the official code).
  clip_norm     global-norm clipping of the gradient (after weight decay); 0 = off
  wait_steps    lr = 0 for these first steps (the MPL student waits for the teacher)
  warmup_steps  linear warm-up after the wait
  decay         'cosine' (to 0 at total_steps) | 'constant' | 'linear' |
                'fixmatch_cosine' (lr * cos(7 pi k / (16 K)), FixMatch)
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mpl.errors import ConfigError
from mpl.models import decay_mask  # all but normalisation-layer parameters

DECAYS = ('cosine', 'constant', 'linear', 'fixmatch_cosine')
OPTIMIZERS = ('sgd', 'adam', 'adamw')


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int,
                           batch_size: int) -> optax.Schedule:
  """lr(step): 0 during `wait_steps`, linear warm-up, then the decay, reaching 0 at total_steps."""
  base_lr = float(opt.lr) * (batch_size / 256 if opt.get('scale_lr_by_batch', False) else 1.0)
  wait = int(opt.get('wait_steps', 0))
  warmup = int(opt.get('warmup_steps', 0))
  decay = opt.get('decay', 'cosine')
  if decay not in DECAYS:
    raise ConfigError(f'unknown lr decay {decay!r}; valid choices: {list(DECAYS)}')
  decay_steps = max(total_steps - wait - warmup, 1)
  if warmup and wait + warmup >= total_steps:
    logging.warning('lr schedule: wait_steps=%d + warmup_steps=%d >= total_steps=%d: the lr never '
                    'reaches its peak %g and never decays (scale the warm-up with the run).',
                    wait, warmup, total_steps, base_lr)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    t = step - wait  # steps since the end of the wait
    warm = jnp.where(warmup > 0, jnp.minimum((t + 1) / max(warmup, 1), 1.0), 1.0)
    progress = jnp.clip((t - warmup) / decay_steps, 0.0, 1.0)
    if decay == 'cosine':
      factor = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay == 'linear':
      factor = 1.0 - progress
    elif decay == 'fixmatch_cosine':
      factor = jnp.cos(7.0 * jnp.pi * progress / 16.0)
    else:
      factor = jnp.ones_like(progress)
    lr = base_lr * jnp.where(t < warmup, warm, factor)
    return jnp.where(step < wait, 0.0, lr)

  return schedule


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int,
                   batch_size: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser of an `optimizer` config block, and its learning-rate schedule."""
  name = opt.get('name', 'sgd')
  if name not in OPTIMIZERS:
    raise ConfigError(f'unknown optimizer {name!r}; valid choices: {list(OPTIMIZERS)}')
  schedule = learning_rate_schedule(opt, total_steps, batch_size)
  parts = []
  weight_decay = float(opt.get('weight_decay', 0.0))
  if weight_decay and name != 'adamw':
    parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
  if opt.get('clip_norm', 0.0):
    parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
  if name == 'sgd':
    parts.append(optax.sgd(schedule, momentum=opt.get('momentum', 0.9) or None,
                           nesterov=bool(opt.get('nesterov', True))))
  elif name == 'adam':
    parts.append(optax.adam(schedule))
  else:
    parts.append(optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule


def ema_update(ema, new, decay):
  """ema <- decay * ema + (1 - decay) * new, leaf by leaf."""
  return jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, ema, new)
