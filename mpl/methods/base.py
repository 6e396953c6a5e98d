"""What every method shares: the training state, the method interface, losses, model calls.

A method is a class with
  init(rng, sample_images) -> TrainState          (parameters may carry logical-axis boxes)
  update(state, batch) -> (TrainState, metrics)   (pure; the loop jits it once, donating state)
  eval_variables(state) -> {'raw': variables, 'ema': variables}   (what evaluation scores)
  predict(variables, images, which) -> logits   (`which`: the eval_variables key)
A batch is {'labeled': {'image', 'label'}, 'unlabeled': {'image'}} with global arrays sharded on
'data'; images arrive as stored (uint8, or float features for two_moons) and each method makes
its own views (augmentation) inside the step, from `jax.random.fold_in(state.rng, state.step)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from mpl import optim, sharding


@struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: all of it is checkpointed."""
  step: jax.Array                  # int32 scalar: number of updates done
  rng: jax.Array                   # base key; step randomness = fold_in(rng, step)
  params: Any                      # one tree, or {'teacher': ..., 'student': ...}
  batch_stats: Any                 # same structure as params ({} for models without BN)
  opt_state: Any
  ema_params: Any = None           # EMA of the evaluated network (None when off)
  ema_batch_stats: Any = None
  method_state: Any = None         # moving baselines, memory banks, queues, ...


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a method needs to know about the data (not the data itself)."""
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  is_image: bool


class Method:
  """Base class: a method owns its networks' update rule; the loop owns everything else."""

  name = 'base'
  uses_unlabeled = False   # the loop samples mu * batch_size unlabeled images when True

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, info: DataInfo):
    self.config = config
    self.model = model
    self.info = info

  def init(self, rng, sample_images) -> TrainState:
    raise NotImplementedError

  def update(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    raise NotImplementedError

  def phase(self, step: int) -> Any:
    """For a method whose update changes at fixed steps (offline pseudo labels: teacher, then
    student), the part of training `step` is in; the loop jits one update per phase
    (`update_for`) and picks it on the host. A `lax.cond` on the step would compile every
    branch into each step, and XLA's CPU backend runs convolution gradients inside a
    conditional some 30 times slower. None: one phase."""
    del step
    return None

  def update_for(self, phase: Any) -> Callable:
    """The update of `phase` (see `phase`)."""
    del phase
    return self.update

  def eval_variables(self, state: TrainState) -> dict[str, Any]:
    raise NotImplementedError

  def predict(self, variables, images, which: str = 'raw') -> jax.Array:
    """Eval-mode logits of the network `which` (a key of `eval_variables`) names."""
    del which  # one network; methods with several (MPL's teacher) override this
    # Under spatial partitioning the gathered kernels come in the compute dtype (half the
    # memory in bfloat16; the layers would cast them anyway).
    return self.model.apply(for_compute(self.model, variables), self.prepare(images), train=False)

  # -- helpers shared by methods -------------------------------------------------------------

  def prepare(self, images) -> jax.Array:
    """Stored images -> normalised float network input (uint8 is read as 0..255)."""
    if not self.info.is_image:
      return images.astype(jnp.float32)
    x = images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      x = x / 255.0
    mean = jnp.asarray(self.info.mean, jnp.float32)
    std = jnp.asarray(self.info.std, jnp.float32)
    return (x - mean) / std

  def views(self, rng, batch):
    """Network inputs of a semi-supervised step: the labeled view, and the weak and strong
    views of the unlabeled images (`config.augment`), all prepared."""
    with jax.named_scope('views'):   # a stage of its own in a profile (mpl.step_profile)
      labeled_rng, unlabeled_rng = jax.random.split(rng)
      x_l = labeled_view(self.config, labeled_rng, batch['labeled']['image'])
      x_w, x_s = unlabeled_views(self.config, unlabeled_rng, batch['unlabeled']['image'])
      return self.prepare(x_l), self.prepare(x_w), self.prepare(x_s)

  def init_network(self, rng, sample_images):
    """(params, batch_stats) of a fresh network; params keep their logical-axis boxes."""
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({'params': params_rng, 'dropout': dropout_rng},
                                self.prepare(sample_images), train=False)
    return variables['params'], variables.get('batch_stats', {})


def variables_of(params, batch_stats, model: nn.Module | None = None) -> dict[str, Any]:
  """The variables dict of `model.apply`; laid out for `model`'s compute when it is given
  (`for_compute`)."""
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  return variables if model is None else for_compute(model, variables)


def for_compute(model: nn.Module, variables):
  """`variables` laid out for `model.apply`: under spatial partitioning, gathered whole in the
  model's dtype (`sharding.gather_for_compute`), unless the model gathers its weights itself
  as it runs (EfficientNet: block by block, `sharding.gathered_when_called`)."""
  if getattr(model, 'gathers_own_weights', False):
    return variables
  return sharding.gather_for_compute(variables, getattr(model, 'dtype', None))


def apply_train(model: nn.Module, params, batch_stats, x, rng):
  """Training-mode forward pass: (logits, new batch_stats)."""
  variables = variables_of(params, batch_stats, model)
  logits, updates = model.apply(variables, x, train=True, rngs={'dropout': rng},
                                mutable=['batch_stats'])
  return logits, updates.get('batch_stats', batch_stats)


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example CE against hard labels, with optional label smoothing."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return soft_cross_entropy(logits, targets)


def soft_cross_entropy(logits, targets):
  """Per-example CE(q, z) = -sum_c q_c log softmax(z)_c."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def accuracy(logits, labels):
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def updated_ema(state: TrainState, params, batch_stats, decay: float, step=None):
  """(ema_params, ema_batch_stats) after this step; unchanged (None) when the EMA is off.
  `step`: the EMA's own clock for its warm-up (default state.step)."""
  if decay <= 0:
    return state.ema_params, state.ema_batch_stats
  d = ema_decay_at(state.step if step is None else step, decay)
  return (optim.ema_update(state.ema_params, params, d),
          optim.ema_update(state.ema_batch_stats, batch_stats, d))


def ema_decay_at(step, decay: float):
  """The official MPL EMA decay: min(decay, (t + 1) / (t + 10)).

  Every method starts its EMA from the initial weights. The official code (`setup_ema`) starts it
  from zeros (ones for variances); with this decay the starting point's weight after t updates is
  prod_s (s + 1) / (s + 10) = 1 / C(t + 9, 9), under 1e-7 after 20 steps, so the two agree from
  then on.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (step + 1.0) / (step + 10.0))


# -- views (augmentation inside the jitted step; mpl/data/augment.py) ---------------------------


def labeled_view(config, rng, images):
  """The labeled images as a method trains on them: as stored, or the weak view."""
  if config.augment.labeled == 'none':
    return images
  return weak_view(config, rng, images)


def weak_view(config, rng, images):
  """Flip + pad-and-crop, as `config.augment` says."""
  from mpl.data import augment  # pylint: disable=g-import-not-at-top
  a = config.augment
  return augment.weak_view(rng, images, pad=a.pad, pad_mode=a.pad_mode, flip=a.flip,
                           fill=a.fill)


def strong_view(config, rng, images, *, jitter_before=True):
  """Weak view + RandAugment (`config.augment.strong` variant) + Cutout (+ a second jitter)."""
  from mpl.data import augment  # pylint: disable=g-import-not-at-top
  a = config.augment
  return augment.strong_view(rng, images, variant=a.strong, magnitude=a.magnitude,
                             num_layers=a.num_layers, cutout_size=a.cutout_size, pad=a.pad,
                             pad_mode=a.pad_mode, flip=a.flip, fill=a.fill,
                             jitter_before=jitter_before, jitter_after=a.jitter_after)


def unlabeled_views(config, rng, images):
  """(weak, strong) views of the unlabeled images; the raw images when augment.strong='none'.

  With `augment.strong_from_weak` the strong view is built on the weak view itself (the same
  flip and crop, as the official MPL CIFAR input); otherwise the two are drawn independently.
  """
  if config.augment.strong == 'none':  # e.g. TwoMoons: points, not images
    return images, images
  weak_rng, strong_rng = jax.random.split(rng)
  weak = weak_view(config, weak_rng, images)
  if config.augment.strong_from_weak:
    return weak, strong_view(config, strong_rng, weak, jitter_before=False)
  return weak, strong_view(config, strong_rng, images)
