r"""Runs one experiment.

  python -m mpl.main --config configs/two_moons.py:method=supervised --workdir /tmp/run
  python -m mpl.main --config configs/fashion_mnist.py:labels=1000 --workdir /tmp/fm \
      --config.total_steps=2000

Rerunning the same command in the same workdir resumes from its latest checkpoint.
Multi-host (every host runs the same command; see launch/ and the README's "Scaling up"):

  python -m mpl.main --config configs/imagenet10_mpl.py --workdir gs://bucket/run --distributed
"""

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:args]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and summary.json.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (multi-host TPU pods / GPU clusters). '
                  'On TPU VMs and under SLURM it finds the other hosts itself; elsewhere give '
                  'the three flags below.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (with --distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --distributed).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (with --distributed).')
flags.mark_flags_as_required(['config', 'workdir'])


def quiet_library_logs():
  """Keeps INFO logs for our own lines; Orbax's per-save chatter is shown only as warnings."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top

  class _Filter(py_logging.Filter):
    def filter(self, record):
      return record.levelno >= py_logging.WARNING or 'orbax' not in record.pathname

  for handler in py_logging.getLogger().handlers + logging.get_absl_logger().handlers:
    handler.addFilter(_Filter())
  logging.get_absl_handler().addFilter(_Filter())


USAGE = ('python -m mpl.main --config configs/<file>.py[:args] --workdir DIR '
         '[--config.key=value ...] [--distributed]')


# Ctrl-C before the run's own handler (train.PreemptionFlag) is in place: Python's default
# raises KeyboardInterrupt wherever the main thread is, and one raised inside a garbage
# collection callback (JAX frees compiled programs in one) is printed and dropped, so the run
# went on to its end. `interrupted_while_starting` also notes it; the run then stops after its
# first step as after a later Ctrl-C (`should_stop`).
EARLY_INTERRUPTS = []


def interrupted_while_starting(signum, frame):
  del frame
  EARLY_INTERRUPTS.append(signum)
  raise KeyboardInterrupt


def usage_error(message: str):
  print(f'error: {message}\nUsage: {USAGE}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    usage_error(f'unexpected arguments {argv[1:]}: every setting is a flag (--config.key=value).')
  import jax  # pylint: disable=g-import-not-at-top
  explicit = [f for f in ('coordinator_address', 'num_processes', 'process_id')
              if FLAGS[f].value is not None]
  if explicit and not FLAGS.distributed:
    usage_error(f'--{explicit[0]} needs --distributed.')
  if FLAGS.distributed:
    try:
      jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                 num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    except ValueError as e:  # no cluster found or described; runtime failures propagate
      usage_error(f'--distributed: {str(e).rstrip(".")}. On TPU VMs and under SLURM the hosts '
                  f'are found automatically; elsewhere pass --coordinator_address=host:port '
                  f'--num_processes=N --process_id=I on every host, or drop --distributed '
                  f'for a single-host run.')
    logging.info('Process %d of %d; %d local of %d devices.', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  from mpl import train  # pylint: disable=g-import-not-at-top
  from mpl.errors import ConfigError, DataError, NonFiniteLossError  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  quiet_library_logs()
  workdir = FLAGS.workdir
  if workdir.startswith('-'):
    usage_error(f'--workdir {workdir!r} looks like a flag: --workdir needs a directory, e.g. '
                f'--workdir runs/x.')
  workdir = os.path.expanduser(workdir)  # '~/runs/x' quoted in a script
  from mpl import config_lib  # pylint: disable=g-import-not-at-top
  for flag in config_lib.unread_flags(FLAGS.config.method, sys.argv):
    block = flag[len('--config.'):].split('.')[0]
    config_arg = config_lib.with_method(FLAGS['config'].config_filename, block)
    logging.warning('%s has no effect: method %r does not read the %r block. For a run of '
                    'method %r, set the method: --config %s (where the config takes it) or '
                    '--config.method=%s.', flag, FLAGS.config.method, block, block, config_arg,
                    block)
  try:
    summary = train.train_and_evaluate(FLAGS.config, workdir,
                                       should_stop=lambda step: bool(EARLY_INTERRUPTS))
    if EARLY_INTERRUPTS and 'stopped_at' in summary:
      raise KeyboardInterrupt(train.stopped_by_ctrl_c(summary))
  except (ConfigError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt as e:  # Ctrl-C: after the checkpoint, or outside the loop
    print(f'{e}' or 'stopped by Ctrl-C; rerun the same command to resume.', file=sys.stderr)
    # Die by SIGINT, not with a status: a shell loop (`for s in 0 1 2; do ...; done`) stops only
    # when its child was killed by the signal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def parse_flags(argv):
  """absl flag parsing, with config mistakes reported as one line instead of a traceback."""
  from mpl import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.parse_flags_or_exit(argv, USAGE)


if __name__ == '__main__':
  signal.signal(signal.SIGINT, interrupted_while_starting)
  app.run(main, flags_parser=parse_flags)
