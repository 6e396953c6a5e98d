"""Pseudo Labels / Noisy Student self-training (METHODS.md section 2).

Two variants, chosen by `config.pseudo_label.rounds`:

online (rounds = 0), Lee 2013 "PseudoLabel" as in USB/TorchSSL. One network f; per step
  yhat = argmax sg(f(w(x_u)))   (or the soft sg(softmax f(w(x_u))) with hard=False)
  mask = max softmax sg(f(w(x_u))) >= threshold
  loss = CE(y_l, f(x_l)) + weight * mean over the mu*B examples of mask * CE(yhat, f(s(x_u)))
  (masked examples still count in the denominator, as in FixMatch/UDA). x_l, w(x_u) and s(x_u)
  go through one training-mode pass, FixMatch's convention. USB/TorchSSL's PseudoLabel labels
  and trains on one weak view; here the labels train the strong view, which makes this
  FixMatch-like at its default threshold, 0.95 (with augment.strong='none' both views are the raw
  inputs). With identical views (TwoMoons) and hard=False the unlabeled term has zero gradient
  (d/dz CE(sg(softmax z), z) = 0).

offline (rounds >= 1), teacher -> student, Noisy Student's loop. Networks {'teacher', 'student'}:
  1. steps [0, teacher_steps): the teacher trains on CE(y_l, T(x_l)); the student is untouched.
  2. the remaining total_steps - teacher_steps are split evenly into `rounds` student rounds (the
     last takes the remainder). The teacher is FROZEN; it labels w(x_u) in eval mode (no dropout,
     batch-norm running statistics) and the student, noised by its strong view s(x_u) and
     dropout, trains on CE(y_l, S(x_l)) + weight * mean of mask * CE(yhat, S(s(x_u))).
  3. at the start of every round after the first the teacher becomes a copy of the current
     student (weights and batch statistics): the student of round r labels for round r + 1.
Choices (the paper trains each student from scratch, with an equal-or-larger network): here the
student has the teacher's architecture and CONTINUES from its current weights at every round
(re-initialising a same-size student would only repeat round 1's learning); its optimiser state
is reset at each round start, so every round runs the full `config.optimizer` schedule (warm-up,
decay) over its own length, as the teacher's phase runs it over `teacher_steps`. The online
variant runs the schedule over total_steps. The loop jits one update per phase and picks it on
the host (`phase`, `update_for`); both return the same state and metric structure.

Evaluated: 'raw' = the student (offline) or the single network (online), 'teacher' (offline),
'ema' of the evaluated network when config.ema_decay > 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from mpl import optim
from mpl.errors import ConfigError
from mpl.methods import base

ONLINE_THRESHOLD = 0.95   # Lee 2013 / USB default when config.pseudo_label.threshold is None
OFFLINE_THRESHOLD = 0.0   # Noisy Student keeps every pseudo label


def pseudo_targets(teacher_logits, hard: bool, threshold: float):
  """(targets, mask) from the labeling network's logits on w(x_u), gradient stopped.

  targets: one-hot argmax labels (hard) or the softmax (soft); mask: max prob >= threshold.
  """
  probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32))
  mask = (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)
  if hard:
    targets = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1])
  else:
    targets = probs
  return targets, mask


def masked_pseudo_label_loss(logits, targets, mask):
  """mean over all examples of mask * CE(targets, logits) (masked ones count in the mean)."""
  return jnp.sum(mask * base.soft_cross_entropy(logits, targets)) / mask.shape[0]


class PseudoLabel(base.Method):
  name = 'pseudo_label'
  uses_unlabeled = True

  def __init__(self, config, model, info):
    super().__init__(config, model, info)
    c = config.pseudo_label
    self.rounds = int(c.rounds)
    if self.rounds < 0:
      raise ConfigError(f'config.pseudo_label.rounds must be >= 0 (0 = online), got {c.rounds}.')
    self.online = self.rounds == 0
    default = ONLINE_THRESHOLD if self.online else OFFLINE_THRESHOLD
    self.threshold = float(default if c.get('threshold') is None else c.threshold)
    self.weight = float(c.weight)
    self.hard = bool(c.hard)
    total, batch = int(config.total_steps), config.batch_size
    self.ema_decay = float(config.get('ema_decay', 0.0))
    if self.online:
      self.tx, self.lr_schedule = optim.make_optimizer(config.optimizer, total, batch)
      return
    if total < self.rounds + 1:
      raise ConfigError(
          f'config.pseudo_label.rounds={self.rounds} needs total_steps >= {self.rounds + 1} (a '
          f'step for the teacher and one for every student round); total_steps is {total}.')
    teacher_steps = c.get('teacher_steps')
    if teacher_steps is None:  # an equal share for the teacher and every student round
      teacher_steps = total // (self.rounds + 1)
    self.teacher_steps = int(teacher_steps)
    if not 1 <= self.teacher_steps <= total - self.rounds:
      raise ConfigError(
          f'config.pseudo_label.teacher_steps={self.teacher_steps} must be in [1, total_steps - '
          f'rounds] = [1, {total - self.rounds}] so that every student round gets a step.')
    self.round_steps = (total - self.teacher_steps) // self.rounds
    last_round = total - self.teacher_steps - (self.rounds - 1) * self.round_steps
    self.teacher_tx, self.teacher_lr = optim.make_optimizer(
        config.optimizer, self.teacher_steps, batch)
    # Every round restarts the schedule; the last (longest) round's length sets its decay.
    self.student_tx, self.student_lr = optim.make_optimizer(config.optimizer, last_round, batch)

  # -- state ----------------------------------------------------------------------------------

  def init(self, rng, sample_images):
    state_rng, teacher_rng, student_rng = jax.random.split(rng, 3)
    use_ema = self.ema_decay > 0
    if self.online:
      params, batch_stats = self.init_network(student_rng, sample_images)
      opt_state = self.tx.init(params)
      evaluated = (params, batch_stats)
    else:
      teacher, teacher_stats = self.init_network(teacher_rng, sample_images)
      student, student_stats = self.init_network(student_rng, sample_images)
      params = {'teacher': teacher, 'student': student}
      batch_stats = {'teacher': teacher_stats, 'student': student_stats}
      opt_state = {'teacher': self.teacher_tx.init(teacher),
                   'student': self.student_tx.init(student)}
      evaluated = (student, student_stats)
    return base.TrainState(
        step=jnp.zeros((), jnp.int32), rng=state_rng, params=params, batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=evaluated[0] if use_ema else None,
        ema_batch_stats=evaluated[1] if use_ema else None)

  def evaluated(self, params, batch_stats):
    """The evaluated network's (params, batch_stats): the student, or the single network."""
    if self.online:
      return params, batch_stats
    return params['student'], batch_stats['student']

  def eval_variables(self, state):
    out = {'raw': base.variables_of(*self.evaluated(state.params, state.batch_stats))}
    if self.ema_decay > 0:
      out['ema'] = base.variables_of(state.ema_params, state.ema_batch_stats)
    if not self.online:
      out['teacher'] = base.variables_of(state.params['teacher'], state.batch_stats['teacher'])
    return out

  # -- the update -------------------------------------------------------------------------------

  def phase(self, step):
    if self.online:
      return None
    return 'teacher' if step < self.teacher_steps else 'student'

  def update_for(self, phase):
    return functools.partial(self.update, phase=phase)

  def update(self, state, batch, phase=None):
    """One step. Offline, `phase` ('teacher' | 'student', see `phase`) picks the branch when
    it is known at trace time (the loop's case); None picks it on the device."""
    step = state.step
    view_rng, dropout_rng = jax.random.split(jax.random.fold_in(state.rng, step))
    x_l, x_w, x_s = self.views(view_rng, batch)
    y_l = batch['labeled']['label']
    teacher_phase = lambda s: self.teacher_phase(s, x_l, y_l, x_w, dropout_rng)
    student_phase = lambda s: self.student_phase(s, x_l, y_l, x_w, x_s, dropout_rng)
    if self.online:
      state, metrics, targets = self.online_step(state, x_l, y_l, x_w, x_s, dropout_rng)
    elif phase == 'teacher':
      state, metrics, targets = teacher_phase(state)
    elif phase == 'student':
      state, metrics, targets = student_phase(state)
    else:
      state, metrics, targets = jax.lax.cond(step < self.teacher_steps, teacher_phase,
                                             student_phase, state)
    if 'label' in batch['unlabeled']:  # monitoring only: never used for training
      metrics['pseudo_label_accuracy'] = jnp.mean(
          jnp.argmax(targets, -1) == batch['unlabeled']['label'])

    # Offline, the EMA's warm-up starts with the student's first step: it would otherwise keep
    # the untrained student's weights, d**n of them after n student steps.
    ema_step = None if self.online else jnp.maximum(step - self.teacher_steps, 0)
    ema_params, ema_batch_stats = base.updated_ema(
        state, *self.evaluated(state.params, state.batch_stats), self.ema_decay, step=ema_step)
    return state.replace(step=step + 1, ema_params=ema_params,
                         ema_batch_stats=ema_batch_stats), metrics

  def objective(self, logits_l, y_l, logits_s, targets, mask):
    """CE_l + weight * masked CE(pseudo labels, f(s(x_u))): (loss, metrics)."""
    labeled = jnp.mean(base.cross_entropy(logits_l, y_l, self.config.label_smoothing))
    unlabeled = masked_pseudo_label_loss(logits_s, targets, mask)
    loss = labeled + self.weight * unlabeled
    return loss, {'loss': loss, 'loss_labeled': labeled, 'loss_unlabeled': unlabeled,
                  'train_accuracy': base.accuracy(logits_l, y_l), 'mask_rate': jnp.mean(mask)}

  # online: one training-mode pass over (x_l, w(x_u), s(x_u)); the network labels its own
  # weak view, gradient stopped.
  def online_step(self, state, x_l, y_l, x_w, x_s, rng):
    n_l, n_u = x_l.shape[0], x_w.shape[0]

    def loss_fn(params):
      logits, batch_stats = base.apply_train(self.model, params, state.batch_stats,
                                             jnp.concatenate([x_l, x_w, x_s]), rng)
      targets, mask = pseudo_targets(logits[n_l:n_l + n_u], self.hard, self.threshold)
      loss, metrics = self.objective(logits[:n_l], y_l, logits[n_l + n_u:], targets, mask)
      return loss, (batch_stats, metrics, targets)

    (_, (batch_stats, metrics, targets)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(lr=self.lr_schedule(state.step), grad_norm=optax.tree.norm(grads))
    new_state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics, targets

  # offline phase 1: the teacher learns the labeled data; the student waits.
  def teacher_phase(self, state, x_l, y_l, x_w, rng):
    teacher, student = state.params['teacher'], state.params['student']

    def loss_fn(params):
      logits, batch_stats = base.apply_train(self.model, params, state.batch_stats['teacher'],
                                             x_l, rng)
      loss = jnp.mean(base.cross_entropy(logits, y_l, self.config.label_smoothing))
      return loss, (batch_stats, base.accuracy(logits, y_l))

    (loss, (teacher_stats, train_accuracy)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(teacher)
    updates, teacher_opt = self.teacher_tx.update(grads, state.opt_state['teacher'], teacher)
    teacher = optax.apply_updates(teacher, updates)
    # What the teacher would label now (monitoring only: the student does not train yet).
    targets, _ = pseudo_targets(self.label_logits(teacher, teacher_stats, x_w), self.hard,
                                self.threshold)
    metrics = {'loss': loss, 'loss_labeled': loss, 'loss_unlabeled': jnp.zeros_like(loss),
               'train_accuracy': train_accuracy, 'mask_rate': jnp.zeros_like(loss),
               'lr': self.teacher_lr(state.step), 'grad_norm': optax.tree.norm(grads),
               'round': jnp.zeros((), jnp.int32)}
    new_state = state.replace(
        params={'teacher': teacher, 'student': student},
        batch_stats={'teacher': teacher_stats, 'student': state.batch_stats['student']},
        opt_state={'teacher': teacher_opt, 'student': state.opt_state['student']})
    return new_state, metrics, targets

  def label_logits(self, teacher, teacher_stats, x_w):
    """The frozen teacher's logits on w(x_u), in eval mode."""
    variables = base.variables_of(teacher, teacher_stats, self.model)
    return self.model.apply(variables, x_w, train=False)

  def round_of(self, step):
    """(round index 0..rounds-1, first step of that round) of a student-phase step."""
    index = jnp.minimum((step - self.teacher_steps) // self.round_steps, self.rounds - 1)
    return index, self.teacher_steps + index * self.round_steps

  def start_round(self, state):
    """Noisy Student's iteration: the student becomes the teacher, with a fresh optimiser."""
    student, student_stats = state.params['student'], state.batch_stats['student']
    return state.replace(
        params={'teacher': student, 'student': student},
        batch_stats={'teacher': student_stats, 'student': student_stats},
        opt_state={'teacher': state.opt_state['teacher'],
                   'student': self.student_tx.init(student)})

  # offline phase 2: the frozen teacher labels, the noised student learns.
  def student_phase(self, state, x_l, y_l, x_w, x_s, rng):
    index, start = self.round_of(state.step)
    state = jax.lax.cond((index >= 1) & (state.step == start), self.start_round,
                         lambda s: s, state)
    teacher, student = state.params['teacher'], state.params['student']
    targets, mask = pseudo_targets(
        self.label_logits(teacher, state.batch_stats['teacher'], x_w), self.hard,
        self.threshold)
    n_l = x_l.shape[0]

    def loss_fn(params):
      logits, batch_stats = base.apply_train(self.model, params, state.batch_stats['student'],
                                             jnp.concatenate([x_l, x_s]), rng)
      loss, metrics = self.objective(logits[:n_l], y_l, logits[n_l:], targets, mask)
      return loss, (batch_stats, metrics)

    (_, (student_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(student)
    updates, student_opt = self.student_tx.update(grads, state.opt_state['student'], student)
    student = optax.apply_updates(student, updates)
    metrics.update(lr=self.student_lr(state.step - start),
                   grad_norm=optax.tree.norm(grads), round=(index + 1).astype(jnp.int32))
    new_state = state.replace(
        params={'teacher': teacher, 'student': student},
        batch_stats={'teacher': state.batch_stats['teacher'], 'student': student_stats},
        opt_state={'teacher': state.opt_state['teacher'], 'student': student_opt})
    return new_state, metrics, targets
