"""Tests of mpl.data: datasets, IDX reader, labeled splits, streaming input."""
import gzip
import hashlib
import os
import threading
import time

import jax
import numpy as np
import pytest

from mpl import config_lib, sharding
from mpl.data import datasets, idx, split, streaming
from mpl.errors import ConfigError, DataError, DataMissingError

import tiny_tfds
from tiny_tfds import NUM_TINY

HAVE_TFDS = datasets.tensorflow_available()
HAVE_FASHION = all(
    os.path.isfile(os.path.join(datasets.FASHION_MNIST_DEFAULT_DIR, f))
    for f in idx.FASHION_MNIST_FILES.values())
needs_tfds = pytest.mark.skipif(not HAVE_TFDS, reason='needs tensorflow + tensorflow-datasets')
needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason='needs `apt-get install -y dataset-fashion-mnist`')


@pytest.fixture(autouse=True)
def _no_fashion_env(monkeypatch):
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX and TFDS give the same arrays.


@pytest.fixture(scope='session')
def fashion_idx():
  return datasets.load_dataset('fashion_mnist', source='idx')


@pytest.fixture(scope='session')
def fashion_tfds_dir(tmp_path_factory):
  """TFDS fashion_mnist built once (~20 s) from the Debian files into a temporary data dir."""
  return str(tmp_path_factory.mktemp('tfds'))


@needs_fashion
def test_fashion_mnist_idx(fashion_idx):
  d = fashion_idx
  assert d.train_images.shape == (60000, 28, 28, 1) and d.train_images.dtype == np.uint8
  assert d.test_images.shape == (10000, 28, 28, 1) and d.test_images.dtype == np.uint8
  assert d.train_labels.dtype == np.int32 and d.test_labels.dtype == np.int32
  assert d.num_classes == 10
  np.testing.assert_array_equal(np.bincount(d.train_labels), [6000] * 10)
  np.testing.assert_allclose(d.mean, [d.train_images.mean(dtype=np.float64) / 255], rtol=1e-9)
  np.testing.assert_allclose(d.std, [0.3530], atol=1e-4)  # The published Fashion-MNIST std.


@needs_fashion
@needs_tfds
def test_fashion_mnist_tfds_equals_idx(fashion_idx, fashion_tfds_dir):
  d = datasets.load_dataset('fashion_mnist', source='tfds', data_dir=fashion_tfds_dir)
  assert os.path.isdir(os.path.join(fashion_tfds_dir, 'fashion_mnist', '3.0.1'))
  for field in ('train_images', 'train_labels', 'test_images', 'test_labels'):
    a, b = getattr(fashion_idx, field), getattr(d, field)
    assert a.dtype == b.dtype and a.shape == b.shape, field
    np.testing.assert_array_equal(a, b, err_msg=field)
  assert d.mean == fashion_idx.mean and d.std == fashion_idx.std


@needs_fashion
def test_padding_keeps_content_centred(fashion_idx):
  d = datasets.load_dataset('fashion_mnist', source='idx', image_size=32)
  assert d.train_images.shape == (60000, 32, 32, 1) and d.test_images.shape[1:] == (32, 32, 1)
  np.testing.assert_array_equal(d.train_images[:, 2:30, 2:30], fashion_idx.train_images)
  border = d.test_images.copy()
  border[:, 2:30, 2:30] = 0
  assert not border.any()
  assert d.mean == fashion_idx.mean  # Statistics of the unpadded images.


def test_pad_odd_and_too_small():
  x = np.ones((2, 3, 3, 1), np.uint8)
  y = datasets.pad_to(x, 6)
  assert y.shape == (2, 6, 6, 1) and y[:, 1:4, 1:4].all() and y.sum() == x.sum()
  with pytest.raises(ConfigError, match='smaller'):
    datasets.load_dataset('digits', image_size=4)


def test_channel_stats_are_per_channel_and_pad_to_handles_non_square_images():
  """RGB datasets (cifar, svhn) normalise each channel by its own statistics, and pad_to's
  contract is a square output centred on the input whatever its aspect ratio."""
  images = np.zeros((2, 2, 2, 3), np.uint8)
  images[..., 0], images[..., 1] = 255, 51
  images[0, ..., 2] = 255  # channel 2: half 0, half 255
  mean, std = datasets.channel_stats(images)
  np.testing.assert_allclose(mean, [1.0, 0.2, 0.5], atol=1e-12)
  np.testing.assert_allclose(std, [0.0, 0.0, 0.5], atol=1e-12)
  x = np.ones((1, 2, 4, 1), np.uint8)
  y = datasets.pad_to(x, 6)
  assert y.shape == (1, 6, 6, 1) and y[:, 2:4, 1:5].all() and y.sum() == x.sum()


def test_missing_fashion_files(tmp_path, monkeypatch):
  monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path))
  with pytest.raises(DataError, match=f'not found in {tmp_path}, where '
                     f'{datasets.FASHION_MNIST_ENV} points.*or unset it'):
    datasets.load_dataset('fashion_mnist', source='idx')
  # With source 'auto' too the variable names the files to read: not a TFDS copy of others.
  def no_tfds(*args):
    raise AssertionError('read TFDS although the variable names the IDX files')
  with monkeypatch.context() as patch:
    patch.setattr(datasets, '_fashion_mnist_tfds', no_tfds)
    patch.setattr(datasets, 'tensorflow_available', lambda: True)
    with pytest.raises(DataError, match=f'where {datasets.FASHION_MNIST_ENV} points'):
      datasets.load_dataset('fashion_mnist', source='auto')
  # The variable replaces data_dir, which is not read (so not checked) then.
  monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path / 'none'))
  with pytest.raises(DataError, match=f'not found in {tmp_path / "none"}, where'):
    datasets.load_dataset('fashion_mnist', source='idx', data_dir=str(tmp_path / 'no_dir'))
  # Without the variable: the default place, and the command that fills it.
  monkeypatch.delenv(datasets.FASHION_MNIST_ENV)
  monkeypatch.setattr(datasets, 'FASHION_MNIST_DEFAULT_DIR', str(tmp_path / 'none'))
  with pytest.raises(DataError, match='apt-get install -y dataset-fashion-mnist'):
    datasets.load_dataset('fashion_mnist', source='idx')
  if HAVE_TFDS:  # Not prepared in data_dir and no files to build it from.
    with pytest.raises(DataError, match='apt-get install -y dataset-fashion-mnist'):
      datasets.load_dataset('fashion_mnist', source='tfds', data_dir=str(tmp_path))


def _idx_bytes(arr: np.ndarray) -> bytes:
  header = bytes([0, 0, 8, arr.ndim]) + np.array(arr.shape, '>u4').tobytes()
  return header + arr.astype(np.uint8).tobytes()


def test_idx_reader_and_corruption(tmp_path):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  good = tmp_path / 'good.gz'
  good.write_bytes(gzip.compress(_idx_bytes(images)))
  np.testing.assert_array_equal(idx.read_idx(good, ndim=3), images)
  cases = {
      'magic': gzip.compress(b'\x01\x02' + _idx_bytes(images)[2:]),
      'truncated': gzip.compress(_idx_bytes(images)[:-1]),
      'dimensions': gzip.compress(_idx_bytes(images[0])),
      'gzip': gzip.compress(_idx_bytes(images))[:-8] + b'garbage!',
  }
  for what, data in cases.items():
    bad = tmp_path / f'{what}.gz'
    bad.write_bytes(data)
    with pytest.raises(DataError, match='dataset-fashion-mnist'):
      idx.read_idx(bad, ndim=3)
  # Through the loader: a directory of corrupted Fashion-MNIST files.
  for fname in idx.FASHION_MNIST_FILES.values():
    (tmp_path / fname).write_bytes(cases['truncated'])
  with pytest.raises(DataError) as error:
    datasets.load_dataset('fashion_mnist', source='idx', data_dir=str(tmp_path))
  assert not isinstance(error.value, DataMissingError)
  # Corrupt data is not missing data: a smoke config that falls back to stand-in data when the
  # real data is absent must not train on random pixels here.
  config = config_lib.base_config()
  config.dataset, config.data.standin = 'fashion_mnist', 'if_missing'
  config.data.source, config.data.data_dir = 'idx', str(tmp_path)
  with pytest.raises(DataError, match='dataset-fashion-mnist'):
    datasets.load_from_config(config)
  config.data.data_dir = str(tmp_path / 'none')  # absent: then the stand-in
  assert 'stand-in' in datasets.load_from_config(config).name



def test_idx_reader_rejects_what_the_size_check_alone_lets_through(tmp_path):
  """Corruptions the data size cannot reveal: one non-zero magic byte, another 1-byte type
  code (0x09, signed byte), bytes beyond the data, or contents unlike the official file. Each
  must raise DataError with the exact reinstall command, not yield garbage or a ValueError."""
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  good = _idx_bytes(images)
  cases = {
      'magic': b'\x00\x01' + good[2:],
      'type code': good[:2] + b'\x09' + good[3:],
      'trailing byte': good + b'\x00',
  }
  for what, data in cases.items():
    bad = tmp_path / f'{what}.idx'
    bad.write_bytes(data)
    with pytest.raises(DataError,
                       match='apt-get install --reinstall -y dataset-fashion-mnist'):
      idx.read_idx(bad, ndim=3)
  path = tmp_path / 'good.gz'
  path.write_bytes(gzip.compress(good))
  with pytest.raises(DataError, match='do not match the official file'):
    idx.read_idx(path, ndim=3, sha256='0' * 64)
  np.testing.assert_array_equal(
      idx.read_idx(path, ndim=3, sha256=hashlib.sha256(good).hexdigest()), images)


def test_idx_reader_reads_uncompressed_files_into_writable_arrays(tmp_path):
  """Plain (not gzipped) IDX files read as well as gzipped ones, and the arrays are writable
  (callers may edit them in place; np.frombuffer alone would give read-only views)."""
  labels = np.array([3, 0, 9, 255], np.uint8)
  plain = tmp_path / 'labels-idx1-ubyte'
  plain.write_bytes(_idx_bytes(labels))
  got = idx.read_idx(plain, ndim=1)
  np.testing.assert_array_equal(got, labels)
  assert got.flags.writeable
  got[0] = 7  # must not raise


def _write_fashion(directory, num_train=3, train_labels=None):
  """Tiny files with the Fashion-MNIST names and layout (not the official contents)."""
  rng = np.random.default_rng(0)
  arrays = {'train_images': rng.integers(0, 256, (num_train, 28, 28)),
            'train_labels': np.arange(num_train) % 10 if train_labels is None else train_labels,
            'test_images': rng.integers(0, 256, (2, 28, 28)),
            'test_labels': np.array([9, 0])}
  for key, fname in idx.FASHION_MNIST_FILES.items():
    (directory / fname).write_bytes(gzip.compress(_idx_bytes(np.asarray(arrays[key]))))
  return arrays


def test_read_fashion_mnist_checks_contents_counts_and_label_range(tmp_path):
  """Files of the right names but wrong contents: refused by the sha256 check; without it,
  split arrays that do not pair up (more images than labels) or labels outside 0..9 still raise
  DataError, since training on them would misalign or index past the 10 classes."""
  want = _write_fashion(tmp_path)
  with pytest.raises(DataError, match='do not match the official file'):
    idx.read_fashion_mnist(tmp_path)
  got = idx.read_fashion_mnist(tmp_path, verify=False)
  for key in ('train_images', 'test_images'):
    np.testing.assert_array_equal(got[key], want[key][..., None])
  np.testing.assert_array_equal(got['test_labels'], [9, 0])
  _write_fashion(tmp_path, train_labels=np.array([0, 1]))
  with pytest.raises(DataError, match='3 train images but 2 labels'):
    idx.read_fashion_mnist(tmp_path, verify=False)
  _write_fashion(tmp_path, train_labels=np.array([0, 10, 1]))
  with pytest.raises(DataError, match='labels outside 0..9'):
    idx.read_fashion_mnist(tmp_path, verify=False)


def test_data_missing_on_another_host_counts_as_missing_on_every_host():
  """Multi-host: a host that has the data must not train on it while another host trains on
  stand-in arrays (the global arrays would differ per host): all fall back, or all stop."""
  config = config_lib.base_config()  # Fashion-MNIST, which this host has
  config.dataset, config.data.standin, config.data.source = 'fashion_mnist', 'if_missing', 'idx'
  assert datasets.load_from_config(config).name == 'fashion_mnist'
  another_host_lacks_it = lambda flag: True  # any_process when another host's flag is True
  assert 'stand-in' in datasets.load_from_config(config, any_host=another_host_lacks_it).name
  config.data.standin = 'never'
  with pytest.raises(DataMissingError, match='missing on another host'):
    datasets.load_from_config(config, any_host=another_host_lacks_it)

# --------------------------------------------------------------------------------------------
# Small sklearn datasets, names.


def test_unknown_dataset_lists_names():
  with pytest.raises(ConfigError) as e:
    datasets.load_dataset('mnist')
  for name in datasets.DATASETS:
    assert name in str(e.value)


def test_two_moons_and_digits():
  m = datasets.load_dataset('two_moons', noise=0.1, seed=3)
  assert m.train_images.shape == (2000, 2) and m.train_images.dtype == np.float32
  # noise and seed are used: without noise every point lies on its moon's unit half circle
  exact = datasets.load_dataset('two_moons', noise=0.0, seed=3)
  x, y = exact.train_images, exact.train_labels
  np.testing.assert_allclose(np.hypot(x[y == 0, 0], x[y == 0, 1]), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.hypot(x[y == 1, 0] - 1.0, x[y == 1, 1] - 0.5), 1.0, atol=1e-6)
  assert np.abs(np.hypot(m.train_images[:, 0], m.train_images[:, 1]) - 1.0)[
      m.train_labels == 0].max() > 0.1
  assert not np.array_equal(datasets.load_dataset('two_moons', noise=0.1, seed=4).train_images,
                            m.train_images)
  np.testing.assert_array_equal(m.train_images, m.test_images)
  assert m.train_labels.dtype == np.int32 and m.num_classes == 2 and m.mean == (0.,)
  d = datasets.load_dataset('digits', image_size=12)
  assert d.train_images.shape == (1438, 12, 12, 1) and d.test_images.shape == (359, 12, 12, 1)
  assert d.train_images.dtype == np.uint8 and d.train_images.max() == 255
  assert np.bincount(d.test_labels).min() >= 35  # Stratified: ~36 per class.
  native = datasets.load_dataset('digits')
  np.testing.assert_array_equal(d.train_images[:, 2:10, 2:10], native.train_images)
  x = native.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(native.mean, [x.mean()], rtol=1e-9)
  np.testing.assert_allclose(native.std, [x.std()], rtol=1e-9)


def test_two_moons_from_a_config_uses_its_data_seed_and_noise():
  config = config_lib.base_config()
  config.dataset, config.data.standin, config.data.image_size = 'two_moons', 'never', 0
  config.data.seed, config.data.noise = 5, 0.2
  data = datasets.load_from_config(config)
  want = datasets.load_dataset('two_moons', noise=0.2, seed=5)
  np.testing.assert_array_equal(data.train_images, want.train_images)
  np.testing.assert_array_equal(data.train_labels, want.train_labels)
  assert not np.array_equal(data.train_images,
                            datasets.load_dataset('two_moons', noise=0.2, seed=0).train_images)


def test_digits_split_partitions_the_dataset_in_order_at_full_scale():
  """The digits 0..16 grey levels map onto 0..255 exactly (16 -> 255, no uint8 wrap-around);
  train and test are disjoint and hold all 1797 digits with their own labels; and each split
  keeps sklearn's order (the module's promise), so indices into it mean the same digit."""
  from sklearn import datasets as skd  # pylint: disable=g-import-not-at-top
  sk = skd.load_digits()
  index = {img.astype(np.uint8).tobytes(): i for i, img in enumerate(sk.images)}
  d = datasets.load_dataset('digits')
  found = {}
  for split_name in ('train', 'test'):
    images = getattr(d, f'{split_name}_images')[..., 0].astype(np.float64)
    levels = np.round(images * 16 / 255)
    np.testing.assert_array_equal(np.round(levels * 255 / 16), images)  # exact 17 levels
    found[split_name] = np.array([index[x.astype(np.uint8).tobytes()] for x in levels])
    assert np.all(np.diff(found[split_name]) > 0), split_name
    np.testing.assert_array_equal(getattr(d, f'{split_name}_labels'),
                                  sk.target[found[split_name]])
  np.testing.assert_array_equal(np.sort(np.concatenate(list(found.values()))), np.arange(1797))


def test_two_moons_test_set_is_its_train_set_and_takes_no_image_size():
  """The paper's two-moons accuracy is measured on the training points: the test labels must be
  the train labels too. It has no pixels, so an image_size is a mistake, not ignored."""
  m = datasets.load_dataset('two_moons', noise=0.1, seed=3)
  np.testing.assert_array_equal(m.test_labels, m.train_labels)
  assert m.test_labels.dtype == np.int32
  with pytest.raises(ConfigError, match='not an image dataset'):
    datasets.load_dataset('two_moons', image_size=32)


def test_standin_data_holds_the_configs_labeled_split():
  # The paper configs' benchmarks run on stand-in pixels: CIFAR-10-4K's split must fit.
  config = config_lib.base_config()
  config.dataset, config.num_labeled, config.data.standin = 'cifar10', 4000, 'always'
  data = datasets.load_from_config(config)
  assert data.train_images.shape == (8000, 32, 32, 3) and 'stand-in' in data.name
  labeled = split.labeled_indices(data.train_labels, 4000, data.num_classes, seed=0)
  assert np.all(np.bincount(data.train_labels[labeled]) == 400)
  config.num_labeled = -1   # all: the small default
  assert len(datasets.load_from_config(config).train_labels) == datasets.STANDIN_TRAIN_SIZE


def test_standin_data_has_balanced_labels_the_configs_image_size_and_seed():
  config = config_lib.base_config()
  config.dataset, config.num_labeled, config.data.standin = 'cifar100', -1, 'always'
  config.data.image_size = 40
  data = datasets.load_from_config(config)
  assert data.train_images.shape == (512, 40, 40, 3) and data.test_images.shape[1:] == (40, 40, 3)
  np.testing.assert_array_equal(np.bincount(data.train_labels, minlength=100),
                                np.bincount(np.arange(512) % 100))  # as even as 512 / 100 allows
  np.testing.assert_array_equal(np.bincount(data.test_labels, minlength=100),
                                np.bincount(np.arange(256) % 100))
  again = datasets.load_from_config(config)
  np.testing.assert_array_equal(again.train_images, data.train_images)
  config.data.seed = 1
  assert not np.array_equal(datasets.load_from_config(config).train_images, data.train_images)


# --------------------------------------------------------------------------------------------
# Labeled split.

LABELS = np.repeat(np.arange(10), [30, 40, 50, 60, 70, 80, 90, 100, 110, 120]).astype(np.int32)
np.random.default_rng(0).shuffle(LABELS)


def test_split_balance_and_determinism():
  idx_a = split.labeled_indices(LABELS, 253, 10, seed=0)
  assert idx_a.dtype == np.int64 and len(idx_a) == 253 and len(np.unique(idx_a)) == 253
  assert np.all(np.diff(idx_a) > 0)
  counts = np.bincount(LABELS[idx_a], minlength=10)
  assert set(counts) == {25, 26} and (counts == 26).sum() == 3
  np.testing.assert_array_equal(idx_a, split.labeled_indices(LABELS, 253, 10, seed=0))
  idx_b = split.labeled_indices(LABELS, 253, 10, seed=1)
  assert not np.array_equal(idx_a, idx_b)
  np.testing.assert_array_equal(split.labeled_indices(LABELS, -1, 10, 0), np.arange(750))


def test_split_draws_each_class_and_its_extra_labels_at_random_by_seed():
  # No remainder (100 = 10 x 10): the seed alone must change which examples of a class are taken.
  draws = [split.labeled_indices(LABELS, 100, 10, seed=s) for s in range(4)]
  for idx_s in draws:
    np.testing.assert_array_equal(np.bincount(LABELS[idx_s], minlength=10), [10] * 10)
  assert len({tuple(d) for d in draws}) == 4
  # Not the first examples of each class.
  first = np.sort(np.concatenate([np.flatnonzero(LABELS == c)[:10] for c in range(10)]))
  assert not any(np.array_equal(d, first) for d in draws)
  # The 3 remaining labels go to classes the seed chooses, not always the same ones.
  extra = {tuple(np.flatnonzero(np.bincount(LABELS[split.labeled_indices(LABELS, 253, 10, s)],
                                            minlength=10) == 26)) for s in range(8)}
  assert len(extra) > 1, extra


def test_split_remainder_goes_only_to_classes_with_examples_to_spare():
  # Class 0 has exactly 30 examples: 303 labels are 30 per class plus 3 extra for 3 of the 9
  # classes with more; every seed must give 303 distinct indices, 30 of them in class 0.
  for seed in range(12):
    idx_s = split.labeled_indices(LABELS, 303, 10, seed=seed)
    assert len(idx_s) == len(np.unique(idx_s)) == 303, seed
    counts = np.bincount(LABELS[idx_s], minlength=10)
    assert counts[0] == 30 and set(counts[1:]) == {30, 31} and counts.sum() == 303, (seed, counts)


def test_split_errors():
  with pytest.raises(ConfigError, match='exceeds'):
    split.labeled_indices(LABELS, 751, 10, seed=0)
  with pytest.raises(ConfigError, match='num_classes'):
    split.labeled_indices(LABELS, 9, 10, seed=0)
  with pytest.raises(ConfigError, match='class 0 has only 30'):
    split.labeled_indices(LABELS, 400, 10, seed=0)


def test_unlabeled_indices():
  labeled = np.array([1, 5, 7])
  np.testing.assert_array_equal(split.unlabeled_indices(10, labeled, False), np.arange(10))
  np.testing.assert_array_equal(split.unlabeled_indices(10, labeled, exclude_labeled=True),
                                [0, 2, 3, 4, 6, 8, 9])


def test_split_save_load(tmp_path):
  workdir = str(tmp_path / 'run')
  assert split.load_split(workdir) is None
  labeled = split.labeled_indices(LABELS, 100, 10, seed=4)
  meta = {'dataset': 'digits', 'num_labeled': 100, 'seed': 4}
  split.save_split(workdir, labeled, meta, labels=LABELS)
  loaded, saved_meta = split.load_split(workdir, expected=meta)
  np.testing.assert_array_equal(loaded, labeled)
  assert loaded.dtype == np.int64
  assert saved_meta['per_class_counts'] == [10] * 10 and saved_meta['seed'] == 4
  split.save_split(workdir, labeled, meta)  # Same split again: fine.
  with pytest.raises(ConfigError, match='seed'):
    split.load_split(workdir, expected={**meta, 'seed': 5})
  with pytest.raises(ConfigError, match='num_labeled'):
    split.save_split(workdir, labeled[:50], {**meta, 'num_labeled': 50})


def test_saved_split_must_fit_the_training_set(tmp_path):
  """A split made on other data (stand-in images, another copy) is refused, not reused."""
  labeled = split.labeled_indices(LABELS, 100, 10, seed=4)
  meta = {'dataset': 'digits', 'num_labeled': 100, 'seed': 4}
  split.save_split(str(tmp_path), labeled, meta, labels=LABELS)
  idx, record = split.load_split(str(tmp_path), expected=meta)
  split.check_fits(idx, record, LABELS, 'split.json')  # the same data: fine
  with pytest.raises(ConfigError, match=r'labeled examples per class were \[10, 10'):
    split.check_fits(idx, record, np.roll(LABELS, 1), 'split.json')
  with pytest.raises(ConfigError, match=r'indices range over \d+\.\.\d+'):
    split.check_fits(idx, record, LABELS[:idx.max()], 'split.json')
  with pytest.raises(ConfigError, match='1 indices are repeated'):
    split.check_fits(np.append(idx, idx[0]), {}, LABELS, 'split.json')


# --------------------------------------------------------------------------------------------
# Streaming: a tiny TFDS dataset built offline, read through the real pipeline.

@pytest.fixture(scope='module')
def tiny_builder(tmp_path_factory):
  pytest.importorskip('tensorflow_datasets')
  builder = tiny_tfds.tiny_builder_class()(data_dir=str(tmp_path_factory.mktemp('tiny_tfds')))
  builder.download_and_prepare()
  return builder


def _stream(builder, **kw):
  args = dict(global_batch_size=8, image_size=16, data_dir=None, seed=0, train=False,
              shard=0, num_shards=2, builder=builder)
  args.update(kw)
  return streaming.make_streaming_iterator('tiny_images', 'train', **args)


def _ids(batches, batch_size=4):
  ids = []
  for b in batches:
    assert b['image'].shape == (batch_size, 16, 16, 3) and b['image'].dtype == np.uint8
    assert b['label'].dtype == np.int32
    ids += tiny_tfds.example_ids(b['image'][b['mask']])
    assert (b['label'][~b['mask']] == -1).all()
  return ids


def test_streaming_eval_shards_disjoint(tiny_builder):
  shard0, shard1 = list(_stream(tiny_builder)), list(_stream(tiny_builder, shard=1))
  assert len(shard0) == len(shard1) == 4  # ceil(13 / 4): both hosts step together.
  ids0, ids1 = _ids(shard0), _ids(shard1)
  assert not set(ids0) & set(ids1)
  assert sorted(ids0 + ids1) == list(range(NUM_TINY))
  # The only shard holds everything.
  whole = list(_stream(tiny_builder, num_shards=1))
  assert sorted(_ids(whole, 8)) == list(range(NUM_TINY))


def test_streaming_eval_takes_max_examples(tiny_builder):
  """The first ceil(max / shards) examples of each shard, in whole padded batches; one shard
  (here, two processes of one model-parallel group) takes exactly max."""
  shards = [list(_stream(tiny_builder, shard=p, max_examples=5)) for p in (0, 1)]
  assert [len(s) for s in shards] == [1, 1]
  ids0, ids1 = _ids(shards[0]), _ids(shards[1])
  assert len(ids0) == len(ids1) == 3
  assert ids0 == _ids(list(_stream(tiny_builder)))[:3]  # the shard's first examples
  one_shard = list(_stream(tiny_builder, num_shards=1, max_examples=10))
  assert len(one_shard) == 2 and len(_ids(one_shard, 8)) == 10


def test_streaming_train(tiny_builder):
  it = _stream(tiny_builder, train=True, seed=1)
  batches = [next(it) for _ in range(8)]  # More than one epoch of the 12-example shard.
  for b in batches:
    assert set(b) == {'image', 'label'}
    assert b['image'].shape == (4, 16, 16, 3) and b['image'].dtype == np.uint8
    assert b['label'].shape == (4,) and b['label'].dtype == np.int32
  again = next(_stream(tiny_builder, train=True, seed=1))
  np.testing.assert_array_equal(again['image'], batches[0]['image'])
  # Whole epochs, though the shard (12 examples) is far smaller than the shuffle buffer: each
  # pass of 3 batches holds every example of the shard once, in a new order.
  epochs = [sorted(_ids_of(batches[i:i + 3])) for i in (0, 3)]
  assert epochs[0] == epochs[1] and len(set(epochs[0])) == 12, epochs
  assert _ids_of(batches[0:3]) != _ids_of(batches[3:6])
  with pytest.raises(ConfigError, match='multiple'):
    _stream(tiny_builder, global_batch_size=7)


def test_streaming_train_shards_draw_their_own_augmentation(tiny_builder, monkeypatch):
  """The crop of a host's i-th example is keyed by (seed, shard, i): two hosts do not crop their
  examples alike. (The crop is replaced by a flat image whose value shows its seed.)"""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def crop_showing_its_seed(encoded, image_size, seed):
    del encoded
    return tf.fill((image_size, image_size, 3), tf.cast(tf.math.floormod(seed[0], 251), tf.uint8))

  monkeypatch.setattr(streaming, '_random_resized_crop', crop_showing_its_seed)
  def crop_seeds(shard):
    batch = next(_stream(tiny_builder, train=True, shard=shard))
    return [int(image[0, 0, 0]) for image in batch['image']]

  assert crop_seeds(0) != crop_seeds(1), (crop_seeds(0), crop_seeds(1))
  assert crop_seeds(0) == crop_seeds(0)


def _ids_of(batches):
  return [i for b in batches for i in tiny_tfds.example_ids(b['image'])]


def test_streaming_unlabeled_dataset_without_labels(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  builder = tiny_tfds.tiny_builder_class(with_labels=False)(data_dir=str(tmp_path))
  builder.download_and_prepare()
  batch = next(_stream(builder, train=True))
  assert batch['label'].tolist() == [-1] * 4  # no labels: -1, used for monitoring only


def test_streaming_input_omits_the_labels_an_unlabeled_dataset_lacks(tiny_builder, tmp_path):
  # A JFT-like unlabeled set: its batches carry no 'label' (not -1s), so no method logs a
  # pseudo-label accuracy against placeholders; the labeled batches keep theirs.
  unlabeled = tiny_tfds.tiny_builder_class(with_labels=False)(data_dir=str(tmp_path))
  unlabeled.download_and_prepare()
  c = config_lib.base_config()
  c.dataset, c.data.streaming, c.data.image_size = 'tiny_images', True, 16
  c.data.labeled_split = c.data.unlabeled_split = c.data.eval_split = 'train'
  c.batch_size, c.mu = 8, 1
  mesh = sharding.make_mesh(c)
  for unlabeled_builder, has_labels in ((unlabeled, False), (tiny_builder, True)):
    stream = streaming.StreamingInput(c, mesh, uses_unlabeled=True, builder=tiny_builder,
                                      unlabeled_builder=unlabeled_builder)
    stream.start(0)
    batch = stream.next_batch()
    assert ('label' in batch['unlabeled']) == has_labels
    assert batch['unlabeled']['image'].shape == (8, 16, 16, 3)
    assert batch['labeled']['label'].shape == (8,)


def test_streaming_input_gives_mu_times_more_unlabeled_examples_from_its_own_shuffle(tiny_builder):
  """Global batches are split over 'data' (one example per device), the unlabeled batch is
  batch_size * mu examples, and the unlabeled stream is shuffled apart from the labeled one
  even when both read the same split."""
  c = config_lib.base_config()
  c.dataset, c.data.streaming, c.data.image_size = 'tiny_images', True, 16
  c.data.labeled_split = c.data.unlabeled_split = c.data.eval_split = 'train'
  c.batch_size, c.mu = 8, 2
  mesh = sharding.make_mesh(c)
  stream = streaming.StreamingInput(c, mesh, uses_unlabeled=True, builder=tiny_builder)
  stream.start(0)
  batch = stream.next_batch()
  labeled, unlabeled = batch['labeled']['image'], batch['unlabeled']['image']
  assert labeled.shape == (8, 16, 16, 3) and unlabeled.shape == (16, 16, 16, 3)
  for array in (labeled, unlabeled, batch['labeled']['label']):
    assert array.sharding.spec == jax.sharding.PartitionSpec('data'), array.sharding
    assert array.sharding.shard_shape(array.shape)[0] == array.shape[0] // 8
  labeled_ids = tiny_tfds.example_ids(np.asarray(labeled))
  unlabeled_ids = tiny_tfds.example_ids(np.asarray(unlabeled))
  assert len(set(labeled_ids)) == 8 and len(set(unlabeled_ids)) == 16
  assert labeled_ids != unlabeled_ids[:8], (labeled_ids, unlabeled_ids)


def test_streaming_input_resumed_at_another_step_draws_fresh_batches(tiny_builder):
  """A restart from step s reopens the streams with a seed of (seed, s): the same batches for
  the same step, other ones for another step (not a replay of the run's first batches)."""
  c = config_lib.base_config()
  c.dataset, c.data.streaming, c.data.image_size = 'tiny_images', True, 16
  c.data.labeled_split = c.data.eval_split = 'train'
  c.batch_size = 8
  stream = streaming.StreamingInput(c, sharding.make_mesh(c), uses_unlabeled=False,
                                    builder=tiny_builder)
  def first_ids(step):
    stream.start(step)
    return tiny_tfds.example_ids(np.asarray(stream.next_batch()['labeled']['image']))
  at_0 = first_ids(0)
  assert first_ids(0) == at_0
  assert first_ids(100) != at_0


def test_streaming_split_names_are_checked(tiny_builder):
  streaming.check_split(tiny_builder, 'train[:40%]', 'data.labeled_split')
  with pytest.raises(ConfigError, match=r"data.eval_split='validation' is not a split of "
                     r"tiny_images \(it has \['train'\]"):
    streaming.check_split(tiny_builder, 'validation', 'data.eval_split')


def test_global_batch(tiny_builder):
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  local = next(_stream(tiny_builder, num_shards=1))
  batch = streaming.global_batch(local, sharding, num_shards=1)
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].sharding == sharding
  np.testing.assert_array_equal(np.asarray(batch['label']), local['label'])
  with pytest.raises(ValueError):  # a host batch that does not fit: an error, not a half batch
    streaming.global_batch(local, sharding, num_shards=2)


class _Device:
  def __init__(self, process_index):
    self.process_index = process_index


def _layout(rows):
  """A (data, model) mesh device array from the process of each device, row by row."""
  return np.array([[_Device(p) for p in row] for row in rows], dtype=object)


def test_data_shard_follows_the_mesh_rows_not_the_process_order():
  # Process order, model parallelism inside each host (4 hosts x 2 devices, mesh 4 x 2).
  layout = _layout([[0, 0], [1, 1], [2, 2], [3, 3]])
  assert [streaming.data_shard(layout, p) for p in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
  # A replica over two hosts (mesh 2 x 4): both hosts read its shard.
  layout = _layout([[0, 0, 1, 1], [2, 2, 3, 3]])
  assert [streaming.data_shard(layout, p) for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
  # TPU v4-like torus order (mesh 2 x 8, 4 hosts of 4 chips): every host has chips in both rows,
  # so every host reads the whole batch.
  layout = _layout([[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 3, 3]])
  assert [streaming.data_shard(layout, p) for p in range(4)] == [(0, 1)] * 4
  # Two hosts, each in two data rows of four.
  layout = _layout([[0, 0], [0, 0], [1, 1], [1, 1]])
  assert [streaming.data_shard(layout, p) for p in range(2)] == [(0, 2), (1, 2)]
  # TPU v4-like interleaving with data parallelism: each host's rows are not next to each other.
  layout = _layout([[0], [1], [0], [1]])
  assert [streaming.data_shard(layout, p) for p in range(2)] == [(0, 2), (1, 2)]
  # Layouts no split into shards fits: rows shared in part, or more rows for one process.
  with pytest.raises(ConfigError, match=r'either the same rows or none in common'):
    streaming.data_shard(_layout([[0, 2], [0, 1], [1, 2]]), 0)
  with pytest.raises(ConfigError, match=r'rows per process: \{0: \[0\], 1: \[1, 2\]'):
    streaming.data_shard(_layout([[0], [1], [1]]), 0)
  with pytest.raises(ConfigError, match='holds no device'):
    streaming.data_shard(_layout([[0], [0]]), 1)


@needs_tfds
def test_tfds_image_dataset_loads_both_splits_with_its_classes(tmp_path, monkeypatch):
  """A prepared TFDS image dataset (cifar100's path, here a tiny one of 7 classes): train and
  test come from their own splits, uint8 NHWC images and int32 labels, num_classes from the
  dataset (100 for cifar100, not a fixed 10), and statistics of the unpadded train images."""
  tfds = datasets.import_tfds()

  class TinyClasses(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    url_infos = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(4, 4, 3)),
          'label': tfds.features.ClassLabel(num_classes=7)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(5, 0), 'test': self._generate_examples(3, 100)}

    def _generate_examples(self, n, value):  # train images are 0, test images 100
      for i in range(n):
        yield i, {'image': np.full((4, 4, 3), value, np.uint8), 'label': (i * 3) % 7}

  builder = TinyClasses(data_dir=str(tmp_path))
  builder.download_and_prepare()
  monkeypatch.setattr(datasets, 'tfds_builder', lambda name, data_dir: builder)
  d = datasets.load_dataset('cifar100', data_dir=str(tmp_path), image_size=6)
  assert d.num_classes == 7
  assert d.train_images.shape == (5, 6, 6, 3) and d.test_images.shape == (3, 6, 6, 3)
  assert d.train_images.dtype == np.uint8 and not d.train_images.any()
  assert (d.test_images[:, 1:5, 1:5] == 100).all() and d.test_images.sum() == 3 * 48 * 100
  assert d.train_labels.dtype == d.test_labels.dtype == np.int32
  assert sorted(d.train_labels) == [0, 2, 3, 5, 6] and sorted(d.test_labels) == [0, 3, 6]
  assert d.mean == (0.0,) * 3 and d.std == (0.0,) * 3


def test_missing_tensorflow_names_the_pinned_install_command(monkeypatch):
  """Without TensorFlow the TFDS paths say how to install it: the exact versions pinned in
  requirements.txt (others may not read the datasets this code was tested with)."""
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'requirements.txt')) as f:
    pins = dict(line.split('#')[0].strip().split('==') for line in f if '==' in line)
  command = (f"pip install tensorflow-cpu=={pins['tensorflow-cpu']} "
             f"tensorflow-datasets=={pins['tensorflow-datasets']}")
  monkeypatch.setattr(datasets, 'tensorflow_available', lambda: False)
  with pytest.raises(DataMissingError, match=f'`{command}`'):
    datasets.load_dataset('cifar10')
  with pytest.raises(DataMissingError, match=f'`{command}`'):
    datasets.load_dataset('fashion_mnist', source='tfds')


@needs_tfds
def test_tfds_dataset_not_prepared(tmp_path):
  with pytest.raises(DataError, match=r"tfds.builder\('cifar10'\).download_and_prepare\(\)"):
    datasets.load_dataset('cifar10', data_dir=str(tmp_path))


@needs_tfds
def test_a_missing_tfds_dataset_leaves_no_folder_in_tmp(tmp_path, monkeypatch):
  import tempfile  # pylint: disable=g-import-not-at-top
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
  for load in (lambda: datasets.load_dataset('cifar10', data_dir=str(tmp_path)),
               lambda: streaming.get_builder('imagenet2012', str(tmp_path))):
    with pytest.raises(DataError):
      load()
  assert os.listdir(scratch) == []
  # Why datasets.tfds_builder exists: TFDS's own builder leaves an empty tmpXXXXtfds folder for
  # a dataset that is not prepared. If this fails, TFDS no longer does, and the helper can go.
  datasets.import_tfds().builder('cifar10', data_dir=str(tmp_path))
  assert [name[-4:] for name in os.listdir(scratch)] == ['tfds']


@needs_tfds
def test_streaming_missing_imagenet(tmp_path):
  with pytest.raises(DataError, match='manual'):
    streaming.make_streaming_iterator(
        'imagenet2012', 'train', global_batch_size=8, image_size=224, data_dir=str(tmp_path),
        seed=0, train=True, shard=0, num_shards=1)


def test_no_tensorflow_at_import():
  code = ('import sys, mpl.data, mpl.data.split, mpl.data.streaming, mpl.data.idx; '
          'assert "tensorflow" not in sys.modules')
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  subprocess.run([sys.executable, '-c', code], check=True,
                 cwd=os.path.dirname(os.path.dirname(__file__)))


def test_run_once_across_processes_makes_once(tmp_path):
  """Runs that start together build a dataset once; the others wait, then find it built."""
  marker, calls = tmp_path / 'built', []

  def make():
    calls.append(1)
    time.sleep(0.3)  # Long enough that every caller has checked `done()` before it ends.
    marker.write_text('ok')

  lock = str(tmp_path / 'data' / '.lock')
  threads = [threading.Thread(target=datasets.run_once_across_processes,
                              args=(lock, marker.exists, make)) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(calls) == 1 and marker.read_text() == 'ok'
  datasets.run_once_across_processes(lock, marker.exists, make)  # Already built: no call.
  assert len(calls) == 1
