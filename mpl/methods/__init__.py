"""Method registry: config.method -> the class implementing it (see mpl/methods/base.py)."""

from mpl.errors import ConfigError
from mpl.methods.mpl import MPL
from mpl.methods.pseudo_label import PseudoLabel
from mpl.methods.reduced_mpl import ReducedMPL
from mpl.methods.supervised import Supervised

METHODS = {
    'supervised': Supervised,
    'pseudo_label': PseudoLabel,
    'mpl': MPL,
    'reduced_mpl': ReducedMPL,
}


def get_method(name: str):
  if name not in METHODS:
    raise ConfigError(f'unknown method {name!r}; valid choices: {sorted(METHODS)}')
  return METHODS[name]
