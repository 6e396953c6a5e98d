"""Errors that stop a run before (or instead of) a traceback, with a message saying how to fix it.

`python -m mpl.main` prints these as one clear message and exits with status 2 (bad config or
missing data) or 1 (a run that diverged).
"""


class ConfigError(ValueError):
  """The config asks for something invalid: unknown choice, impossible size, bad argument."""


class DataError(RuntimeError):
  """A dataset is missing or corrupt; the message gives the command that provides it."""


class DataMissingError(DataError):
  """A dataset is not where the run looks (not installed or prepared, or no TensorFlow for it):
  the one case where `data.standin='if_missing'` trains on stand-in data instead. Data that is
  there but corrupt stays an error."""


class NonFiniteLossError(FloatingPointError):
  """A training loss became NaN/inf; the message names the step and the loss term."""


class WorkdirInUseError(ConfigError):
  """Another run is training in the same --workdir (it holds WORKDIR/.lock)."""
