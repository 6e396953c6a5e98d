"""The ('data', 'model') device mesh and the logical-axis rules that map names to it.

Models annotate parameters (`nn.with_logical_partitioning`) and activations
(`nn.with_logical_constraint`) with *logical* axis names; a rule table maps each name to a mesh
axis or to None (replicated). The table follows from the config:

- `mesh.model == 1`: pure data parallelism. Only the batch is split, over 'data'.
- `mesh.model > 1`: hybrid model-data parallelism. The batch is split over 'data' and every
  weight over 'model' along its output features ('channels' of convs and batch norms,
  'features' of hidden dense layers): tensor parallelism; activations follow (their channels
  are split over 'model' too, and XLA inserts the collectives).
- `spatial_partition = 'width'` (or 'height'), with `mesh.model > 1`: as the MPL paper's
  EfficientNet-L2 run, each image is cut into `mesh.model` strips along its width and each
  device of a model-parallel group convolves one strip (XLA exchanges the halos). The rule
  ('width', 'model') comes before ('channels', 'model') and a mesh axis can be used once per
  array, so activations are split along width while weights (which have no width axis) are
  still split along channels.

`config.sharding_rules` overrides single entries, e.g. `(('classes', 'model'),)`.
A weight dimension that the mesh axis does not divide (10 classes on 4 devices, 8 hidden units on
16) is replicated instead, with a log line: arrays must split evenly.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mpl import config_lib
from mpl.errors import ConfigError

# Logical axis names used by mpl.models.
# Order is priority: a mesh axis goes to the first name in this order that asks for it and that
# it divides. 'conv_in' and 'features_in' come last: they split a weight along its inputs only
# when its outputs ('channels', 'classes') cannot be split (see fitted_names).
DATA_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', 'data'),
    ('height', None),
    ('width', None),
    ('channels', None),
    ('features', None),
    ('classes', None),
    ('conv_in', None),
    ('features_in', None),
)

# Set on top of the data-parallel rules when config.mesh.model > 1: split weights (and the
# activations that follow them) along their output features; a weight whose outputs 'model'
# does not divide (1000 classes on 16 devices, 136 channels) is split along its inputs.
TENSOR_PARALLEL_RULES: tuple[tuple[str, Any], ...] = (
    ('channels', 'model'),
    ('features', 'model'),
    ('classes', 'model'),
    ('conv_in', 'model'),
    ('features_in', 'model'),
)
SPATIAL_PARTITIONS = ('', 'height', 'width')


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """Builds the ('data', 'model') mesh of `config.mesh` (data = -1 takes the rest).

  `devices` defaults to `jax.devices()`; `mpl.bench --dry_run --tpu` passes the abstract devices
  of a TPU topology it compiles for without having one.
  """
  devices = list(jax.devices() if devices is None else devices)
  data = config_lib.data_axis_size(config, len(devices))
  model = int(config.mesh.model)
  if data * model < len(devices):
    # A process with no device in the mesh could not read the global state, and the others
    # would wait for it in every collective.
    left_out = sorted({d.process_index for d in devices}
                      - {d.process_index for d in devices[:data * model]})
    if left_out:
      raise ConfigError(
          f'config.mesh (data={data}, model={model}) uses {data * model} of the {len(devices)} '
          f'devices and none of process(es) {left_out}: every process of a multi-host run must '
          f'hold part of the mesh. Set mesh.data = -1 to use every device.')
    logging.warning('config.mesh uses %d of the %d devices (data=%d, model=%d).',
                    data * model, len(devices), data, model)
  return jax.make_mesh((data, model), ('data', 'model'), devices=devices[:data * model],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def logical_rules(config) -> tuple[tuple[str, Any], ...]:
  """The rule table of `config` (see the module docstring); order is priority."""
  rules = dict(DATA_PARALLEL_RULES)
  spatial = config.get('spatial_partition') or ''
  config_lib.check_choice('spatial_partition', spatial, SPATIAL_PARTITIONS)
  if int(config.mesh.model) > 1:
    rules.update(TENSOR_PARALLEL_RULES)
    if spatial:
      rules[spatial] = 'model'  # 'height'/'width' precede 'channels' in the table
  elif spatial:
    logging.warning('spatial_partition=%r has no effect with mesh.model=1: it splits images over '
                    "the 'model' axis.", spatial)
  for entry in (config.get('sharding_rules') or ()):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
      raise ConfigError(f"config.sharding_rules holds (logical name, mesh axis) pairs, e.g. "
                        f"--config.sharding_rules=\"(('features', 'model'),)\"; got {entry!r}.")
    name, axis = entry
    config_lib.check_choice('logical axis name in config.sharding_rules', name, rules)
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    if not all(a in ('data', 'model', None) for a in axes):
      raise ConfigError(f"config.sharding_rules maps {name!r} to {axis!r}; mesh axes are 'data', "
                        f"'model' (or a tuple of both), or None (replicated).")
    rules[name] = axis
  return tuple(rules.items())


def _mesh_axis_size(mesh, axis) -> int:
  if axis is None:
    return 1
  names = axis if isinstance(axis, tuple) else (axis,)
  return int(np.prod([mesh.shape[n] for n in names]))


# Spatial activation dimensions are split only into strips this wide or wider (see constrain).
MIN_SPATIAL_SHARD = 2


def _splits(name: str | None, dim: int, parts: int) -> bool:
  if parts == 1:
    return True
  minimum = MIN_SPATIAL_SHARD if name in ('height', 'width') else 1
  return dim % parts == 0 and dim // parts >= minimum


def fitted_names(names, shape, mesh, rules) -> tuple[str | None, ...]:
  """The logical `names` of an array of `shape`, without those the mesh would split badly.

  A name whose mesh axis does not divide its dimension (or leaves spatial strips 1 pixel wide)
  is dropped, and the rules are resolved again, since the freed mesh axis may serve a later
  name: a (features_in, classes) kernel with 1000 classes on 16 devices is split along
  features_in instead.
  """
  names = tuple(names) + (None,) * (len(shape) - len(names))
  while True:
    axes = nn.logical_to_mesh_axes(names, rules)
    kept = tuple(name if _splits(name, dim, _mesh_axis_size(mesh, axis)) else None
                 for name, dim, axis in zip(names, shape, axes))
    if kept == names:
      return names
    names = kept


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """`nn.with_logical_constraint(x, names)`, leaving unsplit the dims that split badly.

  Models call this on their activations. Deep in a network the feature maps get small (a 4x4
  map cannot be cut into 8 strips); such a dimension is not split, and neither is a spatial one
  that would leave strips one pixel wide. One-pixel strips are avoided because XLA's SPMD
  partitioner computes a wrong kernel gradient for a stride-2 conv whose input is split into
  1-pixel strips and whose output is not split (measured with jax 0.10 on CPU: 16x16 and 8x8
  images in 8 strips; 2-pixel strips and larger match the unsharded gradients,
  tests/test_model_parallel.py).

  The mesh axis freed by a map too small for strips goes to the images instead
  (`_images_over_model`): each device of a model-parallel group takes whole small maps of
  1/model of the replica's images. Splitting their channels (the next name in the rules) would
  leave every device holding the whole batch's maps: the kernels are gathered whole for
  compute (`gather_for_compute`), so XLA computes the convs of channel-split maps on full-size
  buffers. On EfficientNet-L2 (16 x 16 maps in the last two stages, 8,256 expanded channels,
  272 teacher images per replica) each such buffer took 1.1 GB per core.
  When 'model' does not divide the images, their channels are split as before.
  """
  spec = activation_spec(x.shape, names)
  if spec is None:
    return nn.with_logical_constraint(x, names)
  return jax.lax.with_sharding_constraint(x, spec)


def activation_spec(shape, names) -> P | None:
  """The PartitionSpec `constrain` gives an activation of `shape` and logical `names`; None
  outside a mesh with logical-axis rules."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return None
  fitted = fitted_names(names, shape, mesh, rules)
  split_spatially = {n for n, axis in rules if n in ('height', 'width') and axis is not None}
  if any(name in split_spatially and kept is None for name, kept in zip(names, fitted)):
    images_split = _images_over_model(names, shape, mesh, rules)
    if images_split is not None:
      return images_split
  return P(*nn.logical_to_mesh_axes(fitted, rules))


def splits_over_every_axis(spec: P) -> bool:
  """Whether an array laid out as `spec` is split over every mesh axis larger than 1 (no
  axis holds copies of it)."""
  mesh = jax.sharding.get_abstract_mesh()
  used = set()
  for entry in spec:
    used.update(entry if isinstance(entry, tuple) else (entry,))
  return all(size == 1 or name in used for name, size in mesh.shape.items())


def _images_over_model(names, shape, mesh, rules) -> P | None:
  """P((<the batch's mesh axes>, <the spatial name's mesh axis>)): whole images over both, or
  None when that does not divide the batch."""
  rules = dict(rules)
  if not names or names[0] != 'batch':
    return None
  batch_axes = rules.get('batch') or ()
  batch_axes = tuple(batch_axes) if isinstance(batch_axes, (tuple, list)) else (batch_axes,)
  spatial_axes = {rules[n] for n in names if n in ('height', 'width') and rules.get(n)}
  axes = batch_axes + tuple(a for a in sorted(spatial_axes) if a not in batch_axes)
  if shape[0] % _mesh_axis_size(mesh, axes) != 0:
    return None
  return P(axes)


def spatially_partitioned() -> bool:
  """Whether the active rule table splits images along height or width."""
  rules = dict(nn.get_logical_axis_rules())
  return rules.get('height') is not None or rules.get('width') is not None


def gather_for_compute(variables, compute_dtype=None):
  """Under spatial partitioning: the variables, replicated for the forward/backward pass.

  Weights are *stored* split over 'model' (parameters, optimizer states and EMA take 1/model of
  the memory, as in the MPL paper), but every image strip needs the whole kernel, so each step
  all-gathers them, and XLA reduce-scatters their gradients back. Called on a whole network's
  variables, XLA's scheduler decides how many gathered weights are alive together; a model can
  gather block by block instead (`gathered_when_called`).
  Convolving width-split activations with channel-split kernels directly is also what trips
  an XLA SPMD bug (wrong kernel gradients on a (4, 2) mesh, tests/test_model_parallel.py).
  Without spatial partitioning the variables are returned as they are.
  """
  if jax.sharding.get_abstract_mesh().empty or not spatially_partitioned():
    return variables
  # Only inside a jitted function: eagerly this would materialise every weight whole on every
  # device (e.g. when the loop collects the variables it evaluates).
  if not any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(variables)):
    return variables
  cast = compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.float32

  def gather(path, v):
    if cast and getattr(path[-1], 'key', None) == 'kernel' and v.dtype == jnp.float32:
      v = v.astype(compute_dtype)
    return jax.lax.with_sharding_constraint(v, P())

  return jax.tree_util.tree_map_with_path(gather, variables)


def gathered_when_called(module_class, compute_dtype, initializing: bool):
  """`module_class` whose parameters are gathered (`gather_for_compute`) each time it runs.

  The whole-network gather of `gather_for_compute` keeps every gathered weight alive from the
  forward pass to the end of the backward pass (they are its residuals). A model that wraps
  each rematerialised block in this instead keeps only the block's stored 1/model shard: the
  block gathers its weights in the forward pass and again when its backward pass recomputes
  it, so about one block's gathered weights are alive at a time (as ZeRO-3 / FSDP do), for a
  second all-gather per weight and step. Such a model sets `gathers_own_weights = True`, and
  the methods then pass it its variables as stored (`methods.base.for_compute`).
  """
  def gather(params):
    return params if initializing else gather_for_compute(params, compute_dtype)
  return nn.map_variables(module_class, 'params', gather, init=initializing)


def state_shardings(abstract_boxed_state, mesh, rules):
  """NamedShardings for every leaf of a (boxed) abstract state; unannotated leaves replicate.

  Optimizer states and EMA copies are built by mapping over the boxed parameters, so they carry
  the same logical names and get the same shardings as the parameters they track. Names the
  mesh does not divide are dropped (`fitted_names`); arrays must split evenly.
  """
  is_box = lambda x: isinstance(x, nn.Partitioned)
  unfit = []

  def sharding_of(path, leaf):
    if not is_box(leaf):
      return NamedSharding(mesh, P())
    value = leaf.unbox(apply_constraint=False)
    names = fitted_names(leaf.names, value.shape, mesh, rules)
    wanted = nn.logical_to_mesh_axes(tuple(leaf.names), rules)
    got = nn.logical_to_mesh_axes(names, rules)
    if sum(a is not None for a in got) < sum(a is not None for a in wanted):
      unfit.append(f'{jax.tree_util.keystr(path)} {value.shape} {leaf.names}')
    return NamedSharding(mesh, got)

  shardings = jax.tree_util.tree_map_with_path(sharding_of, abstract_boxed_state,
                                               is_leaf=is_box)
  if unfit:
    logging.info('%d weight(s) split less than their names ask (mesh %s does not divide them), '
                 'e.g. %s.', len(unfit), dict(mesh.shape), unfit[0])
  return shardings


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


def leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'params/hidden_0/kernel': shape} for the arrays of a state or of a checkpoint's metadata.
  The paths are spelled alike for both: Orbax saves attributes and named-tuple fields as dict
  keys and tuples as lists."""
  def name(key):
    for field in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
      if hasattr(key, field):
        return str(getattr(key, field))
    return str(key)
  return {'/'.join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(leaf, 'shape')}


def shape_differences(saved, wanted, saved_name: str = 'the checkpoint',
                      wanted_name: str = 'this config', prefix: str = '', most: int = 6) -> str:
  """What keeps the arrays of `saved` (a checkpoint's metadata) from restoring as `wanted`, one
  clause per array ('' when they fit), for error messages."""
  saved, wanted = leaf_shapes(saved), leaf_shapes(wanted)
  lines = ([f'{prefix}{path} has shape {saved[path]} in {saved_name}, {wanted[path]} in '
            f'{wanted_name}' for path in wanted if path in saved and saved[path] != wanted[path]]
           + [f'{prefix}{path} is not in {saved_name}' for path in wanted if path not in saved]
           + [f'{prefix}{path} is in {saved_name} only' for path in saved if path not in wanted])
  if len(lines) > most:
    lines = lines[:most] + [f'and {len(lines) - most} more']
  return '; '.join(lines)


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
