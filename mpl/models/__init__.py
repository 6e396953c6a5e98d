"""Model zoo: an explicit registry of linen classifiers.

Every model is called as `model.apply(variables, x, train=..., rngs={'dropout': key},
mutable=['batch_stats'] if train else False)` (nets without batch norm have no 'batch_stats')
and returns float32 logits (N, num_classes) whatever its compute `dtype`; parameters are float32.
A registered name may fix some fields (`PRESETS`, an error to pass) and default others
(`DEFAULTS`, e.g. each EfficientNet's official dropout, which `get_model` arguments override).

Weight decay rule (`is_decayed`), as METHODS.md and the official MPL code (`get_l2_loss` skips
batch-norm variables only): every parameter is decayed except those of normalisation layers,
i.e. of modules whose name contains 'bn' or 'norm' (all our batch norms are named so). Conv and
dense kernels and dense biases are decayed; batch-norm scale/bias are not; batch statistics are
not parameters.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mpl.models.cnn import CNN
from mpl.models.efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from mpl.models.efficientnet import EfficientNet
from mpl.models.mlp import MLP
from mpl.models.resnet import ResNet, ResNet50
from mpl.models.wide_resnet import WideResNet

MODELS: dict[str, type] = {
    'mlp': MLP,
    'cnn': CNN,
    'wrn': WideResNet,        # any depth 6n+4 and width: WRN-depth-width
    'wrn28': WideResNet,
    'wrn28_2': WideResNet,
    'wrn28_8': WideResNet,
    'resnet50': ResNet50,
    'resnet': ResNet,         # any stage_sizes (bottleneck blocks per stage)
    'efficientnet': EfficientNet,  # any width_coefficient / depth_coefficient (default B0)
    'efficientnet_b0': EfficientNet,
    'efficientnet_b1': EfficientNet,
    'efficientnet_b2': EfficientNet,
    'efficientnet_b3': EfficientNet,
    'efficientnet_b4': EfficientNet,
    'efficientnet_b5': EfficientNet,
    'efficientnet_b6': EfficientNet,
    'efficientnet_b7': EfficientNet,
    'efficientnet_l2': EfficientNet,
    'efficientnet_b6_wide': EfficientNet,  # B6 depth, width 5.0 (the MPL code's b6-mpl)
}

# Fields a registered name fixes; passing them to `get_model` is an error.
PRESETS: dict[str, dict[str, Any]] = {
    'wrn28': {'depth': 28},
    'wrn28_2': {'depth': 28, 'width': 2},
    'wrn28_8': {'depth': 28, 'width': 8},
    'resnet50': {'stage_sizes': (3, 4, 6, 3)},
    # efficientnet_b0 ... efficientnet_b6_wide: the coefficients of efficientnet.VARIANTS.
    **{f'efficientnet_{v}': {'width_coefficient': c.width, 'depth_coefficient': c.depth}
       for v, c in EFFICIENTNET_VARIANTS.items()},
}

# Defaults a registered name sets but leaves open to `get_model` (unlike PRESETS): each
# EfficientNet variant's official dropout before the classifier.
DEFAULTS: dict[str, dict[str, Any]] = {
    f'efficientnet_{v}': {'dropout_rate': c.dropout} for v, c in EFFICIENTNET_VARIANTS.items()
}

_NOT_OPTIONS = ('parent', 'name', 'num_classes')


def model_options(name: str) -> list[str]:
    """The keyword arguments `get_model(name, ...)` accepts."""
    if name not in MODELS:
        raise ValueError(f'Unknown model {name!r}; valid names: {sorted(MODELS)}.')
    fixed = PRESETS.get(name, {})
    return [f.name for f in dataclasses.fields(MODELS[name])
            if f.init and f.name not in _NOT_OPTIONS and f.name not in fixed]


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds the registered model `name`; unknown names or options raise ValueError."""
    options = model_options(name)
    bad = sorted(k for k in kwargs if k not in options)
    if bad:
        fixed = PRESETS.get(name, {})
        note = f' ({sorted(fixed)} fixed by the preset)' if fixed else ''
        raise ValueError(f'Unknown option(s) {bad} for model {name!r}; '
                         f'valid options: {options}{note}.')
    kwargs = {**DEFAULTS.get(name, {}), **kwargs}
    return MODELS[name](num_classes=num_classes, **PRESETS.get(name, {}), **kwargs)


def from_config(model_config: Any, num_classes: int) -> nn.Module:
    """The model a config's `model` block describes (a ConfigDict, or a dict from config.json).

    `name` picks the registry entry; every other key is an option of that model. `dtype` may be
    a string ('bfloat16'); lists (from JSON) become tuples.
    """
    block = dict(model_config.to_dict() if hasattr(model_config, 'to_dict') else model_config)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in block.items() if k != 'name'}
    if kwargs.get('dtype') is not None:
        kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
    else:
        kwargs.pop('dtype', None)
    return get_model(block['name'], num_classes, **kwargs)


def _key_name(key: Any) -> str:
    """Name of one path entry: a str, or a jax.tree_util DictKey / GetAttrKey / SequenceKey."""
    for attr in ('key', 'name', 'idx'):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def is_decayed(path: tuple, leaf: Any = None) -> bool:
    """Whether weight decay applies to the parameter at `path` (see the module docstring).

    `path` is a tuple of names (flax.traverse_util) or of jax key entries
    (jax.tree_util.tree_map_with_path); boxed (nn.Partitioned) trees are accepted too.
    """
    names = [_key_name(k) for k in path]
    if len(names) >= 2 and names[-1] == 'value':  # flattened through an nn.Partitioned box
        names = names[:-1]
    module = names[-2].lower() if len(names) >= 2 else ''
    return bool(names) and 'bn' not in module and 'norm' not in module


def decay_mask(params: Any) -> Any:
    """Pytree of bools, True where `is_decayed` (e.g. for optax.masked / add_decayed_weights)."""
    return jax.tree_util.tree_map_with_path(is_decayed, params)


__all__ = ['CNN', 'DEFAULTS', 'EfficientNet', 'MLP', 'MODELS', 'PRESETS', 'ResNet', 'ResNet50',
           'WideResNet', 'decay_mask', 'from_config', 'get_model', 'is_decayed', 'model_options']
