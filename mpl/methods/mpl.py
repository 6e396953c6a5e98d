"""Meta Pseudo Labels (Pham et al., CVPR 2021), METHODS.md section 6.

Teacher T and student S train together. One update:
  1. Teacher forward (training mode) on concat(x_l, w(x_u), s(x_u)): label-smoothed CE on x_l,
     and the UDA loss (target sharpened from w(x_u), prediction on s(x_u)).
  2. Pseudo labels for s(x_u) from the teacher: hard labels, sampled from softmax(T(s(x_u)))
     (the paper) or its argmax.
  3. Student step on CE(yhat, S(s(x_u))), with f_old = CE(y_l, S(x_l)) recorded before it and
     f_new = CE(y_l, S'(x_l)) after it.
  4. Teacher feedback and teacher step. `config.mpl.feedback` chooses how the teacher learns
     from the student:
       first_order       the paper: h = f_old - f_new (first-order Taylor of
                         eta_S <grad f(theta_S'), g_u>), REINFORCE term
                         sg(h - b) * CE(yhat, T(s(x_u))), b a moving baseline of h.
       exact             soft pseudo labels p = softmax(T(s(x_u))); the teacher minimises
                         f_new = f(theta_S'(p)) differentiated through the student's actual
                         optimiser step (second order: jax.grad through jax.grad).
       official_release  what the released TF code computes: soft labels for the student and a
                         teacher term CE(sg(p), T(s(x_u))) * sg(f_new - f_old - b), whose
                         gradient is zero: the teacher trains as plain UDA. For parity runs.
     Teacher loss = w_l * CE_l + lambda_uda(t) * UDA + feedback term (w_l =
     `mpl.teacher_labeled_weight`, 1; 0 with no UDA: the paper's section-2 teacher, taught by
     the feedback alone).
     Under 'exact' the teacher's gradient runs through the student's Hessian, which through
     leaky ReLUs depends on which units are active: a float32 rounding difference (another
     mesh layout, another XLA) can switch a unit near 0 and move the teacher by up to 1e-3 of
     its size within 2-3 steps (measured: tests/test_model_parallel.py). One program still
     reproduces its run exactly (resume); 'first_order' moves 3e-6 for the same rounding.

Choices the paper leaves open, made as the official code does: the baseline is updated with the
current h before it is subtracted; f_new uses the student in training mode (its batch-norm
statistics from that pass are discarded); losses are means over the global batch; the student
EMA (decay min(d, (t+1)/(t+10))) is the evaluated model.

One choice made differently (`config.mpl.h_pass`): the released code and the PyTorch port take
f_old from the student's training pass on concat(x_l, s(x_u)) and f_new from a second pass on
x_l alone, with new dropout masks. Their difference then holds dropout noise and a batch-norm
offset (batch statistics over a different batch), not only the effect of the student's step.
On the 6000-step Fashion-MNIST MPL run (cnn_small, step 4000, 16 keys; `launch/h_noise.py`
repeats it on any MPL workdir) that h had mean -0.070 and standard deviation 0.069, while the
update's own effect (both passes on x_l with the same dropout masks) had mean -0.0010 and
standard deviation 0.0018; their per-key difference, the noise alone, had standard deviation
0.069, 39 times the update's: the teacher's feedback was about 40 parts noise to 1 part signal.
'paired' (default) measures f_old and f_new in one labeled-only pass each, with the same dropout
key, so h = 0 exactly when the student does not move. 'official' keeps the released
measurement, for parity runs.

Those two passes compute in float32, at full float32 matmul precision, whatever the network's
own dtype (`config.mpl.h_dtype`: 'float32', the default; 'model' = as the network trains). h is
the difference of two losses that differ by 1e-3 or less. A bfloat16 network keeps 8 bits of
each weight and activation (0.4 %): most weights round to the same value before and after a
small step, and the rounding of the activations adds noise of the size of h. (Float32
convolutions are not exact by default either: GPUs round their inputs to TF32, TPUs to one
bfloat16 pass; the h passes ask for 'highest'.) Measured on a Fashion-MNIST MPL checkpoint with
the network run in bfloat16 (cnn_small, 32 keys, the same update measured both ways;
`launch/h_noise.py --compare h_dtype`): at step 600 of 800 the bfloat16 measurement's error had
a standard deviation of 0.72 times h's own spread and a mean of +0.0002 against an h of
-0.0011; at the last step, where the student's lr is 0, its h spread by 0.0004 where the
float32 h is 0 exactly. The cost: two forwards of the labeled batch in full float32 (and, under
'exact', f_new's backward); under spatial partitioning (`sharding.gather_for_compute`) those
passes gather the student's kernels in float32, twice the bytes of its bfloat16 passes (an
EfficientNet gathers them block by block, `sharding.gathered_when_called`).
"""

from __future__ import annotations

import contextlib

from absl import logging
import jax
import jax.numpy as jnp
import optax

from mpl import models, optim
from mpl.errors import ConfigError
from mpl.methods import base

FEEDBACKS = ('first_order', 'exact', 'official_release')
PSEUDO_LABELS = ('sample', 'argmax')
H_PASSES = ('paired', 'official')
H_DTYPES = ('float32', 'model')


def uda_loss(logits_weak, logits_strong, temperature: float, threshold: float):
  """UDA consistency: masked CE(sharpened sg(p_weak), p_strong), masked examples still counted.

  Returns (loss, fraction of examples above the confidence threshold).
  """
  target = jax.nn.softmax(jax.lax.stop_gradient(logits_weak) / temperature)
  mask = (jnp.max(target, axis=-1) >= threshold).astype(jnp.float32)
  loss = jnp.sum(mask * base.soft_cross_entropy(logits_strong, target)) / mask.shape[0]
  return loss, jnp.mean(mask)


def smooth(targets, label_smoothing: float):
  return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


def h_measurement(model, h_pass: str, h_dtype: str):
  """(network, context) in which the labeled-only passes that measure h run.

  Under h_pass 'paired' and h_dtype 'float32': `model` computing in float32 (the same
  parameters; a float64 network stays float64), inside `jax.default_matmul_precision('highest')`
  (for float32 inputs GPUs use TF32 and TPUs one bfloat16 pass by default). Else `model` as it
  trains, in an empty context that keeps any precision the user set (under 'official', f_old
  comes from the training pass, so f_new is measured as that pass is).
  """
  if h_pass == 'paired' and h_dtype == 'float32':
    dtype = getattr(model, 'dtype', None)
    if dtype is not None and jnp.dtype(dtype).itemsize < 4:
      model = model.clone(dtype=jnp.float32)
    return model, lambda: jax.default_matmul_precision('highest')
  return model, contextlib.nullcontext


class MPL(base.Method):
  name = 'mpl'
  uses_unlabeled = True

  def __init__(self, config, model, info):
    super().__init__(config, model, info)
    c = config.mpl
    if c.feedback not in FEEDBACKS:
      raise ConfigError(f'unknown mpl.feedback {c.feedback!r}; valid choices: {list(FEEDBACKS)}')
    if c.h_pass not in H_PASSES:
      raise ConfigError(f'unknown mpl.h_pass {c.h_pass!r}; valid choices: {list(H_PASSES)}')
    if c.h_dtype not in H_DTYPES:
      raise ConfigError(f'unknown mpl.h_dtype {c.h_dtype!r}; valid choices: {list(H_DTYPES)}')
    if c.pseudo_label not in PSEUDO_LABELS:
      raise ConfigError(
          f'unknown mpl.pseudo_label {c.pseudo_label!r}; valid choices: {list(PSEUDO_LABELS)}')
    self.student = model
    self.student_for_h, self.h_context = h_measurement(model, c.h_pass, c.h_dtype)
    self.teacher = model
    if c.get('teacher_model'):
      self.teacher = models.from_config(c.teacher_model, info.num_classes)
    steps, batch = config.total_steps, config.batch_size
    self.teacher_tx, self.teacher_lr = optim.make_optimizer(c.teacher_optimizer, steps, batch)
    self.student_tx, self.student_lr = optim.make_optimizer(c.student_optimizer, steps, batch)
    if c.student_optimizer.get('wait_steps', 0) >= steps:
      logging.warning('mpl.student_optimizer.wait_steps=%d >= total_steps=%d: the student never '
                      'trains (its lr is 0 throughout).', c.student_optimizer.wait_steps, steps)
    self.ema_decay = float(config.get('ema_decay', 0.0))

  # -- state ----------------------------------------------------------------------------------

  def init(self, rng, sample_images):
    teacher_rng, student_rng, state_rng = jax.random.split(rng, 3)
    x = self.prepare(sample_images)
    teacher = self.teacher.init({'params': teacher_rng, 'dropout': teacher_rng}, x, train=False)
    student = self.student.init({'params': student_rng, 'dropout': student_rng}, x, train=False)
    params = {'teacher': teacher['params'], 'student': student['params']}
    batch_stats = {'teacher': teacher.get('batch_stats', {}),
                   'student': student.get('batch_stats', {})}
    use_ema = self.ema_decay > 0
    return base.TrainState(
        step=jnp.zeros((), jnp.int32),
        rng=state_rng,
        params=params,
        batch_stats=batch_stats,
        opt_state={'teacher': self.teacher_tx.init(params['teacher']),
                   'student': self.student_tx.init(params['student'])},
        ema_params=params['student'] if use_ema else None,
        ema_batch_stats=batch_stats['student'] if use_ema else None,
        method_state={'baseline': jnp.zeros((), jnp.float32)},
    )

  def eval_variables(self, state):
    out = {'raw': base.variables_of(state.params['student'], state.batch_stats['student'])}
    if self.ema_decay > 0:
      out['ema'] = base.variables_of(state.ema_params, state.ema_batch_stats)
    out['teacher'] = base.variables_of(state.params['teacher'], state.batch_stats['teacher'])
    return out

  def predict(self, variables, images, which='raw'):
    network = self.teacher if which == 'teacher' else self.student
    return network.apply(base.for_compute(network, variables), self.prepare(images), train=False)

  # -- the update -------------------------------------------------------------------------------

  def update(self, state, batch):
    c = self.config.mpl
    step = state.step
    rng = jax.random.fold_in(state.rng, step)
    view_rng, teacher_rng, student_rng, student_new_rng, label_rng = jax.random.split(rng, 5)
    x_l, x_w, x_s = self.views(view_rng, batch)
    y_l = batch['labeled']['label']
    n_l, n_u = x_l.shape[0], x_s.shape[0]
    teacher_params, student_params = state.params['teacher'], state.params['student']

    # 1. Teacher forward on (labeled, weak, strong) in one pass; its backward comes in step 4.
    def teacher_forward(params):
      return base.apply_train(self.teacher, params, state.batch_stats['teacher'],
                              jnp.concatenate([x_l, x_w, x_s]), teacher_rng)

    if c.recompute_teacher:
      # Keep only the teacher's inputs for its backward and run its forward again there, so its
      # activations are not held through the student's step: memory for one more forward.
      teacher_forward = jax.checkpoint(teacher_forward)
    with jax.named_scope('teacher_forward'):   # the scopes name the stages in a profile
      teacher_logits, teacher_vjp, teacher_batch_stats = jax.vjp(
          teacher_forward, teacher_params, has_aux=True)
    t_on_s = teacher_logits[n_l + n_u:]

    # 2. Pseudo labels on the strong view: hard (first_order) or soft (exact, official_release).
    with jax.named_scope('pseudo_labels'):
      if c.feedback == 'first_order':
        if c.pseudo_label == 'sample':
          pseudo = jax.random.categorical(label_rng, jax.lax.stop_gradient(t_on_s))
        else:
          pseudo = jnp.argmax(t_on_s, axis=-1)
        targets = jax.nn.one_hot(pseudo, t_on_s.shape[-1])
      else:
        targets = jax.nn.softmax(jax.lax.stop_gradient(t_on_s))

    # 3. The student step, and its labeled loss before (f_old) and after (f_new).
    def labeled_loss(params, stats):
      """f = CE(y_l, S(x_l)) in training mode; its batch statistics are discarded."""
      with jax.named_scope('h_pass'), self.h_context():
        logits, _ = base.apply_train(self.student_for_h, params, stats, x_l, student_new_rng)
      return jnp.mean(base.cross_entropy(logits, y_l))

    if c.h_pass == 'paired':
      # The same pass as f_new below (same dropout masks, same batch-norm batch): h then
      # measures the student's update and nothing else (h = 0 exactly when the lr is 0).
      f_old_paired = labeled_loss(student_params, state.batch_stats['student'])

    def student_step(targets):
      def loss_fn(params):
        logits, new_stats = base.apply_train(
            self.student, params, state.batch_stats['student'], jnp.concatenate([x_l, x_s]),
            student_rng)
        loss_u = jnp.mean(base.soft_cross_entropy(
            logits[n_l:], smooth(targets, c.student_label_smoothing)))
        f_old_in_pass = jnp.mean(base.cross_entropy(logits[:n_l], y_l))   # h_pass='official'
        return loss_u, (f_old_in_pass, new_stats)

      (loss_u, (f_old_in_pass, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          student_params)
      updates, opt_state = self.student_tx.update(grads, state.opt_state['student'],
                                                  student_params)
      new_params = optax.apply_updates(student_params, updates)
      f_new = labeled_loss(new_params, new_stats)
      return f_new, (new_params, new_stats, opt_state, f_old_in_pass, loss_u, grads)

    with jax.named_scope('student_step'):
      if c.feedback == 'exact':
        # d f_new / d targets, through the student's optimiser step (a second-order gradient).
        (f_new, student_out), f_new_grad_targets = jax.value_and_grad(
            student_step, has_aux=True)(targets)
      else:
        f_new, student_out = student_step(targets)
    student_params, student_stats, student_opt, f_old_in_pass, loss_u, student_grads = student_out
    f_old = f_old_paired if c.h_pass == 'paired' else f_old_in_pass

    # 4. Feedback coefficient for the teacher, against a moving baseline of h.
    if c.feedback == 'official_release':
      h = f_new - f_old        # the released code's sign: new minus old
    else:
      h = f_old - f_new        # the paper: old minus new (> 0 when the student improved)
    baseline = c.baseline_decay * state.method_state['baseline'] + (1 - c.baseline_decay) * h
    coefficient = jax.lax.stop_gradient(h - baseline)

    if c.uda_ramp_steps > 0:
      uda_weight = c.uda_weight * jnp.minimum(1.0, step.astype(jnp.float32) / c.uda_ramp_steps)
    else:  # no ramp: the full weight from the first step
      uda_weight = jnp.float32(c.uda_weight)

    def teacher_objective(logits):
      t_l, t_w, t_s = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]
      labeled = jnp.mean(base.cross_entropy(t_l, y_l, self.config.label_smoothing))
      uda, mask_rate = uda_loss(t_w, t_s, c.uda_temperature, c.uda_threshold)
      if c.feedback == 'first_order':
        feedback = coefficient * jnp.mean(base.soft_cross_entropy(t_s, targets))
      elif c.feedback == 'exact':
        # Surrogate whose gradient w.r.t. the logits is J_softmax^T d f_new / d targets.
        feedback = jnp.sum(jax.lax.stop_gradient(f_new_grad_targets) * jax.nn.softmax(t_s))
      else:
        soft = jax.lax.stop_gradient(jax.nn.softmax(t_s))
        feedback = coefficient * jnp.mean(base.soft_cross_entropy(t_s, soft))
      total = c.teacher_labeled_weight * labeled + uda_weight * uda + feedback
      return total, {'loss_teacher': total, 'loss_teacher_labeled': labeled, 'loss_uda': uda,
                     'loss_mpl': feedback, 'uda_mask_rate': mask_rate}

    with jax.named_scope('teacher_step'):
      logit_grads, teacher_metrics = jax.grad(teacher_objective, has_aux=True)(teacher_logits)
      (teacher_grads,) = teacher_vjp(logit_grads)
      updates, teacher_opt = self.teacher_tx.update(teacher_grads, state.opt_state['teacher'],
                                                    teacher_params)
      teacher_params = optax.apply_updates(teacher_params, updates)

    with jax.named_scope('ema'):
      ema_params, ema_batch_stats = base.updated_ema(state, student_params, student_stats,
                                                     self.ema_decay)

    metrics = {
        **teacher_metrics,
        'loss_student': loss_u,
        'f_old': f_old, 'f_new': f_new, 'h': h, 'baseline': baseline,
        'lr_teacher': self.teacher_lr(step), 'lr_student': self.student_lr(step),
        'uda_weight': uda_weight,
        'teacher_grad_norm': optax.tree.norm(teacher_grads),
        'student_grad_norm': optax.tree.norm(student_grads),
    }
    if 'label' in batch['unlabeled']:  # monitoring only: never used for training
      metrics['pseudo_label_accuracy'] = jnp.mean(
          jnp.argmax(targets, -1) == batch['unlabeled']['label'])
    new_state = state.replace(
        step=step + 1,
        params={'teacher': teacher_params, 'student': student_params},
        batch_stats={'teacher': teacher_batch_stats, 'student': student_stats},
        opt_state={'teacher': teacher_opt, 'student': student_opt},
        ema_params=ema_params, ema_batch_stats=ema_batch_stats,
        method_state={'baseline': baseline})
    return new_state, metrics
