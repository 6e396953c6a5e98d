"""Config helpers: the `configs/x.py:key=value,flag` argument parser and config validation.

Every experiment config is `get_config(arg: str | None) -> ml_collections.ConfigDict`. The arg
string is parsed by `parse_arg`, which rejects unknown keys; `validate` checks the finished config
(method, dataset, model, mesh, batch sizes) before anything expensive starts, so that a typo fails
in a second with the list of valid choices instead of a traceback after compilation.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

from etils import epath

import ml_collections
import ml_collections.config_dict

from mpl.errors import ConfigError


def _convert(key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ('1', 'true', 'yes', ''):
      return True
    if value.lower() in ('0', 'false', 'no'):
      return False
    raise ConfigError(f'config argument {key}={value!r}: expected a boolean (true/false).')
  try:
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError:
    raise ConfigError(
        f'config argument {key}={value!r}: expected {type(default).__name__}.') from None
  return value


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'method=mpl,labels=250,runlocal' against the given defaults.

  A bare key (`runlocal`) sets a boolean to True. Values are converted to the type of the
  default. Unknown keys raise ConfigError listing the valid ones.
  """
  result = dict(defaults)
  given = {}
  if arg:
    for item in arg.split(','):
      item = item.strip()
      if not item:
        continue
      key, _, value = item.partition('=')
      key = key.strip()
      if key not in defaults:
        raise ConfigError(
            f'unknown config argument {key!r}; valid arguments: {sorted(defaults)}')
      if key in given:
        raise ConfigError(f'config argument {key!r} is given twice ({given[key]!r} and '
                          f'{item!r}); keep one.')
      given[key] = item
      if '=' not in item and not isinstance(defaults[key], bool):
        raise ConfigError(f'config argument {key!r} needs a value ({key}=...).')
      result[key] = _convert(key, value.strip(), defaults[key])
  return ml_collections.ConfigDict(result)


def flag_error_message(error: Exception, argv=()) -> str:
  """One line for a config mistake caught while absl parses --config / --config.* flags.

  config_flags wraps errors from get_config (our ConfigError) with a formatted traceback, and
  reports unknown keys as AttributeError/KeyError: keep only what the user needs to read.
  """
  message = str(error).strip().splitlines()[-1].replace('\\n', '\n').replace('\\', '')
  message = message.replace('mpl.errors.ConfigError: ', '')
  if isinstance(error, (AttributeError, KeyError)):
    # e.g. "'batchsize'\nDid you mean "batch_size" instead of "batchsize"?", quoted again
    key, _, hint = message.strip('\'"').partition('\n')
    key = key.strip(chr(39))
    # The error names the last part only: find the flag that holds it (--config.data.dataset),
    # the one that is no key of the base config when several end alike.
    paths = [a[len('--config.'):].split('=')[0] for a in argv if a.startswith('--config.')]
    candidates = [p for p in paths if p == key or p.endswith('.' + key)] or [key]
    path = next((p for p in candidates if not _is_base_key(p)), candidates[0])
    message = f"unknown config key '{path}'."
    suggestion = re.search(r'Did you mean "([^"]+)"', hint)
    if suggestion:
      parent = path.rpartition('.')[0]
      message += f' Did you mean --config.{parent + "." if parent else ""}{suggestion.group(1)}?'
    elif path != key and _is_base_key(key):
      message += f' Did you mean --config.{key}?'
    return message
  wrong_type = re.match(r'flag --(config\.\S+?)=(.*?): (.*)', message)
  if wrong_type and ('for int()' in message or 'to float' in message):
    kind = 'an integer' if 'for int()' in message else 'a number'
    return f'{wrong_type.group(1)} is {kind}, got {wrong_type.group(2)!r}.'
  if 'can not be applied because field' in message and 'is None' in message:
    field = re.search(r'field "(\w+)" is None', message).group(1)
    return (f'{message.split()[1]}: the config sets {field} to None, so its fields cannot be set '
            f'one by one from the command line; set the whole block in a config file (e.g. '
            f'config.mpl.teacher_model = ConfigDict(dict(name=..., ...))).')
  return message.strip()


def _is_base_key(path: str) -> bool:
  """Whether `path` ('optimizer.lr') names a key of `base_config`."""
  node = base_config()
  for part in path.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def sibling_config(config_file: str, name: str):
  """The module configs/<name> beside `config_file`, loaded by path (configs/ is no package).

  For configs that build on another recipe:
  `config_lib.sibling_config(__file__, 'imagenet10_mpl.py').get_config('steps=1000')`.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  spec = importlib.util.spec_from_file_location(f'mpl_configs_{name[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_file_message(error: Exception, filename: str | None) -> str:
  """A --config file that does not load: which, why, and the configs there are."""
  reason = str(error).strip().splitlines()[-1].strip() if str(error).strip() else repr(error)
  reason = reason.split('earlier failure to load: ')[-1]
  configs_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             'configs')
  available = sorted(f for f in os.listdir(configs_dir) if f.endswith('.py')) if os.path.isdir(
      configs_dir) else []
  return (f'--config {filename!r} did not load: {reason}. A config is a Python file with '
          f'get_config(), e.g. configs/<file>.py[:args]; {configs_dir} has {available}.')


def parse_flags_or_exit(argv, usage: str):
  """absl flag parsing for a command; a config mistake is one line plus `usage`, exit 2."""
  import sys  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  def config_filename():  # as given (the flag may not have been parsed); the last one counts
    given = None
    for i, arg in enumerate(argv):
      if arg.startswith('--config='):
        given = arg.split('=', 1)[1].split(':')[0]
      elif arg == '--config' and i + 1 < len(argv):
        given = argv[i + 1].split(':')[0]
    return given

  try:
    if sum(a == '--config' or a.startswith('--config=') for a in argv) > 1:
      # Each copy would define its --config.* overrides; absl keeps the last one silently.
      raise ConfigError('--config is given twice; give one config (override its keys with '
                        '--config.key=value).')
    remaining = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].value is not None:
      # A file that could not be read is reported only when the config is first used.
      flags.FLAGS['config'].value.keys()
    return remaining
  except (OSError, SyntaxError, ImportError) as e:  # the config file itself
    message = config_file_message(e, config_filename())
  except ConfigError as e:
    message = str(e)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = flag_error_message(e, argv)
  print(f'error: {message}\nUsage: {usage}', file=sys.stderr)
  sys.exit(2)


# Config blocks that one method alone reads: the block's name is the method's.
METHOD_BLOCKS = ('mpl', 'reduced_mpl', 'pseudo_label')


def unread_flags(method: str, argv) -> list[str]:
  """The --config.BLOCK.key flags of `argv` whose BLOCK is another method's: `method` never
  reads them (e.g. --config.mpl.feedback=exact on a run whose config argument forgot
  method=mpl). Warned about, not refused: a sweep may give every run the same flags."""
  unread = []
  for arg in argv:
    if arg.startswith('--config.'):
      parts = arg[len('--config.'):].split('=', 1)[0].split('.')
      if len(parts) > 1 and parts[0] in METHOD_BLOCKS and parts[0] != method:
        unread.append(arg)
  return unread


def with_method(config_arg: str, method: str) -> str:
  """The --config argument `configs/x.py[:args]` with method=`method` set in its arguments
  (replacing a method= it has: a key may be given once)."""
  path, colon, args = config_arg.partition(':')
  items = [item for item in args.split(',') if item] if colon else []
  items = [f'method={method}' if item.split('=')[0].strip() == 'method' else item
           for item in items]
  if f'method={method}' not in items:
    items.append(f'method={method}')
  return f'{path}:{",".join(items)}'


def check_choice(what: str, value: Any, choices) -> None:
  if value not in choices:
    raise ConfigError(f'unknown {what} {value!r}; valid choices: {sorted(choices)}')


def check_range(key: str, value: Any, *, at_least=None, above=None, below=None, at_most=None,
                why: str = '') -> None:
  """ConfigError unless `value` lies within the bounds given; `key` names it (config.<key>)."""
  if ((at_least is None or value >= at_least) and (above is None or value > above) and
      (below is None or value < below) and (at_most is None or value <= at_most)):
    return
  lower = f'[{at_least}' if at_least is not None else (f'({above}' if above is not None else '')
  upper = f'{at_most}]' if at_most is not None else (f'{below})' if below is not None else '')
  if lower and upper:
    bounds = f'in {lower}, {upper}'
  elif lower:
    bounds = ('>= ' if at_least is not None else '> ') + lower[1:]
  else:
    bounds = ('<= ' if at_most is not None else '< ') + upper[:-1]
  raise ConfigError(f'config.{key} must be {bounds}, got {value!r}.' + (f' {why}' if why else ''))


# Padding modes of the weak view (jnp.pad's, those that make sense for images).
PAD_MODES = ('reflect', 'constant', 'edge', 'symmetric', 'wrap')


def _check_model(key: str, model: Any) -> None:
  """The options every model shares, in range (the model's own code checks its shape)."""
  from mpl.models import mlp  # pylint: disable=g-import-not-at-top
  for rate in ('dropout_rate', 'stochastic_depth_rate'):
    if rate in model:
      check_range(f'{key}.{rate}', model[rate], at_least=0, below=1)
  if 'bn_momentum' in model:
    check_range(f'{key}.bn_momentum', model['bn_momentum'], at_least=0, below=1)
  if 'bn_epsilon' in model:
    check_range(f'{key}.bn_epsilon', model['bn_epsilon'], above=0)
  for sizes in ('hidden_sizes', 'features', 'stage_sizes'):
    for size in model.get(sizes) or ():
      check_range(f'{key}.{sizes} entries', size, at_least=1)
  if 'activation' in model:
    check_choice(f'{key}.activation', model['activation'], mlp.ACTIVATIONS)


def _check_optimizer(key: str, opt: Any) -> None:
  from mpl import optim  # pylint: disable=g-import-not-at-top
  check_choice(f'{key}.name', opt.get('name', 'sgd'), optim.OPTIMIZERS)
  check_choice(f'{key}.decay', opt.get('decay', 'cosine'), optim.DECAYS)
  value = lambda name: opt.get(name) or 0  # None, like 0: off (mpl.optim reads it so)
  check_range(f'{key}.lr', value('lr'), at_least=0, below=float('inf'))
  check_range(f'{key}.momentum', value('momentum'), at_least=0, below=1)
  check_range(f'{key}.weight_decay', value('weight_decay'), at_least=0)
  check_range(f'{key}.clip_norm', value('clip_norm'), at_least=0, why='(0: no clipping)')
  for steps in ('wait_steps', 'warmup_steps'):
    check_range(f'{key}.{steps}', value(steps), at_least=0)


def _check_student_feedback(key: str, block: Any) -> None:
  """The settings MPL and Reduced MPL share: pseudo labels, how h is measured, its baseline,
  the student's label smoothing, and both optimizers."""
  from mpl.methods import mpl as mpl_method  # pylint: disable=g-import-not-at-top
  check_choice(f'{key}.pseudo_label', block.pseudo_label, mpl_method.PSEUDO_LABELS)
  check_choice(f'{key}.h_pass', block.h_pass, mpl_method.H_PASSES)
  check_choice(f'{key}.h_dtype', block.h_dtype, mpl_method.H_DTYPES)
  check_range(f'{key}.baseline_decay', block.baseline_decay, at_least=0, at_most=1)
  check_range(f'{key}.student_label_smoothing', block.student_label_smoothing, at_least=0,
              below=1)
  for name in ('teacher_optimizer', 'student_optimizer'):
    _check_optimizer(f'{key}.{name}', block[name])


def check_values(config: ml_collections.ConfigDict) -> None:
  """Every method's settings within their meaning, whichever method runs: a value outside
  (a negative lr, a threshold of 1.5, dropout 1) would train nonsense without an error."""
  from mpl.data import datasets  # pylint: disable=g-import-not-at-top
  from mpl.methods import mpl as mpl_method, reduced_mpl  # pylint: disable=g-import-not-at-top
  check_range('ema_decay', config.ema_decay, at_least=0, below=1, why='(0 turns the EMA off)')
  check_range('label_smoothing', config.label_smoothing, at_least=0, below=1)
  check_range('data.noise', config.data.noise, at_least=0)
  check_range('data.max_eval_examples', config.data.get('max_eval_examples', 0), at_least=0,
              why='(0: the whole test set)')
  check_range('finetune.steps', config.finetune.steps, at_least=0, why='(0: no finetune stage)')
  if config.finetune.steps > 0:
    check_range('finetune.batch_size', config.finetune.batch_size, at_least=1)
    check_range('finetune.lr', config.finetune.lr, at_least=0, below=float('inf'))
  _check_model('model', config.model)
  _check_optimizer('optimizer', config.optimizer)

  m = config.mpl
  check_choice('mpl.feedback', m.feedback, mpl_method.FEEDBACKS)
  _check_student_feedback('mpl', m)
  check_range('mpl.uda_threshold', m.uda_threshold, at_least=0, at_most=1)
  check_range('mpl.uda_temperature', m.uda_temperature, above=0)
  check_range('mpl.uda_weight', m.uda_weight, at_least=0)
  check_range('mpl.uda_ramp_steps', m.uda_ramp_steps, at_least=0)
  check_range('mpl.teacher_labeled_weight', m.teacher_labeled_weight, at_least=0)
  if m.get('teacher_model'):
    _check_model('mpl.teacher_model', m.teacher_model)

  r = config.reduced_mpl
  check_choice('reduced_mpl.teacher_source', r.teacher_source, reduced_mpl.TEACHER_SOURCES)
  _check_student_feedback('reduced_mpl', r)
  for size in r.hidden_sizes:
    check_range('reduced_mpl.hidden_sizes entries', size, at_least=1)

  p = config.pseudo_label
  check_range('pseudo_label.rounds', p.rounds, at_least=0, why='(0: online)')
  if p.threshold is not None:
    check_range('pseudo_label.threshold', p.threshold, at_least=0, at_most=1)
  check_range('pseudo_label.weight', p.weight, at_least=0)

  a = config.augment
  check_range('augment.num_layers', a.num_layers, at_least=0)
  check_range('augment.magnitude', a.magnitude, at_least=0)
  check_range('augment.cutout_size', a.cutout_size, at_least=0, why='(0: no Cutout)')
  check_range('augment.pad', a.pad, at_least=0)
  check_range('augment.fill', a.fill, at_least=0, at_most=255)
  check_choice('augment.pad_mode', a.pad_mode, PAD_MODES)
  if config.dataset in datasets.POINT_DATASETS:
    for key in ('labeled', 'strong'):
      if a[key] != 'none':
        raise ConfigError(f'{config.dataset} holds points, not images: set '
                          f'--config.augment.{key}=none (got {a[key]!r}).')
    if config.spatial_partition:
      raise ConfigError(f'{config.dataset} holds points, not images: spatial_partition needs '
                        f'images; set --config.spatial_partition="" (got '
                        f'{config.spatial_partition!r}).')
  if config.data.streaming and config.dataset in datasets.SKLEARN_DATASETS:
    raise ConfigError(f'{config.dataset} comes from scikit-learn and is small: it trains from '
                      f'device memory, not streamed. Set --config.data.streaming=False '
                      f'(streaming is for TFDS image datasets).')


def data_axis_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """The size of the 'data' mesh axis that `config.mesh` asks for on `num_devices` devices."""
  data, model = int(config.mesh.data), int(config.mesh.model)
  if model < 1:
    raise ConfigError(f'config.mesh.model must be >= 1, got {model}.')
  if data < 1 and data != -1:
    raise ConfigError(f'config.mesh.data must be >= 1, or -1 for all remaining devices; got '
                      f'{data}.')
  if data == -1:
    if num_devices % model:
      raise ConfigError(
          f'config.mesh.model={model} does not divide the {num_devices} available devices.')
    data = num_devices // model
  if data * model > num_devices:
    raise ConfigError(
        f'config.mesh asks for data={data} x model={model} = {data * model} devices, but '
        f'{num_devices} are available. Set --config.mesh.data=-1 to use all remaining devices.')
  return data


def workdir_path(workdir: str) -> epath.Path:
  """A workdir as a path that may be local or remote (gs://bucket/run on Cloud TPU)."""
  if '://' in workdir:
    return epath.Path(workdir)
  return epath.Path(os.path.abspath(workdir))


# Blocks that hold a model's keyword arguments: any key the model takes (checked by the model).
FREE_FORM_BLOCKS = ('model', 'teacher_model')


def unknown_keys(config, reference, prefix: str = '') -> list[str]:
  """Keys of `config` that `reference` (base_config()) lacks, as 'block.key', each with the
  closest known key if there is one: a typo in a config file (`optimizer.warmup`) would else be
  a key nothing reads."""
  import difflib  # pylint: disable=g-import-not-at-top
  out = []
  for key in config.keys():
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      out.append(f'{prefix}{key}' + (f' (did you mean {prefix}{close[0]}?)' if close else ''))
    elif (key not in FREE_FORM_BLOCKS and isinstance(config[key], ml_collections.ConfigDict)
          and isinstance(reference[key], ml_collections.ConfigDict)):
      out += unknown_keys(config[key], reference[key], f'{prefix}{key}.')
  return out


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks a finished config; raises ConfigError saying what is wrong and how to fix it."""
  # Imported here: the registries import JAX/Flax modules.
  from mpl import methods, models
  from mpl.data import datasets
  unknown = unknown_keys(config, base_config())
  if unknown:
    raise ConfigError(f'unknown config key(s): {", ".join(unknown)}. Every key is listed with its '
                      f'default in mpl/config_lib.py base_config().')

  check_choice('method', config.method, methods.METHODS)
  if not config.data.streaming:  # any prepared TFDS image dataset can be streamed
    check_choice('dataset', config.dataset,
                 tuple(datasets.DATASETS) + tuple(datasets.STREAMING_DATASETS))
  check_choice('model', config.model.name, models.MODELS)
  for key in ('total_steps', 'batch_size', 'eval_batch_size', 'eval_every', 'checkpoint_every',
              'log_every', 'keep_checkpoints'):
    if int(config[key]) <= 0:
      raise ConfigError(f'config.{key} must be positive, got {config[key]}.')
  if config.num_labeled != -1 and config.num_labeled < 1:
    raise ConfigError(f'config.num_labeled must be -1 (every example labeled) or a positive '
                      f'count (at least one per class), got {config.num_labeled}.')
  if config.mu < 0:
    raise ConfigError(f'config.mu must be >= 0, got {config.mu}.')
  if config.mu < 1 and methods.get_method(config.method).uses_unlabeled:
    raise ConfigError(f'config.mu = {config.mu}: {config.method} trains on mu * batch_size '
                      f'unlabeled images a step; set mu >= 1.')
  check_choice('augment.labeled', config.augment.labeled, ('weak', 'none'))
  check_choice('augment.strong', config.augment.strong, ('mpl', 'fixmatch', 'none'))
  if config.augment.strong == 'fixmatch' and not 2 <= config.augment.magnitude <= 10:
    # FixMatch draws levels 1..magnitude-1. Past 9 the formulas go out of range (level 13
    # keeps 0 Posterize bits, a black image; level 15 solarizes every pixel): the MPL default
    # of 16 must not leak into a FixMatch run.
    raise ConfigError(
        f'config.augment.magnitude = {config.augment.magnitude} with augment.strong=fixmatch: '
        f'FixMatch draws random levels 1..magnitude-1 and its official bound is 10 (levels '
        f'1..9). Set --config.augment.magnitude=10.')
  check_values(config)
  data = data_axis_size(config, num_devices)
  finetune_batch = config.finetune.batch_size if config.finetune.steps > 0 else data
  for name, size in (('finetune.batch_size', finetune_batch),
                     ('batch_size', config.batch_size),
                     ('batch_size * mu (unlabeled batch)', config.batch_size * config.mu),
                     ('eval_batch_size', config.eval_batch_size)):
    if size % data:
      raise ConfigError(
          f'config.{name} = {size} is not divisible by the data-axis size {data} '
          f'(mesh data={data}, model={config.mesh.model}). Choose a multiple of {data}, or '
          f'change --config.mesh.data.')


def base_config() -> ml_collections.ConfigDict:
  """Every key the loop reads, with its default. Experiment configs start from this."""
  c = ml_collections.ConfigDict()
  c.seed = 0                       # init and step randomness
  c.method = 'supervised'          # mpl.methods.METHODS
  c.dataset = 'two_moons'          # mpl.data.DATASETS
  c.num_labeled = -1               # labeled examples, class-balanced; -1 = all
  c.total_steps = 1000
  c.batch_size = 64                # labeled images per step (global)
  c.mu = 7                         # unlabeled images per step = mu * batch_size
  c.eval_batch_size = 1000
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.log_every = 100
  c.keep_checkpoints = 2
  c.label_smoothing = 0.0
  c.ema_decay = 0.0                # 0 = no EMA model; else min(decay, (t+1)/(t+10))

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS / IDX location
  c.data.source = 'auto'           # fashion_mnist: 'tfds' | 'idx' | 'auto'
  c.data.image_size = 0            # 0 = native; larger pads with zeros (28 -> 32)
  c.data.noise = 0.1               # two_moons noise
  c.data.seed = 0                  # seed of the labeled split (and of two_moons)
  c.data.exclude_labeled = False   # official MPL: unlabeled = all training images
  c.data.standin = 'never'         # 'if_missing' | 'always': random data of the dataset's
                                   # shapes, for the runlocal smoke tests of paper configs
  # Streaming input (mpl/data/streaming.py), always used for imagenet2012:
  c.data.streaming = False         # stream any prepared TFDS image dataset instead of loading it
  c.data.labeled_split = 'train'
  c.data.unlabeled_dataset = ''    # '' = the labeled dataset
  c.data.unlabeled_split = 'train'
  c.data.eval_split = 'validation'
  c.data.max_eval_examples = 0     # 0 = the whole test set; runlocal configs use a subset

  c.model = ml_collections.ConfigDict({'name': 'mlp'})  # + the model's own options

  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', lr=0.1, scale_lr_by_batch=False, momentum=0.9, nesterov=True,
      weight_decay=0.0, clip_norm=0.0, wait_steps=0, warmup_steps=0, decay='cosine'))

  c.augment = ml_collections.ConfigDict(dict(
      labeled='none',              # 'none' | 'weak' (flip + pad-and-crop)
      strong='mpl',                # RandAugment of strong views: 'mpl' | 'fixmatch' | 'none'
      magnitude=16.0,              # MPL: the fixed magnitude; FixMatch: levels 1..magnitude-1
                                   # (set 10 with strong='fixmatch')
      num_layers=2, cutout_size=16, pad=4, pad_mode='reflect', flip=True,
      fill=128,                    # grey fill of constant padding, rotations, Cutout
      strong_from_weak=False,      # True: strong view = RA(weak view), the same crop (MPL CIFAR)
      jitter_after=False))         # True: flip-and-crop again after Cutout (MPL CIFAR)

  # Pseudo Labels / Noisy Student (mpl/methods/pseudo_label.py); every network uses c.optimizer.
  c.pseudo_label = ml_collections.ConfigDict(dict(
      rounds=0,                    # 0 = online (Lee 2013); >= 1 = offline teacher -> student rounds
      threshold=ml_collections.config_dict.placeholder(float),  # keep if max prob >= this;
                                   # None = 0.95 online, 0.0 offline
      weight=1.0,                  # lambda_u
      hard=True,                   # argmax labels; False = the soft distribution
      teacher_steps=ml_collections.config_dict.placeholder(int),  # offline: teacher's supervised
                                   # steps; None = total_steps // (rounds + 1)
  ))

  # Meta Pseudo Labels (mpl/methods/mpl.py); defaults: the official CIFAR-10-4K recipe.
  c.mpl = ml_collections.ConfigDict(dict(
      feedback='first_order',      # 'first_order' (paper) | 'exact' | 'official_release'
      pseudo_label='sample',       # first_order: hard labels sampled from the teacher | 'argmax'
                                   # (exact and official_release use the soft labels)
      baseline_decay=0.99,         # moving baseline of h
      # f_old and f_new for h: 'paired' = each from its own labeled-only pass, with the same
      # dropout key and batch-norm batch, so h measures only the student's update; 'official' =
      # f_old from the student's pass on concat(x_l, s(x_u)), f_new from a fresh pass (released
      # code, PyTorch port): dropout and the batch composition add noise and an offset to h.
      h_pass='paired',
      # 'paired' passes in float32 at full matmul precision ('float32'; also for a bfloat16
      # network), or as the network trains ('model'): rounding hides the update (see mpl.py).
      h_dtype='float32',
      student_label_smoothing=0.0,
      teacher_labeled_weight=1.0,  # the teacher's own CE on x_l (0 with uda_weight 0: the
                                   # paper's section 2, a teacher taught by the feedback alone)
      uda_weight=8.0, uda_ramp_steps=5000, uda_temperature=0.7, uda_threshold=0.6,
      teacher_model=ml_collections.config_dict.placeholder(ml_collections.ConfigDict),
      recompute_teacher=False,     # True: rerun the teacher forward for its backward (memory)
      teacher_optimizer=dict(name='sgd', lr=0.1, scale_lr_by_batch=True, momentum=0.9,
                             nesterov=True, weight_decay=5e-4, clip_norm=0.0, wait_steps=0,
                             warmup_steps=5000, decay='cosine'),
      student_optimizer=dict(name='sgd', lr=0.1, scale_lr_by_batch=True, momentum=0.9,
                             nesterov=True, weight_decay=5e-4, clip_norm=0.0, wait_steps=3000,
                             warmup_steps=5000, decay='cosine'),
  ))

  # Reduced MPL (mpl/methods/reduced_mpl.py): a large teacher trained in stage 1 (any run), its
  # distributions precomputed, and a small MLP "reduced teacher" on top of them with MPL feedback.
  c.reduced_mpl = ml_collections.ConfigDict(dict(
      teacher_workdir='',          # workdir of the stage-1 run; '' = error unless stand-in
      teacher_source='auto',       # 'auto' (what stage 1 reported) | 'ema' | 'raw' | 'teacher'
      standin_teacher_steps=0,     # > 0 with no teacher_workdir: throw-away teacher (runlocal)
      hidden_sizes=(64,),          # reduced teacher: log p + MLP([p, log p]), identity at init
      pseudo_label='sample',       # hard labels sampled from the reduced teacher | 'argmax'
      baseline_decay=0.99,         # moving baseline of h
      h_pass='paired',             # how f_old and f_new are measured: see mpl.h_pass
      h_dtype='float32',           # and in which dtype: see mpl.h_dtype
      student_label_smoothing=0.0,
      teacher_optimizer=dict(name='sgd', lr=0.1, scale_lr_by_batch=True, momentum=0.9,
                             nesterov=True, weight_decay=5e-4, clip_norm=0.0, wait_steps=0,
                             warmup_steps=5000, decay='cosine'),
      student_optimizer=dict(name='sgd', lr=0.1, scale_lr_by_batch=True, momentum=0.9,
                             nesterov=True, weight_decay=5e-4, clip_norm=0.0, wait_steps=3000,
                             warmup_steps=5000, decay='cosine'),
  ))

  # Finetune stage after MPL (paper): the student on labeled data only. steps=0: off.
  c.finetune = ml_collections.ConfigDict(dict(steps=0, lr=1e-5, batch_size=512))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))  # data=-1: all other devices
  # mesh.model > 1 splits every weight over 'model' (tensor parallel); spatial_partition also
  # cuts each image into mesh.model strips: '' | 'width' | 'height' (see mpl/sharding.py).
  c.spatial_partition = ''
  c.sharding_rules = ()            # (logical name, mesh axis) overrides, see mpl/sharding.py
  return c


def saved_run_config(saved: dict) -> ml_collections.ConfigDict:
  """A run's config.json as a ConfigDict, keys added to `base_config` since then filled with
  today's defaults and keys it no longer has dropped (nothing reads them), so that tools can
  rebuild the run (a default may differ from what the code did then: runs older than
  `mpl.h_pass` measured h the 'official' way)."""
  config = ml_collections.ConfigDict(saved)

  def fill(target, defaults):
    for key, value in defaults.items():
      if key not in target:
        target[key] = copy.deepcopy(value)
      elif isinstance(value, ml_collections.ConfigDict) and isinstance(
          target[key], ml_collections.ConfigDict) and key not in FREE_FORM_BLOCKS:
        fill(target[key], value)
    for key in [key for key in target.keys() if key not in defaults]:
      del target[key]

  fill(config, base_config())
  return config
