"""The shared training loop: configs, accuracy, exact resume, sharding, clear errors."""

import gc
import glob
import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpl import config_lib, models, sharding, train
from mpl.data import datasets
from mpl.errors import ConfigError, DataError, NonFiniteLossError, WorkdirInUseError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load_config(path, arg=None):
  """Loads configs/<path> the way `--config path:arg` does."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', os.path.join(ROOT, 'configs', path)
                                                if not os.path.isabs(path) else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def moons(arg='labels=-1', **overrides):
  config = load_config('two_moons.py', arg)
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


# --- configs ----------------------------------------------------------------------------------


# Configs whose full (non-runlocal) variant needs an argument naming data or a previous run.
REQUIRED_ARGS = {'imagenet_jft_mpl.py': 'unlabeled=my_unlabeled_tfds_set',
                 'efficientnet_l2_mpl.py': 'unlabeled=my_unlabeled_tfds_set',
                 'digits_reduced_mpl.py': 'teacher_workdir=/some/stage1/run'}


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_config_loads_and_validates(path):
  required = REQUIRED_ARGS.get(os.path.basename(path))
  if required:
    with pytest.raises(ConfigError, match=required.split('=')[0]):
      load_config(path, None)
  for arg in (required, 'runlocal'):
    config = load_config(path, arg)
    if config.mesh.data * config.mesh.model > jax.device_count():
      # A pod-sized mesh (EfficientNet-L2: 128 x 16); its memory is checked by the bench dry
      # run. Validate the rest of the config on the devices there are.
      config.mesh.data, config.mesh.model = -1, math.gcd(config.mesh.model, jax.device_count())
    config_lib.validate(config, jax.device_count())
    assert config.total_steps > 0
  assert 'python -m mpl.main' in open(path).read(), 'docstring must give the launch command'


def test_l2_config_takes_a_smaller_depth_for_memory_studies():
  path = os.path.join(ROOT, 'configs', 'efficientnet_l2_mpl.py')
  full, shallow = load_config(path, 'standin'), load_config(path, 'standin,depth=1.0')
  assert (shallow.model.width_coefficient, shallow.model.depth_coefficient) == (4.3, 1.0)
  assert shallow.model.remat and shallow.model.dtype == full.model.dtype == 'bfloat16'
  assert shallow.model.scan_blocks and full.model.scan_blocks
  model = models.from_config(shallow.model, 1000)
  assert (model.width_coefficient, model.depth_coefficient, model.dropout_rate) == (4.3, 1.0, 0.5)
  for key in ('batch_size', 'mu', 'spatial_partition'):
    assert shallow[key] == full[key], key
  assert shallow.data.image_size == full.data.image_size == 512


# The finetune stage is the supervised method on the first stage's network: it is run here for
# one paper config (the others' finetune settings are checked by config_lib.validate in
# test_every_config_loads_and_validates), which saves compiling it again for each network.
FINETUNE_RUN_FOR = 'cifar10_4k_mpl.py'


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_runlocal_config_trains_two_steps(path, tmp_path):
  config = load_config(path, 'runlocal')
  config.total_steps = 2
  if os.path.basename(path) != FINETUNE_RUN_FOR:
    config.finetune.steps = 0
  else:
    assert config.finetune.steps > 0
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == 2 + config.finetune.steps
  assert 0.0 <= summary['final']['accuracy'] <= 1.0
  written = json.load(open(tmp_path / 'summary.json'))
  for key in ('config', 'method', 'dataset', 'num_labeled', 'steps', 'wall_s', 'final', 'best',
              'median_last_20'):
    assert key in written
  assert os.path.exists(tmp_path / 'labeled_split.json')


def test_summary_reports_top1_and_top5_of_the_same_evaluation():
  """best = the evaluation with the best top-1 (with its own top-5, not the best top-5)."""
  config = moons('labels=6')
  evals = [{'step': s, 'ema': {'accuracy': a, 'top5': t5}, 'raw': {'accuracy': a - 0.1,
                                                                 'top5': t5}}
           for s, a, t5 in ((10, 0.5, 0.9), (20, 0.7, 0.8), (30, 0.6, 0.95))]
  summary = train.summarize(config, evals, wall_s=1.0, steps=30, num_labeled=6)
  assert summary['evaluated_model'] == 'ema'
  assert summary['final'] == {'accuracy': 0.6, 'top5': 0.95, 'accuracy_ema': 0.6,
                              'top5_ema': 0.95, 'accuracy_raw': 0.5, 'top5_raw': 0.95}
  assert (summary['best']['accuracy'], summary['best']['top5'], summary['best']['step']) == (
      0.7, 0.8, 20)
  assert summary['median_last_20']['top5'] == 0.9


def test_summary_best_and_median_of_each_model_over_the_last_20_evaluations():
  """Each model's best is its own best evaluation (raw and EMA peak at different steps), and
  median_last_20 is the median of exactly the last 20 evaluations."""
  config = moons('labels=6')
  # 25 evaluations: EMA accuracy 0.01 * i, best at the last; raw best at step 30 (i = 3).
  evals = [{'step': 10 * i, 'ema': {'accuracy': 0.01 * i},
            'raw': {'accuracy': 0.9 if i == 3 else 0.001 * i}} for i in range(25)]
  summary = train.summarize(config, evals, wall_s=1.0, steps=240, num_labeled=6)
  assert (summary['best']['accuracy'], summary['best']['step']) == (0.24, 240)
  assert summary['best']['accuracy_raw'] == 0.9 and summary['best']['step_raw'] == 30
  # The last 20 are i = 5..24: medians 0.145 (EMA) and 0.0145 (raw; i = 3 is outside them).
  assert summary['median_last_20']['accuracy'] == pytest.approx(0.145)
  assert summary['median_last_20']['accuracy_raw'] == pytest.approx(0.0145)


def test_mpl_without_an_ema_is_judged_by_its_student_not_its_teacher():
  """MPL evaluates its teacher too; without an EMA the evaluated model (summary's final, best
  and median) is the raw student, even where the teacher scores higher: the paper's result is
  the student's."""
  config = moons('method=mpl,labels=6')
  evals = [{'step': s, 'raw': {'accuracy': a}, 'teacher': {'accuracy': a + 0.2}}
           for s, a in ((10, 0.5), (20, 0.7), (30, 0.6))]
  summary = train.summarize(config, evals, wall_s=1.0, steps=30, num_labeled=6)
  assert summary['evaluated_model'] == 'raw'
  assert summary['final']['accuracy'] == 0.6 and summary['final']['accuracy_teacher'] == 0.8
  assert (summary['best']['accuracy'], summary['best']['step']) == (0.7, 20)
  assert summary['median_last_20']['accuracy'] == 0.6


class _TableMethod:
  """Predicts a fixed table of logits: the image is the row index."""

  def __init__(self, table):
    self.table = jnp.asarray(table)

  def predict(self, variables, images, which='raw'):
    del variables, which
    return self.table[images.astype(jnp.int32)]


def test_evaluation_counts_each_test_example_once_top1_and_top5():
  """37 examples in batches of 8 (3 padding rows): accuracy and top-5 against numpy, in memory
  and per streamed batch."""
  rng = np.random.default_rng(0)
  n, classes = 37, 10
  logits = rng.normal(size=(n, classes)).astype(np.float32)
  labels = rng.integers(0, classes, n).astype(np.int32)
  logits[0, 0] = 10.0  # padding rows are image 0 with label 0: right, so counting them shows
  method = _TableMethod(logits)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  eval_set = train.make_eval_set(np.arange(n), labels, 8, mesh)
  result = jax.device_get(train.make_evaluate(method)(None, *eval_set, which='raw'))
  top5 = np.argsort(-logits, axis=1)[:, :5]
  expected = {'accuracy': np.mean(np.argmax(logits, 1) == labels),
              'top5': np.mean(np.any(top5 == labels[:, None], axis=1))}
  assert result['accuracy'] == pytest.approx(expected['accuracy'])
  assert result['top5'] == pytest.approx(expected['top5'])
  assert expected['top5'] < 1.0  # top-5 of 10 classes: an informative check
  batch = {'image': np.arange(8), 'label': labels[:8],
           'mask': np.array([True] * 5 + [False] * 3)}
  sums = jax.device_get(train.make_evaluate_batch(method)(None, batch, which='raw'))
  np.testing.assert_allclose(sums, [np.sum(np.argmax(logits[:5], 1) == labels[:5]),
                                    np.sum(np.any(top5[:5] == labels[:5, None], axis=1)), 5])



def test_max_eval_examples_evaluates_the_first_examples_of_the_test_set(tmp_path):
  """data.max_eval_examples (in memory): the first N test examples, each counted once (padded to
  whole batches, the padding masked out); 0 keeps the whole test set."""
  config = moons('labels=6', **{'data.max_eval_examples': 130, 'eval_batch_size': 64})
  experiment = train.build(config, str(tmp_path / 'a'))
  images, labels, mask = (np.asarray(a) for a in experiment.eval_set)
  assert images.shape[:2] == (3, 64) and mask.sum() == 130 and mask.reshape(-1)[:130].all()
  np.testing.assert_array_equal(images.reshape(-1, 2)[:130], experiment.data.test_images[:130])
  np.testing.assert_array_equal(labels.reshape(-1)[:130], experiment.data.test_labels[:130])
  config.data.max_eval_examples = 0
  whole = train.build(config, str(tmp_path / 'b')).eval_set[2]
  assert np.asarray(whole).sum() == len(experiment.data.test_labels) == 2000

@pytest.mark.parametrize('ema_decay', [0.9, 0.0])
def test_finetune_starts_from_the_evaluated_student(tmp_path, ema_decay):
  """The finetune stage's network is the MPL stage's evaluated student: its EMA when there is
  one, else the raw student (never the teacher). At lr 0 the finetuned parameters are exactly
  those."""
  config = moons('method=mpl,labels=6,runlocal', total_steps=10, checkpoint_every=10,
                 eval_every=10, ema_decay=ema_decay,
                 **{'finetune.steps': 1, 'finetune.batch_size': 8, 'finetune.lr': 0.0})
  train.train_and_evaluate(config, str(tmp_path))
  with train.Checkpoints(str(tmp_path), keep=1, read_only=True) as checkpoints:
    mpl_state = checkpoints.restore_numpy()
  with train.Checkpoints(str(tmp_path / 'finetune'), keep=1, read_only=True) as checkpoints:
    finetuned = checkpoints.restore_numpy()['params']
  assert_trees_equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  student = mpl_state['params']['student']
  assert_trees_equal(finetuned, mpl_state['ema_params'] if ema_decay else student)
  others = [mpl_state['params']['teacher']] + ([student] if ema_decay else [])
  for other in others:  # e.g. the EMA is not the raw student after 10 steps
    with pytest.raises(AssertionError):
      assert_trees_equal(finetuned, other)



def test_finetune_stage_is_the_papers_recipe():
  """The finetune stage's config: supervised on the labeled split, finetune.batch_size and
  finetune.lr (unscaled, constant), SGD Nesterov 0.9 without weight decay or clipping, no EMA,
  and no further finetune stage of its own."""
  config = load_config('cifar10_4k_mpl.py', 'runlocal')
  config.finetune.update(dict(steps=7, batch_size=24, lr=3e-5))
  ft = train.finetune_config(config)
  assert (ft.method, ft.batch_size, ft.total_steps, ft.ema_decay, ft.finetune.steps) == (
      'supervised', 24, 7, 0.0, 0)
  o = ft.optimizer
  assert (o.name, o.lr, o.scale_lr_by_batch, o.momentum, o.nesterov, o.weight_decay, o.clip_norm,
          o.wait_steps, o.warmup_steps, o.decay) == ('sgd', 3e-5, False, 0.9, True, 0.0, 0.0,
                                                     0, 0, 'constant')
  assert ft.eval_every <= 7 and ft.checkpoint_every <= 7
  assert (ft.num_labeled, ft.dataset, ft.model.to_dict()) == (
      config.num_labeled, config.dataset, config.model.to_dict())

def test_finetune_state_is_made_around_the_student_without_a_random_init(tmp_path):
  """The finetune stage's first state is the one a fresh init makes (same rng, step, optimizer
  state) with the student's networks in it, made without computing the random networks (a
  second EfficientNet-L2 init on a pod) and without copying the donated student."""
  config = train.finetune_config(moons('method=mpl,labels=6,runlocal', **{'finetune.steps': 2}))
  experiment = train.build(config, str(tmp_path))
  rng = jax.random.PRNGKey(3)
  with experiment.activate():
    fresh = experiment.init_state(rng)
    bump = lambda tree: jax.tree.map(lambda x: x + 1, tree)
    student = bump((fresh.params, fresh.batch_stats))
    # From a second copy: an array read on the host may share its buffer with the numpy copy,
    # and a shared buffer is not donated.
    expected = jax.device_get(fresh.replace(params=bump(fresh.params),
                                            batch_stats=bump(fresh.batch_stats)))
    flops = lambda jitted, *args: jitted.lower(*args).compile().cost_analysis()['flops']
    init_flops = flops(experiment.init_state, rng)
    around_flops = flops(experiment.init_state_around, rng, *student)
    state = experiment.init_state_around(rng, *student)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), expected)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(student))  # donated: no copy
  assert around_flops < 0.05 * init_flops, (around_flops, init_flops)


def test_parse_arg_rejects_unknown_keys():
  with pytest.raises(ConfigError, match='valid arguments'):
    load_config('two_moons.py', 'methdo=mpl')
  with pytest.raises(ConfigError, match='expected int'):
    load_config('two_moons.py', 'labels=many')
  with pytest.raises(ConfigError, match="'method' is given twice"):
    load_config('two_moons.py', 'method=mpl,method=supervised')


def test_a_key_nothing_reads_is_refused():
  """A typo in a config file (not a --config flag, which ml_collections checks) is a new key
  that nothing reads: refused, with the key it was probably meant to be. A model block takes
  the model's own options."""
  config = load_config('two_moons.py', 'method=mpl')
  config.optimizer.warmup = 5000
  config.mpl.teacher_optimzer = config.mpl.teacher_optimizer
  with pytest.raises(ConfigError, match=r'mpl.teacher_optimzer \(did you mean mpl.teacher_optimizer'
                     r'\?\), optimizer.warmup \(did you mean optimizer.warmup_steps\?\)'):
    config_lib.validate(config, jax.device_count())
  config = load_config('two_moons.py', 'method=mpl')
  config.model.hidden_sizes = (4, 4)
  config_lib.validate(config, jax.device_count())
  # A run's saved config.json, read by tools (launch/h_noise.py) after the code changed: keys
  # added since then get today's defaults, keys removed since then are dropped.
  saved = json.loads(config.to_json())
  saved['removed_key'], saved['optimizer']['removed_too'] = 1, 2
  del saved['mpl']['h_pass']
  rebuilt = config_lib.saved_run_config(saved)
  assert 'removed_key' not in rebuilt and 'removed_too' not in rebuilt.optimizer
  assert rebuilt.mpl.h_pass == config_lib.base_config().mpl.h_pass
  assert list(rebuilt.model.hidden_sizes) == [4, 4]
  config_lib.validate(rebuilt, jax.device_count())


# --- training ---------------------------------------------------------------------------------


def test_supervised_mlp_two_moons_all_labels_reaches_97_percent(tmp_path):
  # The config's 10k steps at lr 0.1 reach 100%; a shorter, faster schedule keeps CI quick.
  config = moons('labels=-1', **{'total_steps': 3000, 'optimizer.lr': 0.5, 'eval_every': 1000,
                                 'mesh.data': 1})  # one device: 3x faster per step here
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['num_labeled'] == 2000
  assert summary['final']['accuracy'] >= 0.97, summary['final']
  assert os.path.exists(tmp_path / 'curves.png')


def test_a_run_in_progress_redraws_its_curves(tmp_path, monkeypatch):
  overrides = {'total_steps': 8, 'eval_every': 2, 'checkpoint_every': 4}
  stop_at_4 = lambda step: step == 4
  # Left alone, a short run draws its curves once, at the end: a stopped one has none yet.
  train.train_and_evaluate(moons('labels=6', **overrides), str(tmp_path / 'a'),
                           should_stop=stop_at_4)
  assert not os.path.exists(tmp_path / 'a' / 'curves.png')
  monkeypatch.setattr(train, 'PROGRESS_PLOT_EVERY_S', 0.0)
  train.train_and_evaluate(moons('labels=6', **overrides), str(tmp_path / 'b'),
                           should_stop=stop_at_4)
  assert os.path.getsize(tmp_path / 'b' / 'curves.png') > 0
  # A plot that fails is logged; the run goes on to its stop.
  def broken_plot(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(train, 'plot_curves', broken_plot)
  summary = train.train_and_evaluate(moons('labels=6', **overrides), str(tmp_path / 'c'),
                                     should_stop=stop_at_4)
  assert summary['stopped_at'] == 4


def test_a_finished_run_without_matplotlib_keeps_its_summary(tmp_path, monkeypatch):
  """On a machine with only the training packages the end-of-run plot is skipped with a
  warning; it used to fail the run after it had trained."""
  monkeypatch.setitem(sys.modules, 'matplotlib', None)   # import matplotlib -> ImportError
  summary = train.train_and_evaluate(moons('labels=6', total_steps=4, eval_every=2),
                                     str(tmp_path))
  assert summary['steps'] == 4 and os.path.exists(tmp_path / 'summary.json')
  assert not os.path.exists(tmp_path / 'curves.png')


def _params(workdir):
  """Final parameters of the run in `workdir`, read back from its last checkpoint."""
  with train.Checkpoints(workdir, keep=1, read_only=True) as checkpoints:
    return checkpoints.restore_numpy()['params']


def test_resume_after_preemption_equals_uninterrupted_run(tmp_path):
  overrides = {'total_steps': 40, 'checkpoint_every': 20, 'eval_every': 20, 'log_every': 10,
               'model.dropout_rate': 0.2, 'ema_decay': 0.9}
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(moons('labels=6', **overrides), straight)

  interrupted = str(tmp_path / 'interrupted')
  first = train.train_and_evaluate(moons('labels=6', **overrides), interrupted,
                                   should_stop=lambda step: step == 15)  # mid log window
  assert first['stopped_at'] == 15
  assert not os.path.exists(os.path.join(interrupted, 'summary.json'))
  # What a run killed after its checkpoint leaves behind: rows past step 15, the last cut short.
  with open(os.path.join(interrupted, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': 20, 'train/loss': 9.0}) + '\n{"step": 40, "eval/ra')
  resumed = train.train_and_evaluate(moons('labels=6', **overrides), interrupted)
  assert resumed['steps'] == 40
  # Each row once, none stale, and the same training averages: the window that was open at
  # step 15 was saved with the checkpoint.
  rows = lambda w: [json.loads(line) for line in open(os.path.join(w, 'metrics.jsonl'))]
  assert [(r['step'], sorted(r)) for r in rows(interrupted)] == [
      (r['step'], sorted(r)) for r in rows(straight)]
  for a, b in zip(rows(interrupted), rows(straight)):
    assert a == pytest.approx(b, rel=1e-5), (a, b)

  a, b = _params(straight), _params(interrupted)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
  straight_summary = json.load(open(os.path.join(straight, 'summary.json')))
  assert resumed['history'] == straight_summary['history']


def _rows(workdir, key):
  """The rows of WORKDIR/metrics.jsonl that hold `key`."""
  return [row for row in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl')))
          if key in row]


def test_train_rows_average_their_log_window_and_eval_rows_hold_each_evaluation(tmp_path):
  """log_every changes what is logged, not what is trained: a row of log_every=3 is the mean of
  the per-step rows of its window (steps 1-3), and the last step logs its partial window. Each
  evaluation's top-1 and top-5 of each model (raw, EMA) reach metrics.jsonl as in the summary."""
  config = lambda log_every: moons('labels=6', total_steps=4, eval_every=2, checkpoint_every=4,
                                   ema_decay=0.9, log_every=log_every)
  every = str(tmp_path / 'every_step')
  train.train_and_evaluate(config(1), every)
  windowed = str(tmp_path / 'every_3')
  summary = train.train_and_evaluate(config(3), windowed)
  per_step = _rows(every, 'train/loss')
  assert [row['step'] for row in per_step] == [1, 2, 3, 4]
  rows = _rows(windowed, 'train/loss')
  assert [row['step'] for row in rows] == [3, 4]
  for key in rows[0]:
    if key != 'step':
      mean = sum(row[key] for row in per_step[:3]) / 3
      assert rows[0][key] == pytest.approx(mean, rel=1e-6), key
      assert rows[1][key] == pytest.approx(per_step[3][key], rel=1e-6), key
  evals = _rows(windowed, 'eval/raw_accuracy')
  assert [row['step'] for row in evals] == [e['step'] for e in summary['history']] == [2, 4]
  for row, evaluation in zip(evals, summary['history']):
    assert set(evaluation) == {'step', 'raw', 'ema'}
    assert row == {'step': evaluation['step'], **{
        f'eval/{model}_{name}': value for model in ('raw', 'ema')
        for name, value in evaluation[model].items()}}


def test_an_evaluation_at_the_step_a_run_stopped_is_kept_by_its_resume(tmp_path):
  """A run stopped at step 2, where it also evaluates: the checkpoint saved there holds that
  evaluation, so the resumed run's history (summary, best, median) still has step 2."""
  config = lambda: moons('labels=6', total_steps=4, eval_every=2, checkpoint_every=4)
  workdir = str(tmp_path)
  stopped = train.train_and_evaluate(config(), workdir, should_stop=lambda step: step == 2)
  assert stopped['stopped_at'] == 2 and [e['step'] for e in stopped['history']] == [2]
  summary = train.train_and_evaluate(config(), workdir)
  assert [e['step'] for e in summary['history']] == [2, 4]
  assert [row['step'] for row in _rows(workdir, 'eval/raw_accuracy')] == [2, 4]


def test_a_run_keeps_its_last_keep_checkpoints_checkpoints(tmp_path):
  train.train_and_evaluate(moons('labels=6', total_steps=7, eval_every=7, checkpoint_every=2,
                                 log_every=7, keep_checkpoints=3), str(tmp_path))
  with train.Checkpoints(str(tmp_path), keep=1, read_only=True) as checkpoints:
    assert checkpoints.all_steps() == [4, 6, 7]   # every 2 steps, and the last


def test_wall_time_in_the_summary_adds_up_every_session(tmp_path):
  """A resumed run's wall_s counts the sessions before it (saved with each checkpoint), not
  only the time since its last checkpoint."""
  import time
  config = lambda: moons('labels=6', total_steps=4, eval_every=2, checkpoint_every=2,
                         log_every=2)
  def slow_then_stop(step):
    time.sleep(1.0)
    return step == 1
  first = train.train_and_evaluate(config(), str(tmp_path), should_stop=slow_then_stop)
  assert first['stopped_at'] == 1 and first['wall_s'] >= 1.0
  resumed = train.train_and_evaluate(config(), str(tmp_path))
  assert resumed['steps'] == 4 and resumed['wall_s'] >= first['wall_s']


def test_sharded_run_equals_single_device_run(tmp_path):
  overrides = {'total_steps': 5, 'eval_every': 5, 'checkpoint_every': 5}
  one = train.train_and_evaluate(moons('labels=-1', **{**overrides, 'mesh.data': 1}),
                                 str(tmp_path / 'one'))
  eight = train.train_and_evaluate(moons('labels=-1', **overrides), str(tmp_path / 'eight'))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               _params(str(tmp_path / 'one')), _params(str(tmp_path / 'eight')))
  assert one['final'] == eight['final']


def test_epoch_stream_visits_every_index_once_per_epoch():
  key = jax.random.PRNGKey(3)
  pool, batch = 10, 4
  picks = np.concatenate([np.asarray(train.epoch_stream_indices(key, step, batch, pool))
                          for step in range(5)])  # 20 positions = 2 epochs
  assert sorted(picks[:10]) == list(range(10)) and sorted(picks[10:]) == list(range(10))
  assert not np.array_equal(picks[:10], picks[10:])
  big = np.asarray(train.epoch_stream_indices(key, 1, 25, 6))  # batch spans several epochs
  assert all(np.bincount(big[1:25], minlength=6) >= 3)


def test_a_batch_takes_labeled_examples_from_the_labeled_pool_only():
  """sample_batch: the labeled half comes from labeled_idx, the unlabeled from unlabeled_idx,
  each image with its own label and index (a mix-up would leak labels or mislabel images)."""
  images = np.arange(40, dtype=np.float32).reshape(20, 2) * np.array([1.0, -1.0], np.float32)
  arrays = {'images': jnp.asarray(images), 'labels': jnp.arange(20, dtype=jnp.int32) % 3,
            'labeled_idx': jnp.asarray([1, 4, 7, 9], jnp.int32),
            'unlabeled_idx': jnp.asarray([0, 2, 3, 5, 6, 8, 10, 11], jnp.int32)}
  for step in range(4):
    batch = train.sample_batch(arrays, step, jax.random.PRNGKey(step), 3, 6)
    for part, pool in (('labeled', arrays['labeled_idx']), ('unlabeled', arrays['unlabeled_idx'])):
      index = np.asarray(batch[part]['index'])
      assert set(index.tolist()) <= set(np.asarray(pool).tolist()), (part, index)
      np.testing.assert_array_equal(batch[part]['image'], images[index])
      np.testing.assert_array_equal(batch[part]['label'], index % 3)
    assert batch['labeled']['index'].shape == (3,) and batch['unlabeled']['index'].shape == (6,)
  assert 'unlabeled' not in train.sample_batch(arrays, 0, jax.random.PRNGKey(0), 3, 0)


def test_non_finite_loss_stops_with_step_and_term(tmp_path):
  config = moons('labels=-1', **{'optimizer.lr': 1e30, 'model.activation': 'relu',
                                 'model.initializer': 'lecun'})
  with pytest.raises(NonFiniteLossError, match=r'non-finite loss = .* at step \d+\. .*no '
                     r'checkpoint had been saved yet.*lower --config.optimizer.lr'):
    train.train_and_evaluate(config, str(tmp_path))
  # The advice names the keys that set the learning rates of each method and stage.
  assert '--config.mpl.student_optimizer.lr' in train.divergence_advice(moons('method=mpl'))
  assert '--config.finetune.lr' in train.divergence_advice(config, 'finetune')


def test_a_non_finite_loss_names_its_step_and_term_and_is_never_checkpointed(tmp_path,
                                                                             monkeypatch):
  """An inf loss (not only NaN) at step 4, a checkpoint step: the error names that step and the
  loss term (before another non-finite metric), says the checkpoint of step 2 is intact, and the
  bad state is not saved. Resumed from step 2, a NaN at step 3 names step 3; the checkpoint it
  resumed from is intact although this session saved none."""
  bad_update = []  # index of the update (state.step before it) whose metrics are made bad
  step_fn = train.Experiment.step

  def step(self, state, index):
    state, metrics = step_fn(self, state, index)
    if bad_update and index == bad_update[0]:
      metrics = {**metrics, 'loss': jnp.float32(bad_update[1]), 'grad_norm': jnp.float32(np.nan)}
    return state, metrics
  monkeypatch.setattr(train.Experiment, 'step', step)
  config = lambda: moons('labels=6', total_steps=6, checkpoint_every=2, eval_every=6,
                         log_every=6)
  workdir = str(tmp_path / 'run')
  bad_update[:] = [3, np.inf]
  with pytest.raises(NonFiniteLossError, match=r'non-finite loss = inf at step 4\. .*the last '
                     r'checkpoint is intact'):
    train.train_and_evaluate(config(), workdir)
  with train.Checkpoints(workdir, keep=1, read_only=True) as checkpoints:
    assert checkpoints.all_steps() == [2]
  bad_update[:] = [2, np.nan]
  with pytest.raises(NonFiniteLossError, match=r'non-finite loss = nan at step 3\. .*the last '
                     r'checkpoint is intact'):
    train.train_and_evaluate(config(), workdir)
  with pytest.raises(NonFiniteLossError, match=r'loss_student = -inf at finetune step 7\. '):
    train.check_finite({'accuracy': np.nan, 'loss_student': -np.inf}, 7, stage='finetune')


# --- bad input fails before training, clearly ---------------------------------------------------


@pytest.mark.parametrize('overrides, message', [
    ({'method': 'meta_pseudo'}, 'unknown method'),
    ({'dataset': 'mnist_typo'}, 'unknown dataset'),
    ({'model.name': 'vgg'}, 'unknown model'),
    ({'num_labeled': 5000}, 'exceeds'),
    ({'batch_size': 12}, 'not divisible by the data-axis size 8'),
    ({'mesh.data': 16}, 'devices'),
    ({'augment.strong': 'randaugment'}, 'unknown augment.strong'),
    ({'augment.strong': 'fixmatch'}, 'magnitude=10'),   # the MPL default 16 must not leak in
    ({'method': 'mpl', 'mpl.h_pass': 'fresh'}, r"unknown mpl.h_pass 'fresh'.*'paired'"),
    ({'method': 'mpl', 'data.exclude_labeled': True}, 'mpl needs unlabeled data'),
    ({'method': 'mpl', 'mu': 0}, 'set mu >= 1'),
    ({'keep_checkpoints': 0}, 'keep_checkpoints must be positive'),
    ({'eval_batch_size': 0}, 'eval_batch_size must be positive'),
    ({'mesh.data': 0}, r'mesh.data must be >= 1, or -1'),
    ({'augment.labeled': 'strong'}, "unknown augment.labeled 'strong'"),
    ({'data.max_eval_examples': -1}, 'max_eval_examples must be >= 0'),
    ({'finetune.steps': 2, 'finetune.batch_size': 0}, 'finetune.batch_size must be >= 1'),
    # Values outside their meaning, which would otherwise train nonsense without an error.
    ({'optimizer.lr': -0.1}, r'config.optimizer.lr must be in \[0, inf\), got -0.1'),
    ({'optimizer.lr': float('inf')}, r'config.optimizer.lr must be in \[0, inf\), got inf'),
    ({'optimizer.momentum': 1.5}, r'optimizer.momentum must be in \[0, 1\)'),
    ({'optimizer.clip_norm': -1.0}, r'optimizer.clip_norm must be >= 0.*no clipping'),
    ({'optimizer.decay': 'cosin'}, r"unknown optimizer.decay 'cosin'"),
    ({'method': 'mpl', 'mpl.teacher_optimizer.lr': -0.1}, 'mpl.teacher_optimizer.lr'),
    ({'method': 'mpl', 'mpl.uda_temperature': 0.0}, 'mpl.uda_temperature must be > 0'),
    ({'method': 'mpl', 'mpl.uda_threshold': 1.5}, r'uda_threshold must be in \[0, 1\]'),
    ({'method': 'mpl', 'mpl.baseline_decay': 1.5}, 'baseline_decay'),
    ({'mpl.feedback': 'first-order'}, r"unknown mpl.feedback 'first-order'"),
    ({'ema_decay': 1.0}, r'ema_decay must be in \[0, 1\).*EMA off'),
    ({'ema_decay': -0.1}, 'ema_decay'),
    ({'label_smoothing': 1.0}, 'label_smoothing'),
    ({'model.dropout_rate': 1.0}, r'model.dropout_rate must be in \[0, 1\)'),
    ({'model.activation': 'relux'}, r"unknown model.activation 'relux'"),
    ({'model.hidden_sizes': (0,)}, 'hidden_sizes entries must be >= 1'),
    ({'method': 'pseudo_label', 'pseudo_label.threshold': 1.5}, 'pseudo_label.threshold'),
    ({'method': 'pseudo_label', 'pseudo_label.weight': -1.0}, 'pseudo_label.weight'),
    ({'augment.pad_mode': 'mirror'}, r"unknown augment.pad_mode 'mirror'"),
    ({'augment.num_layers': -1}, 'augment.num_layers must be >= 0'),
    ({'augment.fill': 300}, r'augment.fill must be in \[0, 255\]'),
    ({'augment.strong': 'mpl'}, 'two_moons holds points, not images'),
    ({'augment.labeled': 'weak'}, 'augment.labeled=none'),
    ({'spatial_partition': 'width'}, 'spatial_partition needs images'),
    ({'data.streaming': True}, 'scikit-learn'),
    ({'data.noise': -1.0}, 'data.noise must be >= 0'),
    ({'num_labeled': -2}, r'num_labeled must be -1 \(every example labeled\) or a positive'),
    ({'num_labeled': 0}, r'num_labeled must be -1 \(every example labeled\) or a positive'),
    ({'checkpoint_every': 0}, 'checkpoint_every must be positive'),
    ({'log_every': 0}, 'log_every must be positive'),
    ({'eval_every': 0}, 'eval_every must be positive'),
    ({'mesh.model': 3, 'total_steps': 2}, 'mesh.model=3 does not divide the 8 available'),
    ({'finetune.steps': -5}, 'finetune.steps must be >= 0'),
    ({'sharding_rules': (('features', 'modle'),)}, "mesh axes are 'data', 'model'"),
    ({'sharding_rules': (('featurez', 'model'),)}, "logical axis name.*'featurez'"),
])
def test_bad_config_fails_before_training(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(moons('labels=-1', **overrides), str(tmp_path / 'run'))
  # No workdir is left behind (nor a labeled split in it for the corrected rerun to trip over).
  assert not os.path.exists(tmp_path / 'run')
  # In a workdir that was there before, nothing is written.
  with pytest.raises(ConfigError, match=message):
    train.train_and_evaluate(moons('labels=-1', **overrides), str(tmp_path))
  assert set(os.listdir(tmp_path)) <= {'run', '.lock'}


def test_bounds_that_are_valid_values_are_accepted():
  """The inclusive ends of each range are settings a run may use: FixMatch's official magnitude
  10 (the value the error message asks for), thresholds and a baseline decay of 1, a fill of
  255; one step past them is refused."""
  config = load_config('digits.py', 'method=mpl,runlocal')
  config.augment.strong, config.augment.magnitude = 'fixmatch', 10
  config.augment.fill = 255
  config.mpl.uda_threshold, config.mpl.baseline_decay = 1.0, 1.0
  config.pseudo_label.threshold = 1.0
  config_lib.validate(config, jax.device_count())
  for key, value, message in (('magnitude', 11, 'magnitude = 11'),
                              ('magnitude', 1, 'magnitude = 1'),
                              ('fill', 256, r'augment.fill must be in \[0, 255\], got 256')):
    bad = config.copy_and_resolve_references()
    bad.augment[key] = value
    with pytest.raises(ConfigError, match=message):
      config_lib.validate(bad, jax.device_count())


def test_optimizer_settings_left_none_are_off():
  # mpl.optim reads a None momentum or clip_norm as off; validation agrees.
  config = moons('labels=6', **{'optimizer.clip_norm': None, 'optimizer.momentum': None})
  config_lib.validate(config, jax.device_count())


def test_bad_image_settings_fail_before_training(tmp_path):
  config = load_config('digits.py', 'method=mpl,runlocal')
  config.augment.cutout_size = 9  # the digits are 8x8
  with pytest.raises(ConfigError, match='cutout_size=9 exceeds the 8-pixel images'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  config = load_config('fashion_mnist.py', 'runlocal')
  config.data.data_dir = str(tmp_path / 'typo')
  with pytest.raises(DataError, match='typo is not a directory'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'typo') and not os.path.exists(tmp_path / 'run')
  # With stand-in data allowed, a missing data_dir is missing data like any other; the stand-in
  # set holds the config's 1000 labels.
  config.data.standin = 'if_missing'
  config.total_steps = 1
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['dataset'] == 'fashion_mnist' and summary['steps'] == 1
  assert summary['num_labeled'] == 1000


def test_a_run_cannot_resume_into_fewer_steps(tmp_path):
  steps = {'eval_every': 2, 'checkpoint_every': 2, 'log_every': 2}
  train.train_and_evaluate(moons('labels=6', total_steps=4, **steps), str(tmp_path))
  with pytest.raises(ConfigError, match="checkpoint at step 4, past this config's total_steps=2"):
    train.train_and_evaluate(moons('labels=6', total_steps=2, **steps), str(tmp_path))


def test_missing_dataset_names_the_install_command(tmp_path, monkeypatch):
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)
  monkeypatch.setattr(datasets, 'FASHION_MNIST_DEFAULT_DIR', str(tmp_path / 'nowhere'))
  config = load_config('fashion_mnist.py', 'runlocal')
  config.data.source = 'idx'
  with pytest.raises(DataError, match='apt-get install -y dataset-fashion-mnist'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


@pytest.mark.parametrize('args, message', [
    (['--config.optimizer.lrr=0.1'], "unknown config key 'optimizer.lrr'. Did you mean "
                                     "--config.optimizer.lr?"),
    (['--config.batch_size=1.5'], "config.batch_size is an integer, got '1.5'."),
    (['--config.optimizer.lr=fast'], "config.optimizer.lr is a number, got 'fast'."),
    (['--config.mpl.teacher_model.name=cnn'], 'set the whole block in a config file'),
    (['--config', 'configs/two_moon.py'], "--config 'configs/two_moon.py' did not load: [Errno 2]"),
    (['--config', 'README.md'], "--config 'README.md' did not load"),
    (['--config', 'configs/two_moons.py:method=nope'], "unknown method 'nope'"),
    (['stray'], "unexpected arguments ['stray']"),
    (['--workdir', 'WORKDIR/summary.json'], 'is a file, not a directory'),
    (['--workdir='], '--workdir is empty'),
    (['--workdir', '--config.seed=1'], 'looks like a flag'),
    (['--config', 'configs/two_moons.py', '--config', 'configs/digits.py'],
     '--config is given twice'),
    (['--config.data.dataset=digits'], "unknown config key 'data.dataset'. Did you mean "
                                       "--config.dataset?"),
    (['--config.optimizer.lr=0.1', '--config.mpl.lr=0.2'], "unknown config key 'mpl.lr'."),
    (['--config.mpl.uda_thresold=0.5'], "Did you mean --config.mpl.uda_threshold?"),
    # (total_steps=0 would stop the run too, with another message, were the flag let through)
    (['--num_processes=2', '--config.total_steps=0'], '--num_processes needs --distributed.'),
    (['--distributed'], 'or drop --distributed for a single-host run.'),  # no cluster here
])
def test_main_prints_a_clear_error_for_a_bad_command_line(tmp_path, args, message):
  (tmp_path / 'summary.json').write_text('{}')  # a file where a directory should be
  command = [sys.executable, '-m', 'mpl.main', '--workdir', str(tmp_path / 'run')]
  if '--config' not in args:
    command += ['--config', 'configs/two_moons.py:runlocal']
  command += [a.replace('WORKDIR', str(tmp_path)) for a in args]  # a later --workdir wins
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert len(result.stderr.strip().splitlines()) <= 8  # the error, not a page of help


@pytest.mark.parametrize('error, status', [('DataError', 2), ('NonFiniteLossError', 1)])
def test_main_exits_with_the_errors_status_and_one_line(tmp_path, error, status):
  """Missing data stops with status 2, a diverged run with 1 (mpl/errors.py): one line each,
  no traceback. The run itself is replaced by one that raises the error."""
  argv = ['mpl.main', '--config', 'configs/two_moons.py:runlocal', '--workdir',
          str(tmp_path / 'run')]
  code = ('import runpy, sys\n'
          'from mpl import errors, train\n'
          'def train_and_evaluate(*args, **kwargs):\n'
          f'  raise errors.{error}("the reason, and the fix")\n'
          'train.train_and_evaluate = train_and_evaluate\n'
          f'sys.argv = {argv!r}\n'
          'runpy.run_module("mpl.main", run_name="__main__")\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert result.returncode == status, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == 'error: the reason, and the fix'
  assert 'Traceback' not in result.stderr


def test_flags_for_another_methods_block_are_named_as_unread(tmp_path):
  from mpl import config_lib  # pylint: disable=g-import-not-at-top
  argv = ['mpl.main', '--config.mpl.feedback=exact', '--config.pseudo_label.rounds', '2',
          '--config.reduced_mpl.h_pass=official', '--config.optimizer.lr=0.1', '--config.mpl=x',
          '--config', 'configs/two_moons.py']
  assert config_lib.unread_flags('supervised', argv) == argv[1:3] + argv[4:5]
  assert config_lib.unread_flags('mpl', argv) == [argv[2], argv[4]]
  assert config_lib.unread_flags('pseudo_label', argv) == [argv[1], argv[4]]
  # The suggested --config argument sets the method once (a key given twice is refused).
  assert (config_lib.with_method('configs/two_moons.py:method=supervised,labels=6', 'mpl')
          == 'configs/two_moons.py:method=mpl,labels=6')
  assert config_lib.with_method('configs/two_moons.py', 'mpl') == 'configs/two_moons.py:method=mpl'
  # What the user sees: one warning per flag, naming the fix, before anything else is checked
  # (here a bad total_steps then stops the run, before it compiles anything).
  command = [sys.executable, '-m', 'mpl.main', '--config', 'configs/two_moons.py:runlocal',
             '--workdir', str(tmp_path / 'run'), '--config.total_steps=0',
             '--config.mpl.feedback=exact']
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 2 and 'total_steps' in result.stderr, result.stderr[-2000:]
  assert ("--config.mpl.feedback=exact has no effect: method 'supervised' does not read the "
          "'mpl' block. For a run of method 'mpl', set the method: --config "
          "configs/two_moons.py:runlocal,method=mpl (where the config takes it) or "
          "--config.method=mpl.") in result.stderr


def test_trains_without_tensorflow(tmp_path):
  """GPU machines often have no TensorFlow: the loop, logs and fashion_mnist (IDX) still work."""
  script = f'''
import sys
sys.modules['tensorflow'] = None            # `import tensorflow` now raises ImportError
sys.modules['tensorflow_datasets'] = None
import importlib.util
from mpl import train
for name, path in (('moons', 'configs/two_moons.py'), ('fm', 'configs/fashion_mnist.py')):
  spec = importlib.util.spec_from_file_location('c', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('runlocal')
  config.total_steps = 2
  summary = train.train_and_evaluate(config, {str(tmp_path)!r} + '/' + name)
  assert summary['steps'] == 2
assert 'tensorflow' not in [m for m, v in sys.modules.items() if v is not None]
print('OK without tensorflow')
'''
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)
  assert 'OK without tensorflow' in result.stdout, result.stderr[-3000:]
  assert os.path.exists(tmp_path / 'moons' / 'metrics.jsonl')


def test_streaming_input_trains_and_evaluates(tmp_path):
  """A TFDS dataset too large for memory streams through tf.data into global sharded arrays."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class StreamTiny(tfds.core.GeneratorBasedBuilder):
    """16x16 RGB images whose class is the brightest channel (learnable)."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(16, 16, 3)),
          'label': tfds.features.ClassLabel(num_classes=3)}), supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(96), 'validation': self._generate_examples(40)}

    def _generate_examples(self, n):
      rng = np.random.default_rng(n)
      for i in range(n):
        image = rng.integers(0, 100, (16, 16, 3), dtype=np.uint8)
        image[..., i % 3] += 120
        yield i, {'image': image, 'label': i % 3}

  data_dir = str(tmp_path / 'tfds')
  StreamTiny(data_dir=data_dir).download_and_prepare()
  config = moons('labels=-1', **{
      'dataset': 'stream_tiny', 'data.streaming': True, 'data.data_dir': data_dir,
      'data.image_size': 16, 'model.name': 'cnn', 'batch_size': 16, 'eval_batch_size': 16,
      'total_steps': 4, 'eval_every': 2, 'checkpoint_every': 2, 'log_every': 2})
  config.model = type(config.model)({'name': 'cnn'})
  summary = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert summary['steps'] == 4 and summary['num_labeled'] == 96
  assert 0.0 <= summary['final']['accuracy'] <= 1.0
  assert len(summary['history']) == 2
  # The benchmark times the same step on streamed batches.
  from mpl import bench  # pylint: disable=g-import-not-at-top
  record = bench.bench_train_step(config, steps=2, warmup=1)
  assert record['image_shape'] == [16, 16, 3] and record['final_step'] == 1 + 2 * 2
  assert record['step_ms_median'] > 0
  # Multi-host: data missing on another host is missing on this one too (all hosts stop, or all
  # fall back to stand-in data), never real arrays here and stand-in arrays there.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, 'any_process', lambda flag: True)  # another host's flag is True
    with pytest.raises(DataError, match='missing on another host'):
      train.build(config, str(tmp_path / 'run'))

# After Ctrl-C the process ends by SIGINT (-2), so that a shell loop over runs stops too.
@pytest.mark.parametrize('signal_name, logged, status', [
    ('SIGTERM', 'SIGTERM received', 0),
    ('SIGINT', 'stopped by Ctrl-C at step', -2)])
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, signal_name, logged, status):
  import signal
  import time
  workdir = str(tmp_path / 'run')
  command = [sys.executable, '-m', 'mpl.main', '--config', 'configs/two_moons.py:labels=-1',
             '--workdir', workdir, '--config.total_steps=1000000',
             '--config.checkpoint_every=1000000', '--config.eval_every=1000000']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  try:
    for line in process.stderr:  # wait until the loop runs
      if 'Training supervised on two_moons' in line:
        break
    time.sleep(3)
    process.send_signal(getattr(signal, signal_name))
    _, rest = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == status, rest[-2000:]
  assert logged in rest and 'Traceback' not in rest
  steps = [int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 1_000_000
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))


def test_ctrl_c_while_the_run_starts_is_not_lost(tmp_path):
  """Ctrl-C before the loop's handler is in place, landing in a garbage-collection callback
  (Python prints and drops a KeyboardInterrupt raised there; JAX frees programs in one): the run
  still stops, after its first step, with a checkpoint, and ends by SIGINT. It trained on to
  the end before."""
  workdir = str(tmp_path / 'run')
  argv = ['mpl.main', '--config', 'configs/two_moons.py:labels=-1', '--workdir', workdir,
          '--config.total_steps=300', '--config.eval_every=300', '--config.checkpoint_every=300']
  code = ('import gc, os, runpy, signal, sys\n'
          'fired = []\n'
          'def interrupt_once(phase, info):\n'
          '  if "jax" in sys.modules and not fired:\n'
          '    fired.append(1)\n'
          '    os.kill(os.getpid(), signal.SIGINT)\n'
          '    for _ in range(1000): pass  # the handler runs here, inside the callback\n'
          'gc.callbacks.append(interrupt_once)\n'
          f'sys.argv = {argv!r}\n'
          'runpy.run_module("mpl.main", run_name="__main__")\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert 'KeyboardInterrupt' in result.stderr  # it was dropped in the callback
  assert result.returncode == -2, result.stderr[-3000:]
  assert 'stopped by Ctrl-C at step 1, after saving a checkpoint' in result.stderr
  assert os.listdir(os.path.join(workdir, 'checkpoints')) == ['1']
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))


def test_ctrl_c_in_the_finetune_stage_names_the_stage_and_its_step(tmp_path, monkeypatch):
  import signal
  flags, calls = [], []
  enter = train.PreemptionFlag.__enter__
  monkeypatch.setattr(train.PreemptionFlag, '__enter__', lambda self: flags.append(self) or
                      enter(self))

  def ctrl_c_at_the_fifth_step(step):  # the handler's work, without a real signal
    calls.append(step)
    if len(calls) == 5:
      flags[0]._handle(signal.SIGINT, None)
    return False
  config = moons('labels=6', total_steps=4, eval_every=4, checkpoint_every=4,
                 **{'finetune.steps': 4, 'finetune.batch_size': 8})
  # Asked during finetune step 1, the run stops after the next one (as after a real Ctrl-C).
  with pytest.raises(KeyboardInterrupt, match=r'at finetune step 2 \(step 6 overall\), after '):
    train.train_and_evaluate(config, str(tmp_path), should_stop=ctrl_c_at_the_fifth_step)
  assert calls == [1, 2, 3, 4, 1]
  assert os.listdir(tmp_path / 'finetune' / 'checkpoints') == ['2']


@pytest.mark.parametrize('signal_name, status', [('SIGTERM', -15), ('SIGINT', -2)])
def test_second_sigterm_exits_at_once(signal_name, status):
  """The first SIGTERM (or Ctrl-C) asks for a checkpoint; a second one (the first waits on a
  long compile or evaluation) ends the process."""
  code = ('import os, signal, time\n'
          'from mpl.train import PreemptionFlag\n'
          'with PreemptionFlag() as flag:\n'
          f'  os.kill(os.getpid(), signal.{signal_name})\n'
          '  print("requested", flag.requested, flush=True)\n'
          f'  os.kill(os.getpid(), signal.{signal_name})\n'
          '  time.sleep(30)\n'
          '  print("still running", flush=True)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert result.stdout == 'requested True\n' and result.returncode == status, result


def test_finetune_stage_after_a_one_network_method(tmp_path):
  """Supervised without an EMA has no 'student' sub-tree: the finetune stage starts from its
  one network (it failed after the whole first stage had trained)."""
  def config(finetune_steps):
    return moons('labels=6', total_steps=4, eval_every=4, checkpoint_every=4,
                 **{'finetune.steps': finetune_steps, 'finetune.batch_size': 8})
  # Added to a finished run (only the finetune settings change, and its stage has steps to
  # train): a continuation, not refused.
  assert 'before_finetune' not in train.train_and_evaluate(config(0), str(tmp_path))
  summary = train.train_and_evaluate(config(2), str(tmp_path))
  assert summary['finetune_steps'] == 2 and summary['before_finetune']['steps'] == 4
  # A finetune stage cannot go back either; refused before the run's record is touched.
  recorded = (tmp_path / 'config.json').read_text()
  with pytest.raises(ConfigError, match="step 2, past this config's finetune.steps=1"):
    train.train_and_evaluate(config(1), str(tmp_path))
  with pytest.raises(ConfigError, match=r'finished run.*\(finetune.steps: 2 -> 0\)'):
    train.train_and_evaluate(config(0), str(tmp_path))  # would drop the finetuned result
  assert (tmp_path / 'config.json').read_text() == recorded


def test_a_stop_in_the_first_stage_never_starts_the_finetune_stage(tmp_path, monkeypatch):
  """A run stopped in its first stage (at step 2, or by a SIGTERM that lands after its last
  step) does not finetune a student the resumed run would go on training: no finetune
  checkpoint, no summary.json, the signal handlers put back. The rerun finetunes, and its
  curves show both stages."""
  config = lambda: moons('labels=6', total_steps=4, eval_every=4, checkpoint_every=4,
                         **{'finetune.steps': 2, 'finetune.batch_size': 8})
  finetune_dir = tmp_path / 'finetune' / 'checkpoints'
  handlers = lambda: [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  before = handlers()
  stopped = train.train_and_evaluate(config(), str(tmp_path), should_stop=lambda s: s == 2)
  assert stopped['stopped_at'] == 2 and 'before_finetune' not in stopped
  assert not finetune_dir.exists() and handlers() == before
  flags, summarize, enter = [], train.summarize, train.PreemptionFlag.__enter__

  def remembered_enter(self):
    flags.append(self)
    return enter(self)

  def sigterm_as_the_stage_ends(*args, **kwargs):  # the handler's work, without a real signal
    if not flags[-1].requested:  # once: a second signal would end the process
      flags[-1]._handle(signal.SIGTERM, None)
    return summarize(*args, **kwargs)

  monkeypatch.setattr(train.PreemptionFlag, '__enter__', remembered_enter)
  monkeypatch.setattr(train, 'summarize', sigterm_as_the_stage_ends)
  stopped = train.train_and_evaluate(config(), str(tmp_path))
  assert stopped['stopped_at'] == 4 and 'before_finetune' not in stopped
  assert not finetune_dir.exists() and not (tmp_path / 'summary.json').exists()
  monkeypatch.setattr(train, 'summarize', summarize)
  drawn = []
  monkeypatch.setattr(train, 'draw_curves', lambda stages, *args: drawn.append(stages))
  summary = train.train_and_evaluate(config(), str(tmp_path))
  assert 'stopped_at' not in summary and summary['steps'] == 6
  assert summary['before_finetune']['steps'] == 4 and os.listdir(finetune_dir) == ['2']
  assert drawn == [[summary['before_finetune']['history'], summary['history']]]
  assert [[e['step'] for e in stage] for stage in drawn[0]] == [[4], [2]]


def test_the_wall_time_of_a_run_with_a_finetune_stage_is_both_stages(tmp_path):
  """summary.json's wall_s is the MPL stage's (before_finetune.wall_s) plus the finetune
  stage's own (saved with its checkpoints), not the finetune stage's alone."""
  import orbax.checkpoint as ocp
  config = moons('labels=6', total_steps=4, eval_every=4, checkpoint_every=4,
                 **{'finetune.steps': 2, 'finetune.batch_size': 8})
  summary = train.train_and_evaluate(config, str(tmp_path))
  with train.Checkpoints(str(tmp_path / 'finetune'), keep=1, read_only=True) as checkpoints:
    finetune_meta = checkpoints.manager.restore(
        checkpoints.latest_step(), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  assert finetune_meta['wall_s'] > 0
  assert summary['wall_s'] == pytest.approx(
      summary['before_finetune']['wall_s'] + finetune_meta['wall_s'], abs=0.011)


def test_epoch_stream_is_int32_safe_at_large_steps():
  """Steps where step * batch_size overflows int32 still give valid, epoch-consistent batches."""
  key = jax.random.PRNGKey(0)
  pool, batch = 1000, 896
  step = 3_000_000  # step * batch = 2.7e9 > 2**31
  picks = np.asarray(jax.jit(train.epoch_stream_indices, static_argnums=(2, 3))(
      key, jnp.int32(step), batch, pool))
  assert picks.min() >= 0 and picks.max() < pool
  # Exact reference in Python integers.
  positions = step * batch + np.arange(batch)
  epochs, offsets = positions // pool, positions % pool
  perms = {e: np.asarray(jax.random.permutation(jax.random.fold_in(key, int(e)), pool))
           for e in set(epochs.tolist())}
  expected = np.array([perms[e][o] for e, o in zip(epochs.tolist(), offsets.tolist())])
  np.testing.assert_array_equal(picks, expected)


def test_read_only_checkpoints_create_nothing(tmp_path):
  """Tools that inspect a run open its checkpoints read-only: no folder appears in the workdir."""
  reader = train.Checkpoints(str(tmp_path / 'inspected'), keep=2, read_only=True)
  assert reader.all_steps() == [] and not (tmp_path / 'inspected').exists()
  reader.close()
  writer = train.Checkpoints(str(tmp_path / 'trained'), keep=2)
  assert (tmp_path / 'trained' / 'checkpoints').is_dir()
  writer.close()


def test_one_process_saves_replicated_arrays_whole_and_restores_them(tmp_path, caplog):
  """Orbax's replica-parallel saving would slice each replicated array into one piece per
  replica, each a compiled program; one process saves the whole shards instead. Typed PRNG keys,
  which that saving would restore as raw data, are refused."""
  mesh = jax.make_mesh((8,), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  state = {'kernel': jax.device_put(np.arange(8 * 24, dtype=np.float32).reshape(8, 24), replicated),
           'rows': jax.device_put(np.arange(16 * 5, dtype=np.float32).reshape(16, 5), split)}
  checkpoints = train.Checkpoints(str(tmp_path), keep=1)
  caplog.set_level('WARNING')
  with jax.log_compiles(True):
    checkpoints.save(0, state, {'note': 'x'})
    checkpoints.close()
  assert not [r.message for r in caplog.records if 'Compiling' in r.getMessage()]
  reader = train.Checkpoints(str(tmp_path), keep=1)
  restored, meta = reader.restore(
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state))
  reader.close()
  assert meta == {'note': 'x'}
  for key in state:
    np.testing.assert_array_equal(restored[key], state[key])
    assert restored[key].sharding == state[key].sharding
  writer = train.Checkpoints(str(tmp_path / 'keys'), keep=1)
  with pytest.raises(TypeError, match=r"typed PRNG keys .*\['rng'\]"):
    writer.save(0, {'rng': jax.random.key(0), 'step': np.int32(3)}, {})
  writer.close()


def test_resume_with_another_config_records_what_changed(tmp_path, monkeypatch):
  """A run resumed with a changed config continues; config_changes.jsonl keeps the history."""
  workdir = str(tmp_path / 'run')
  overrides = {'checkpoint_every': 4, 'eval_every': 4, 'log_every': 2}
  train.train_and_evaluate(moons('labels=6', total_steps=4, **overrides), workdir)
  changes = os.path.join(workdir, 'config_changes.jsonl')
  events = lambda: sorted(f for f in os.listdir(workdir) if f.startswith('events.'))
  first_events = events()
  train.train_and_evaluate(moons('labels=6', total_steps=4, **overrides), workdir)
  assert not os.path.exists(changes)  # the same config: nothing to record
  assert events() == first_events  # nothing trained: no new (empty) TensorBoard file

  # Continued, the finished run's summary.json goes: until the longer run ends, a tool would
  # take it for this run's result.
  assert os.path.exists(os.path.join(workdir, 'summary.json'))
  stopped = train.train_and_evaluate(
      moons('labels=6', total_steps=8, **{**overrides, 'optimizer.lr': 0.05}), workdir,
      should_stop=lambda step: step >= 5)
  assert stopped['stopped_at'] == 5
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  summary = train.train_and_evaluate(
      moons('labels=6', total_steps=8, **{**overrides, 'optimizer.lr': 0.05}), workdir)
  assert summary['steps'] == 8
  lines = [json.loads(line) for line in open(changes)]
  assert lines == [{'step': 4, 'changed': {'optimizer.lr': [0.1, 0.05], 'total_steps': [4, 8]}}]
  assert json.load(open(os.path.join(workdir, 'config.json')))['optimizer']['lr'] == 0.05

  # A config whose checkpoint does not fit stops with a clear error naming what changed, and
  # leaves the record alone (no TensorBoard file either).
  saved = open(os.path.join(workdir, 'config.json')).read()
  events_before = events()
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  with pytest.raises(ConfigError, match=r'does not fit this config .*: params/classifier/kernel '
                     r'has shape \(8, 2\) in the checkpoint, \(16, 2\) in this config; .* more'
                     r"\. This config differs from the run's: model.hidden_sizes: \[8, 8\] -> "
                     r'\[16, 16\]; total_steps: 8 -> 12\. Use a new --workdir\.'):
    train.train_and_evaluate(
        moons('labels=6', total_steps=12, **{**overrides, 'optimizer.lr': 0.05,
                                             'model.hidden_sizes': (16, 16)}), workdir)
  gc.collect()
  assert not unraisable, unraisable  # no half-done Orbax reads left behind
  assert open(os.path.join(workdir, 'config.json')).read() == saved
  assert len(open(changes).readlines()) == 1
  assert events() == events_before

  # The run is finished: another config would train nothing and relabel its summary. (A key
  # its config.json lacks, from a newer version of the code, is not a change.)
  record = json.loads(saved)
  del record['augment']['magnitude']
  open(os.path.join(workdir, 'config.json'), 'w').write(json.dumps(record, indent=2))
  train.train_and_evaluate(moons('labels=6', total_steps=8, **{**overrides, 'optimizer.lr': 0.05}),
                           workdir)
  open(os.path.join(workdir, 'config.json'), 'w').write(saved)
  summary = open(os.path.join(workdir, 'summary.json')).read()
  with pytest.raises(ConfigError, match=r'holds a finished run, and this config differs from the '
                     r'one it was trained with \(seed: 0 -> 3\)'):
    train.train_and_evaluate(
        moons('labels=6', total_steps=8, seed=3, **{**overrides, 'optimizer.lr': 0.05}), workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == saved
  assert open(os.path.join(workdir, 'summary.json')).read() == summary
  # Keys that do not change what a run computes (how often it logs, where its data is) do not
  # refuse it: the same run from another checkout.
  rerun = train.train_and_evaluate(
      moons('labels=6', total_steps=8, **{**overrides, 'optimizer.lr': 0.05, 'log_every': 4}),
      workdir)
  assert rerun['final'] == json.loads(summary)['final']


def test_a_split_no_checkpoint_used_is_replaced(tmp_path):
  """A run that failed before its first checkpoint (a NaN, a kill) does not lock its corrected
  command out."""
  workdir = str(tmp_path / 'run')

  def killed(step):
    raise RuntimeError('killed')
  with pytest.raises(RuntimeError, match='killed'):
    train.train_and_evaluate(moons('labels=6', total_steps=4, checkpoint_every=4, eval_every=4),
                             workdir, should_stop=killed)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '1'))
  assert json.load(open(os.path.join(workdir, 'labeled_split.json')))['num_labeled'] == 6
  summary = train.train_and_evaluate(
      moons('labels=8', total_steps=4, checkpoint_every=4, eval_every=4), workdir)
  assert summary['num_labeled'] == 8
  assert json.load(open(os.path.join(workdir, 'labeled_split.json')))['num_labeled'] == 8
  # With a checkpoint made on it, the split is the run's: another one is refused.
  with pytest.raises(ConfigError, match='labeled_split.json was made for num_labeled=8'):
    train.train_and_evaluate(moons('labels=6', total_steps=8), workdir)


def test_checkpoint_differences_name_each_array():
  def arrays(**shapes):
    return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}
  differences = sharding.shape_differences
  assert differences(arrays(a=(2,), b=(3,)), arrays(b=(3,))) == 'a is in the checkpoint only'
  assert differences(arrays(b=(3,)), {'x': arrays(c=(1,)), **arrays(b=(4,))}) == (
      'b has shape (3,) in the checkpoint, (4,) in this config; x/c is not in the checkpoint')
  assert differences(arrays(b=(3,)), arrays(b=(3,))) == ''
  assert differences(arrays(**{c: (1,) for c in 'abcdefgh'}), {}).endswith('and 2 more')
  assert differences(arrays(b=(3,)), arrays(b=(4,)), 'the run', 'the model', prefix='p/') == (
      'p/b has shape (3,) in the run, (4,) in the model')


def test_config_changes_names_added_and_removed_keys():
  saved = {'a': 1, 'b': {'c': [1, 2], 'gone': 0}}
  current = {'a': 1, 'b': {'c': [1, 3], 'new': None}}
  assert train.config_changes(saved, current) == {
      'b.c': [[1, 2], [1, 3]], 'b.gone': [0, train.NOT_SAVED], 'b.new': [train.NOT_SAVED, None]}


def test_eta_reads_as_hours_minutes_seconds():
  from mpl import reporting
  assert [reporting.format_duration(s) for s in (0, 12.4, 250, 3600, 7000, -3, 86399, 86400,
                                                  11 * 86400 + 5 * 3600)] == [
      '0s', '12s', '4m10s', '1h00m', '1h56m', '0s', '23h59m', '1d00h', '11d05h']


def test_a_resume_keeps_the_metrics_of_the_step_it_resumes_from(tmp_path):
  """The rows of the checkpoint's own step (its log and eval lines) stay: the resumed run
  starts after it and would not write them again. Only later rows, and a cut line, go."""
  from mpl import reporting
  writer = reporting.JsonlWriter(str(tmp_path))
  for step in (1, 2, 2, 3):
    writer.write_scalars(step, {'loss': float(step)})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 4, "eval/ra')
  writer.drop_after(2)
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [row['step'] for row in rows] == [1, 2, 2]


def test_metrics_on_an_object_store_keep_their_history_after_a_resume(tmp_path):
  """Where the file cannot be appended to (gs://) it is rewritten whole at every write: the
  lines kept when a resumed run drops those past its checkpoint stay in it."""
  from mpl import reporting
  writer = reporting.JsonlWriter(str(tmp_path))
  writer.remote = True   # as for gs://, on a local folder
  for step in (1, 2, 3):
    writer.write_scalars(step, {'loss': float(step)})
  writer.drop_after(2)   # resumed from the checkpoint at step 2
  writer.write_scalars(3, {'loss': 30.0})
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert rows == [{'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 2.0}, {'step': 3, 'loss': 30.0}]


def test_progress_without_clu_logs_the_rate_and_the_time_left(monkeypatch):
  """Without TensorFlow (no clu writer) the progress line's rate is over the steps since the
  last line, and its ETA is the steps left (not all steps) at that rate. (The lines are taken
  from reporting's logger itself: absl's INFO lines reach pytest's caplog only while absl's
  verbosity allows them, which earlier tests in the same process may have changed.)"""
  import types
  from mpl import reporting
  now, lines = [1000.0], []
  monkeypatch.setattr(reporting, 'time', types.SimpleNamespace(time=lambda: now[0]))
  monkeypatch.setattr(reporting, 'logging', types.SimpleNamespace(
      info=lambda message, *args: lines.append(message % args)))
  progress = reporting.Progress(100, types.SimpleNamespace(clu=None), every_secs=10)
  progress(10)       # the first call starts the clock
  now[0] += 5
  progress(15)       # under every_secs: no line
  now[0] += 15
  progress(50)       # 40 steps in 20 s: 2 steps/s, 50 steps left
  assert lines == ['50/100 steps (50.0%), 2.00 steps/s, ETA 25s'], lines


def test_a_second_run_in_a_busy_workdir_stops_at_once(tmp_path):
  """While a run holds WORKDIR/.lock, the same command elsewhere fails clearly (no training)."""
  workdir = str(tmp_path / 'run')
  config = moons('labels=6', total_steps=2, eval_every=2, checkpoint_every=2)
  with train.workdir_lock(workdir):
    with pytest.raises(WorkdirInUseError, match=f'process {os.getpid()} on'):
      train.train_and_evaluate(config, workdir)
    assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
  assert train.train_and_evaluate(config, workdir)['steps'] == 2  # free again


def test_workdir_lock_is_skipped_where_the_filesystem_has_no_flock(tmp_path, monkeypatch,
                                                                   caplog):
  import errno

  def no_flock(*args):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(train.fcntl, 'flock', no_flock)
  workdir = str(tmp_path / 'run')
  with train.workdir_lock(workdir):
    with train.workdir_lock(workdir):  # nothing is held, so a second entry is not refused
      pass
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 2 and 'nothing stops a second run' in warnings[0], warnings


def test_a_damaged_config_json_is_replaced_with_a_warning(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text('{"total_steps": 4, "optim')  # cut short by a kill
  train.write_config(moons('labels=6'), str(workdir), resume_step=2)
  assert json.loads((workdir / 'config.json').read_text())['total_steps'] == moons(
      'labels=6').total_steps
  assert not (workdir / 'config_changes.jsonl').exists()


def test_config_changes_keep_every_resume_in_order(tmp_path):
  """config_changes.jsonl is a history: a second changed resume adds its line after the first
  (it must not replace it), each naming the step it resumed at. A fresh run (no checkpoint)
  that replaces a stale config.json records nothing: it changed no trained run."""
  workdir = str(tmp_path)
  train.write_config(moons('labels=6'), workdir, resume_step=None)
  train.write_config(moons('labels=6', seed=1), workdir, resume_step=None)
  assert not (tmp_path / 'config_changes.jsonl').exists()
  train.write_config(moons('labels=6', seed=1, total_steps=20000), workdir, resume_step=4)
  train.write_config(moons('labels=6', seed=1, total_steps=20000), workdir, resume_step=6)
  train.write_config(moons('labels=6', seed=1, total_steps=30000, **{'optimizer.lr': 0.05}),
                     workdir, resume_step=8)
  lines = [json.loads(line) for line in open(tmp_path / 'config_changes.jsonl')]
  assert lines == [{'step': 4, 'changed': {'total_steps': [10000, 20000]}},
                   {'step': 8, 'changed': {'optimizer.lr': [0.1, 0.05],
                                           'total_steps': [20000, 30000]}}]
