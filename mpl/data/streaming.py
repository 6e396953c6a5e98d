"""Streaming input for datasets too large for host memory (imagenet2012, any TFDS image dataset).

One tf.data pipeline per host (process):

* Sharding. Every process reads the examples of the mesh's data rows that its devices sit in
  (`data_shard`): processes with devices in the same rows (a model-parallel replica spread
  over several hosts) read the same shard, and each set of rows is one shard of
  `tfds.even_splits(split, num_shards)`; with model parallelism inside each host every process
  reads its own. The rows come from the mesh's device order, not the process order: on TPU v4 /
  v5p `jax.make_mesh` lays the mesh out along the physical torus, where one host's chips may sit
  in several rows, not next to each other (`make_array_from_process_local_data` puts a host's
  examples in its rows in order). Each process yields `global_batch_size // num_shards`
  examples per batch; `global_batch` assembles the global array.
* Train (`train=True`): files and examples shuffled (seeded), repeated forever, Inception-style
  random-resized crop (area 8%-100%, aspect ratio 3/4-4/3) to `image_size`, random horizontal
  flip. The crop and flip use stateless ops keyed by (seed, shard, example counter), so a
  pipeline is reproducible for a seed.
* Eval (`train=False`): one pass in stored order; resize the shorter side to
  `image_size / eval_crop_fraction` and take the central `image_size` crop. All shards yield the
  same number of batches (hosts must step together): the last batches are padded with zero
  images, label -1 and `mask` False; eval batches carry a bool `mask` (True = real example).

Batches are {'image': uint8 (b, image_size, image_size, 3), 'label': int32 (b,)} (+ 'mask' in
eval); a dataset without labels gives label -1, and `StreamingInput` then leaves the unlabeled
batches' 'label' out. TensorFlow is imported only when a pipeline is built, and kept off the GPUs.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator

import numpy as np

from mpl.data import datasets
from mpl.errors import ConfigError, DataMissingError

_IMAGENET_MANUAL = (
    'imagenet2012 must be downloaded by hand (registration at https://image-net.org): put '
    'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual} and run\n'
    '  python -c "import tensorflow_datasets as tfds; tfds.builder(\'imagenet2012\'{dd})'
    '.download_and_prepare()"\n'
    '(several hours, ~150 GB; tensorflow-datasets 4.9.10 also needs `pip install '
    'importlib_resources`: tensorflow/datasets#11212), or copy an already prepared tensorflow_datasets/imagenet2012 '
    'directory into {where} (or pass --config.data.data_dir pointing at its parent).')


def data_shard(mesh_devices: np.ndarray, process_index: int) -> tuple[int, int]:
  """(shard index, number of shards) that process `process_index` reads, from the (data, model)
  array of devices of the mesh (`mesh.devices`): processes whose devices sit in the same data
  rows read the same shard, one shard per such set of rows, numbered by their first row (see
  module doc). ConfigError for a layout where two processes' rows overlap without being the
  same, or where processes hold different numbers of rows: no split into shards fits it."""
  rows_of = {}
  for row, devices in enumerate(np.asarray(mesh_devices).reshape(len(mesh_devices), -1)):
    for device in devices:
      rows_of.setdefault(device.process_index, set()).add(row)
  if process_index not in rows_of:
    raise ConfigError(f'process {process_index} holds no device of the mesh: every process of a '
                      f'multi-host run must take part (set mesh.data = -1).')
  groups = sorted({frozenset(rows) for rows in rows_of.values()}, key=min)
  if len({len(g) for g in groups}) > 1 or sum(map(len, groups)) != len(set().union(*groups)):
    raise ConfigError(
        f'the mesh puts the processes\' devices in data rows that a streamed input cannot split '
        f'into equal shards (rows per process: '
        f'{ {p: sorted(r) for p, r in sorted(rows_of.items())[:8]} }): processes must hold the '
        f'same number of rows, and two processes either the same rows or none in common. '
        f'Another mesh.model may lay the hosts out so.')
  return groups.index(frozenset(rows_of[process_index])), len(groups)


def get_builder(name: str, data_dir: str | None):
  """The prepared TFDS builder of `name`; `DataError` saying how to provide it if missing."""
  builder = datasets.tfds_builder(name, data_dir)
  if not datasets.is_prepared(builder):
    if name == 'imagenet2012':
      where = str(builder.data_dir_root)
      dd = f', data_dir={data_dir!r}' if data_dir else ''
      raise DataMissingError(f'imagenet2012 is not prepared in {where}. ' + _IMAGENET_MANUAL.format(
          manual=os.path.join(where, 'downloads', 'manual'), dd=dd, where=where))
    raise DataMissingError(datasets.not_prepared_message(name, builder))
  return builder


def make_streaming_iterator(name: str, split: str, *, global_batch_size: int, image_size: int,
                            data_dir: str | None, seed: int, train: bool,
                            shard: int | None = None, num_shards: int | None = None,
                            builder: Any = None,
                            shuffle_buffer_size: int = 10_000,
                            eval_crop_fraction: float = 0.875,
                            max_examples: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This host's stream of batches of TFDS dataset `name`, split `split` (see module doc).

  Args:
    name: TFDS name (e.g. 'imagenet2012'); ignored when `builder` is given.
    split: TFDS split, sub-splits allowed ('train', 'validation', 'train[:90%]', ...).
    global_batch_size: examples per step over all data shards.
    image_size: output height and width.
    data_dir: TFDS data dir (default `~/tensorflow_datasets`).
    seed: shuffling and augmentation seed.
    train: augmented infinite shuffled stream, or a single padded eval pass.
    shard, num_shards: this process reads shard `shard` of `num_shards` equal parts of the split
      (`data_shard`); default `jax.process_index()` of `jax.process_count()`.
    builder: an already prepared `tfds.core.DatasetBuilder` to read instead of `name`.
    shuffle_buffer_size: examples in the shuffle buffer (train).
    eval_crop_fraction: eval central crop side / resized shorter side.
    max_examples: eval only: at most ceil(max_examples / shards) examples of each shard, the
      first ones (0 = all): max_examples in all on one data shard.
  """
  if shard is None or num_shards is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard, num_shards = jax.process_index(), jax.process_count()
  if not 0 <= shard < num_shards:
    raise ConfigError(f'data shard {shard} is outside [0, {num_shards}).')
  if global_batch_size <= 0 or global_batch_size % num_shards:
    raise ConfigError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                      f'the {num_shards} data shards (the blocks of data rows the processes '
                      f'hold).')
  batch = global_batch_size // num_shards
  tfds = datasets.import_tfds()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if builder is None:
    builder = get_builder(name, data_dir)
  image_key, label_key = _keys(builder)
  has_label = has_labels(builder)  # unlabeled data may have none: label -1
  subsplits = tfds.even_splits(split, n=num_shards, drop_remainder=train)
  read_config = tfds.ReadConfig(shuffle_seed=seed + shard)
  ds = builder.as_dataset(split=subsplits[shard], shuffle_files=train, read_config=read_config,
                          decoders={image_key: tfds.decode.SkipDecoding()})
  ds = ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32) if has_label
                          else tf.constant(-1, tf.int32)),
              num_parallel_calls=tf.data.AUTOTUNE)

  if train:
    # Shuffled, then repeated: epochs stay whole (each example once per pass over the shard)
    # even when a host's shard is smaller than the buffer (the encoded images are small).
    ds = ds.shuffle(shuffle_buffer_size, seed=seed + shard, reshuffle_each_iteration=True)
    ds = ds.repeat().enumerate()
    base_seed = tf.constant([seed, shard], dtype=tf.int64)

    def train_map(i, ex):
      crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(base_seed, i), 2))
      image = _random_resized_crop(ex[0], image_size, crop_seed)
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
      return {'image': image, 'label': ex[1]}

    ds = ds.map(train_map, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True)
  else:
    sizes = [builder.info.splits[s].num_examples for s in subsplits]
    if max_examples:
      per_shard = math.ceil(max_examples / num_shards)
      ds = ds.take(per_shard)
      sizes = [min(size, per_shard) for size in sizes]
    num_batches = math.ceil(max(sizes) / batch)
    ds = ds.map(lambda img, label: {
        'image': _center_crop(img, image_size, eval_crop_fraction),
        'label': label, 'mask': tf.constant(True)}, num_parallel_calls=tf.data.AUTOTUNE)
    pad = tf.data.Dataset.from_tensors({
        'image': tf.zeros((image_size, image_size, 3), tf.uint8),
        'label': tf.constant(-1, tf.int32), 'mask': tf.constant(False)}).repeat()
    ds = ds.concatenate(pad).take(num_batches * batch).batch(batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds))


def _keys(builder) -> tuple[str, str]:
  return builder.info.supervised_keys or ('image', 'label')


def has_labels(builder) -> bool:
  """Whether the dataset has labels (an unlabeled set, e.g. a JFT-like one, may have none)."""
  return _keys(builder)[1] in builder.info.features


def global_batch(local: dict[str, np.ndarray], sharding, num_shards: int) -> dict[str, Any]:
  """Per-host batch -> global `jax.Array`s (leading axis split as `sharding` says). The global
  shape is given, not inferred, so that a host batch that does not fit the sharding is an
  error rather than a smaller array."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
      sharding, x, (x.shape[0] * num_shards,) + x.shape[1:]), local)


# --------------------------------------------------------------------------------------------
# Image ops (TensorFlow graph code; `tf` is imported lazily).


def _decode(encoded):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _resize(image, size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.image.resize(image, size, method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _random_resized_crop(encoded, image_size: int, seed, area_range=(0.08, 1.0),
                         aspect_ratio_range=(3 / 4, 4 / 3)):
  """Inception crop: a random box of the given area/aspect ranges, resized to image_size.

  JPEGs decode only the box (`decode_and_crop_jpeg`); other formats decode, then slice.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def sample_box(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros((1, 0, 4)), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=aspect_ratio_range, area_range=area_range, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg():
    begin, size = sample_box(tf.io.extract_jpeg_shape(encoded))
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
    return _resize(image, (image_size, image_size))

  def other():
    image = _decode(encoded)
    begin, size = sample_box(tf.shape(image))
    return _resize(tf.slice(image, begin, size), (image_size, image_size))

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image.set_shape((image_size, image_size, 3))
  return image


def _center_crop(encoded, image_size: int, crop_fraction: float):
  """Resize the shorter side to image_size / crop_fraction, then central image_size crop."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = _decode(encoded)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  short = tf.cast(tf.minimum(h, w), tf.float32)
  target = tf.cast(tf.math.ceil(image_size / crop_fraction), tf.float32)
  scale = target / short
  new_h = tf.maximum(tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32), image_size)
  new_w = tf.maximum(tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32), image_size)
  image = _resize(image, tf.stack([new_h, new_w]))
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  image = tf.slice(image, tf.stack([top, left, 0]), [image_size, image_size, 3])
  image.set_shape((image_size, image_size, 3))
  return image


# --------------------------------------------------------------------------------------------
# The training loop's view of a streaming dataset.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_split(builder, split: str, key: str) -> None:
  """ConfigError unless `split` (e.g. 'train[:10%]') names examples of `builder`'s dataset."""
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    raise ConfigError(f'{key}={split!r} is not a split of {builder.name} (it has '
                      f'{sorted(builder.info.splits)}; slices like \'train[:10%]\' work '
                      f'too): {e}') from e
  if not num_examples:
    raise ConfigError(f'{key}={split!r} of {builder.name} holds no examples.')


class StreamingInput:
  """Labeled, unlabeled and evaluation batches of TFDS datasets, as global sharded arrays.

  Config keys: `dataset` (labeled, e.g. 'imagenet2012'), `data.labeled_split` ('train[:10%]'
  for ImageNet-10%), `data.unlabeled_dataset` (default: the same dataset; e.g. a JFT-like set
  you bring), `data.unlabeled_split`, `data.eval_split`, `data.image_size` (0 -> 224),
  `data.data_dir`. Hosts that share a model-parallel replica read the same shard.

  Resuming restarts the shuffled streams with a seed derived from (seed, step): the run goes on
  with fresh batches, not the ones the uninterrupted run would have seen (unlike in-memory data).
  """

  def __init__(self, config, mesh, uses_unlabeled: bool, builder=None, unlabeled_builder=None):
    import jax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
    self.config = config
    self.uses_unlabeled = uses_unlabeled
    self.builder = builder or get_builder(config.dataset, config.data.data_dir)
    self.unlabeled_builder = unlabeled_builder
    if uses_unlabeled and unlabeled_builder is None and config.data.unlabeled_dataset:
      self.unlabeled_builder = get_builder(config.data.unlabeled_dataset, config.data.data_dir)
    self.unlabeled_builder = self.unlabeled_builder or self.builder
    # Without labels the unlabeled batches carry none (not the -1 placeholders), so that the
    # methods do not log a pseudo-label accuracy of 0 against them.
    self.unlabeled_has_labels = has_labels(self.unlabeled_builder)
    # A split name that does not exist fails here, not at the first evaluation.
    check_split(self.builder, config.data.labeled_split, 'data.labeled_split')
    check_split(self.builder, config.data.eval_split, 'data.eval_split')
    if uses_unlabeled:
      check_split(self.unlabeled_builder, config.data.unlabeled_split, 'data.unlabeled_split')
    self.num_classes = self.builder.info.features['label'].num_classes
    self.image_size = config.data.image_size or 224
    # Processes holding one model-parallel replica read identical data.
    self.shard, self.num_shards = data_shard(mesh.devices, jax.process_index())
    self.sharding = NamedSharding(mesh, P('data'))
    self._labeled = self._unlabeled = None

  def _stream(self, builder, split, batch, seed, train, max_examples=0):
    return make_streaming_iterator(
        builder.name, split, global_batch_size=batch, image_size=self.image_size,
        data_dir=self.config.data.data_dir, seed=seed, train=train, builder=builder,
        shard=self.shard, num_shards=self.num_shards, max_examples=max_examples)

  def start(self, step: int) -> None:
    """(Re)opens the training streams; the seed depends on the step a run (re)starts from."""
    seed = (self.config.seed * 1_000_003 + step) % (2**31)
    c = self.config
    self._labeled = self._stream(self.builder, c.data.labeled_split, c.batch_size, seed, True)
    if self.uses_unlabeled:
      self._unlabeled = self._stream(self.unlabeled_builder, c.data.unlabeled_split,
                                     c.batch_size * c.mu, seed + 1, True)

  def sample_images(self) -> np.ndarray:
    return np.zeros((1, self.image_size, self.image_size, 3), np.uint8)

  def next_batch(self):
    local = {'labeled': next(self._labeled)}
    if self._unlabeled is not None:
      local['unlabeled'] = next(self._unlabeled)
      if not self.unlabeled_has_labels:
        del local['unlabeled']['label']
    return global_batch(local, self.sharding, self.num_shards)

  def eval_batches(self):
    """One pass over the eval split: global batches with a 'mask' of real examples; with
    data.max_eval_examples, its first examples (rounded up to a multiple of the data shards)."""
    for local in self._stream(self.builder, self.config.data.eval_split,
                              self.config.eval_batch_size, 0, False,
                              max_examples=self.config.data.get('max_eval_examples', 0)):
      yield global_batch(local, self.sharding, self.num_shards)
