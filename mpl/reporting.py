"""Metric writers and progress reports, with or without TensorFlow.

clu's writers and `ReportProgress` import TensorFlow (for TensorBoard summaries). GPU machines
often have none, so when the import fails we fall back to log lines (steps/s, ETA) and the
JSON-lines file that is always written: WORKDIR/metrics.jsonl, one {"step", name: value} per
write, for tools and plots.

Also for the commands' output: `check_out_path` (a figure or JSON path, checked before the work)
and `without_log_message` (drops a library's notice about something done on purpose).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time

from absl import logging
from etils import epath

from mpl.errors import ConfigError


class JsonlWriter:
  """Appends {"step": s, **scalars} lines to WORKDIR/metrics.jsonl (lead process only).

  Object stores (gs://) cannot append: there the file is rewritten whole at every write, every
  `log_every` steps. It grows by about 1 kB a write (a few MB over a 1M-step run at
  log_every=100, so late rewrites upload MBs each): the TensorBoard events, written by clu when
  TensorFlow is installed, are the better log for such runs.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.remote = '://' in workdir
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.enabled = enabled
    self.lines: list[str] = []
    if enabled and self.remote and self.path.exists():  # a resumed run keeps its history
      self.lines = self.path.read_text().splitlines(keepends=True)

  def drop_after(self, step: int) -> None:
    """Removes the lines of steps after `step`: a resumed run writes them again (they were
    logged after the checkpoint it resumes from, before a crash or kill)."""
    if not self.enabled or not self.path.exists():
      return
    def keep(line):
      try:
        return json.loads(line).get('step', 0) <= step
      except ValueError:  # a line cut short by a kill
        return False
    lines = self.path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
      logging.info('metrics.jsonl: dropped %d lines logged after step %d, which is resumed.',
                   len(lines) - len(kept), step)
      self.path.write_text(''.join(kept))
      self.lines = kept if self.remote else []

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n'
    if self.remote:
      self.lines.append(line)
      self.path.write_text(''.join(self.lines))
    else:
      with open(self.path, 'a') as f:
        f.write(line)

  def flush(self) -> None:
    pass


class Writer:
  """On the lead host: clu's default writer (TensorBoard + logs) when TensorFlow is there, else
  log lines; plus metrics.jsonl. Other hosts: log lines only."""

  def __init__(self, workdir: str, is_lead: bool):
    self.jsonl = JsonlWriter(workdir, enabled=is_lead)
    self.workdir = workdir
    # Made when first used, so that a run refused before it trains (a checkpoint that does not
    # fit) leaves no empty TensorBoard file. Other hosts only log: clu's writers would import
    # TensorFlow (seconds).
    self._unopened = is_lead
    self._clu = None

  @property
  def clu(self):
    """clu's writer, or None (another host, or no TensorFlow)."""
    if self._unopened:
      self._unopened = False
      try:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        self._clu = metric_writers.create_default_writer(self.workdir)
      except ImportError:  # no TensorFlow: log lines only
        pass
    return self._clu

  def write_scalars(self, step: int, scalars: dict) -> None:
    self.jsonl.write_scalars(step, scalars)
    if self.clu is not None:
      self.clu.write_scalars(step, scalars)
    else:
      logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in scalars.items()))

  def drop_after(self, step: int) -> None:
    self.jsonl.drop_after(step)

  def flush(self) -> None:
    if self._clu is not None:  # never opened: nothing to flush
      self._clu.flush()


@contextlib.contextmanager
def without_log_message(prefix: str):
  """Drops the absl log records that start with `prefix`: a library's notice about something
  done on purpose, which users would otherwise take for a problem."""
  def keep(record):
    return not record.getMessage().startswith(prefix)
  logger = logging.get_absl_logger()
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def format_duration(seconds: float) -> str:
  """12 s -> '12s', 250 s -> '4m10s', 7000 s -> '1h56m', 11 days -> '11d00h': readable ETAs for
  long runs."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours >= 24:
    return f'{hours // 24}d{hours % 24:02d}h'
  if hours:
    return f'{hours}h{minutes:02d}m'
  return f'{minutes}m{secs:02d}s' if minutes else f'{secs}s'


class Progress:
  """Steps/s and ETA every `every_secs`: clu's ReportProgress, or a log line without clu."""

  def __init__(self, total_steps: int, writer: Writer, every_secs: float = 30.0):
    self.total = total_steps
    self.every_secs = every_secs
    self.writer = writer
    self.clu = None
    self._started = False   # the writer opens at the first step: a finished run opens none
    self._last_time = None
    self._last_step = None

  def __call__(self, step: int) -> None:
    if not self._started:
      self._started = True
      if self.writer.clu is not None:
        from clu import periodic_actions  # pylint: disable=g-import-not-at-top
        self.clu = periodic_actions.ReportProgress(
            num_train_steps=self.total, writer=self.writer.clu, every_secs=self.every_secs,
            every_steps=None)
    if self.clu is not None:
      self.clu(step)
      return
    now = time.time()
    if self._last_time is None:
      self._last_time, self._last_step = now, step
    elif now - self._last_time >= self.every_secs or step == self.total:
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
      logging.info('%d/%d steps (%.1f%%), %.2f steps/s, ETA %s', step, self.total,
                   100 * step / self.total, rate,
                   format_duration((self.total - step) / max(rate, 1e-9)))
      self._last_time, self._last_step = now, step


def check_out_path(path: str, flag: str = '--out', figure: bool = True,
                   make_parent: bool = False) -> None:
  """Refuses, before any work, an output path that cannot be written: a directory, a folder
  that does not exist (created when `make_parent`) or is not writable, or for a figure a name
  without an extension matplotlib saves. Raises ConfigError saying how to fix it."""
  if os.path.isdir(path):
    example = os.path.join(path, 'figure.png' if figure else 'out.json')
    raise ConfigError(f'{flag} {path} is a directory; give a file name, e.g. {example}.')
  if figure:
    from matplotlib.backend_bases import FigureCanvasBase  # pylint: disable=g-import-not-at-top
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    extension = os.path.splitext(path)[1][1:].lower()
    if extension not in formats:
      raise ConfigError(f'{flag} {path}: ' + (f'.{extension} is not an image format matplotlib '
                        f'can save' if extension else 'the name has no extension') +
                        f'; end it with .png, .pdf, .svg or another format matplotlib saves '
                        f'({", ".join(formats)}).')
  parent = os.path.dirname(os.path.abspath(path))
  if make_parent and not os.path.exists(parent):
    try:
      os.makedirs(parent)
    except OSError as e:
      raise ConfigError(f'{flag} {path}: cannot create the folder {parent} ({e.strerror}); '
                        f'choose a path in a writable folder.') from None
  if not os.path.isdir(parent):
    raise ConfigError(f'{flag} {path}: the folder {parent} does not exist; create it '
                      f'(mkdir -p {parent}) or choose a path in an existing folder.')
  try:  # the real test: root ignores permission bits, a read-only mount does not
    with tempfile.TemporaryFile(dir=parent):
      pass
  except OSError as e:
    raise ConfigError(f'{flag} {path}: cannot write in {parent} ({e.strerror}); choose a path '
                      f'in a writable folder.') from None
