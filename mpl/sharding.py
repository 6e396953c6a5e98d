"""The ('data', 'model') device mesh and the logical-axis rules that map names to it.

Models annotate parameters (`nn.with_logical_partitioning`) and activations
(`nn.with_logical_constraint`) with *logical* axis names; the rule table below maps each name
to a mesh axis or to None (replicated). The default layout is pure data parallelism: only the
batch is split, over 'data'. Model parallelism is a change of rules, not of code: e.g.
`('channels', 'model')` splits every conv weight over 'model', and `('width', 'model')` splits
images along their width (the MPL paper's spatial partitioning).
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mpl import config_lib

# Logical axis names used by mpl.models.
DATA_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', 'data'),
    ('height', None),
    ('width', None),
    ('channels', None),
    ('conv_in', None),
    ('features', None),
    ('features_in', None),
    ('classes', None),
)


def make_mesh(config) -> jax.sharding.Mesh:
  """Builds the ('data', 'model') mesh of `config.mesh` (data = -1 takes the rest)."""
  devices = jax.devices()
  data = config_lib.data_axis_size(config, len(devices))
  model = int(config.mesh.model)
  if data * model < len(devices):
    logging.warning('config.mesh uses %d of the %d devices (data=%d, model=%d).',
                    data * model, len(devices), data, model)
  return jax.make_mesh((data, model), ('data', 'model'), devices=devices[:data * model],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
  """The rule table: defaults, overridden per name by `config.sharding_rules` if present."""
  rules = dict(DATA_PARALLEL_RULES)
  for name, axis in (config.get('sharding_rules') or ()):
    rules[name] = axis
  return tuple(rules.items())


def state_shardings(abstract_boxed_state, mesh, rules):
  """NamedShardings for every leaf of a (boxed) abstract state; unannotated leaves replicate."""
  specs = nn.get_partition_spec(abstract_boxed_state)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis over 'data', everything else replicated."""
  del ndim
  return NamedSharding(mesh, P('data'))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def describe(tree) -> dict[str, str]:
  """{path: sharding spec} of a tree of arrays, for logs and tests."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): str(getattr(leaf, 'sharding', None))
          for path, leaf in flat}


def bytes_per_device(tree) -> int:
  """Largest per-device footprint of a tree of sharded arrays (or ShapeDtypeStructs)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard_shape)) * leaf.dtype.itemsize
  return total


def strip_boxes(tree):
  """Removes logical-axis boxes (nn.Partitioned), keeping the values as they are."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree,
                      is_leaf=is_box)
