"""Small datasets, loaded whole into host memory as numpy arrays.

| name          | source                                   | train / test   | x                   |
|---------------|------------------------------------------|----------------|---------------------|
| two_moons     | sklearn `make_moons(2000, noise, seed)`  | 2000 / same    | float32 (N, 2)      |
| digits        | sklearn `load_digits`, stratified split  | 1438 / 359     | uint8 (N, 8, 8, 1)  |
| fashion_mnist | IDX files (Debian `dataset-fashion-mnist`) or TFDS built from them | 60000 / 10000 | uint8 (N, 28, 28, 1) |
| cifar10       | TFDS (prepared by the user)              | 50000 / 10000  | uint8 (N, 32, 32, 3)|
| cifar100      | TFDS (prepared by the user)              | 50000 / 10000  | uint8 (N, 32, 32, 3)|
| svhn_cropped  | TFDS (prepared by the user)              | 73257 / 26032  | uint8 (N, 32, 32, 3)|

Labels are int32. Images keep their dataset order (fashion_mnist: the IDX file order, from both
sources). `mean`/`std` are per-channel statistics of the *train* images in [0, 1] units, computed
exactly (from pixel histograms) on the native, unpadded images, so they do not depend on
`image_size`; two_moons has mean (0.,) and std (1.,) (no normalisation).

`image_size` larger than the native size zero-pads symmetrically (28 -> 32 adds 2 pixels on each
side; an odd difference puts the extra pixel at the bottom/right); smaller is a `ConfigError`.

Fashion-MNIST files are looked up in `$MPL_FASHION_MNIST_DIR` if set (and only there; with
source 'auto' it also selects the IDX reader), else in `data_dir/fashion-mnist`, `data_dir` (when
`data_dir` is given), then `/usr/share/datasets/fashion-mnist`. With `source='tfds'` (or 'auto'
with TensorFlow installed and the variable unset), the TFDS `fashion_mnist` dataset in
`data_dir` (default `~/tensorflow_datasets`) is used, and built once from those files if it is
not there yet (about 20 s; runs that start together wait for the first one's build, under a
lock file in `data_dir`).

TensorFlow is imported only inside the TFDS code paths; the rest works without it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import sys
import os
import tempfile
from typing import Any, Callable

from absl import logging
import numpy as np

from mpl import reporting
from mpl.data import idx
from mpl.errors import ConfigError, DataError, DataMissingError


@dataclasses.dataclass(frozen=True)
class InMemoryDataset:
  """A whole dataset as host numpy arrays (see the module docstring for shapes and stats)."""
  name: str
  train_images: np.ndarray  # uint8 (N, H, W, C) for images; float32 (N, D) for two_moons.
  train_labels: np.ndarray  # int32 (N,)
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]  # Per-channel mean of the train images in [0, 1] units.
  std: tuple[float, ...]  # Per-channel std of the train images in [0, 1] units.


DATASETS: tuple[str, ...] = (
    'two_moons', 'digits', 'fashion_mnist', 'cifar10', 'cifar100', 'svhn_cropped')
STREAMING_DATASETS: tuple[str, ...] = ('imagenet2012',)
POINT_DATASETS = ('two_moons',)               # (N, 2) points: no image views or partitioning
SKLEARN_DATASETS = ('two_moons', 'digits')    # generated or loaded by scikit-learn, never TFDS
SOURCES = ('auto', 'idx', 'tfds')

TWO_MOONS_SIZE = 2000
DIGITS_TEST_SIZE = 359  # -> 1438 train / 359 test, stratified, random_state 0.
FASHION_MNIST_ENV = 'MPL_FASHION_MNIST_DIR'
FASHION_MNIST_DEFAULT_DIR = '/usr/share/datasets/fashion-mnist'
_TFDS_NATIVE = ('cifar10', 'cifar100', 'svhn_cropped')
_TFDS_PIP = 'pip install tensorflow-cpu==2.21.0 tensorflow-datasets==4.9.10'


def load_dataset(name: str, *, data_dir: str | None = None, image_size: int | None = None,
                 source: str = 'auto', noise: float = 0.1, seed: int = 0) -> InMemoryDataset:
  """Loads dataset `name` (one of `DATASETS`) into memory.

  Args:
    name: dataset name.
    data_dir: TFDS data dir (default `~/tensorflow_datasets`) and/or the directory holding the
      Fashion-MNIST IDX files (see module docstring).
    image_size: pad images to this square size (>= native size); None keeps the native size.
    source: fashion_mnist only: 'idx' (numpy reader), 'tfds', or 'auto' (TFDS if TensorFlow and
      tensorflow-datasets are installed, else IDX). Both give identical arrays.
    noise: two_moons only: the Gaussian noise of `make_moons`.
    seed: two_moons only: the `random_state` of `make_moons`.
  """
  if name not in DATASETS:
    hint = (f' {name} is a streaming dataset: use mpl.data.streaming.make_streaming_iterator.'
            if name in STREAMING_DATASETS else '')
    raise ConfigError(f'Unknown dataset {name!r}; valid names: {", ".join(DATASETS)}.{hint}')
  if source not in SOURCES:
    raise ConfigError(f'Unknown data source {source!r}; valid: {", ".join(SOURCES)}.')
  if data_dir and name in SKLEARN_DATASETS:
    logging.warning('data_dir=%s is not used: %s comes with scikit-learn.', data_dir, name)
  elif (data_dir and '://' not in data_dir and not os.path.isdir(data_dir) and
        not (name == 'fashion_mnist' and source != 'tfds' and os.environ.get(FASHION_MNIST_ENV))):
    # (Where FASHION_MNIST_ENV names the files, data_dir is not read.) With
    # data.standin='if_missing' the stand-in data replaces it, as for any missing data.
    raise DataMissingError(
        f'data_dir {data_dir} is not a directory. Point it at the directory that holds the '
        f'dataset (TFDS: the one holding {name}/; Fashion-MNIST IDX files: it or its '
        f'fashion-mnist/), or create it first for a new TFDS build of Fashion-MNIST there.')
  if name == 'two_moons':
    if image_size is not None:
      raise ConfigError('two_moons is not an image dataset; leave image_size unset (None).')
    return _two_moons(noise, seed)
  if name == 'digits':
    arrays, num_classes = _digits(), 10
  elif name == 'fashion_mnist':
    arrays, num_classes = _fashion_mnist(data_dir, source), 10
  else:
    arrays, num_classes = _tfds_arrays(name, data_dir)
  mean, std = channel_stats(arrays['train_images'])
  if image_size is not None:
    arrays['train_images'] = pad_to(arrays['train_images'], image_size, name)
    arrays['test_images'] = pad_to(arrays['test_images'], image_size, name)
  return InMemoryDataset(name=name, num_classes=num_classes, mean=mean, std=std, **arrays)


def missing_on_some_host(name: str, missing: DataMissingError | None, standin: str,
                         any_host: Callable[[bool], bool]) -> bool:
  """Whether `name` is missing on any host of the run (`missing`: this host's error, if it
  lacks the data), so that every host falls back to stand-in data together; raises instead
  when data.standin is 'never'."""
  if not any_host(missing is not None):
    return False
  if standin == 'never':
    raise missing or DataMissingError(
        f'{name} is here but missing on another host (its log says how to provide it there): '
        f'every host of a multi-host run needs the data.')
  if missing is None:
    logging.warning('%s is missing on another host: every host uses the stand-in data.', name)
  return True


def load_from_config(config, any_host: Callable[[bool], bool] = bool) -> InMemoryDataset:
  """The in-memory training/test set a config asks for (`config.dataset`, `config.data`).

  `config.data.standin`: 'never' (missing data is an error), 'if_missing' (random stand-in
  data of the right shapes when the real data is absent: the runlocal smoke tests of the paper
  configs) or 'always'.
  `any_host(flag)`: True on every host if `flag` is True on any (multi-host runs pass
  `train.any_process`): data missing on one host counts as missing on all, so that every host
  holds the same arrays (or every host stops).
  """
  standin = config.data.standin
  if standin not in ('never', 'if_missing', 'always'):
    raise ConfigError(f"unknown data.standin {standin!r}; valid: 'never', 'if_missing', 'always'")
  streaming = bool(config.data.streaming) or config.dataset in STREAMING_DATASETS
  if standin != 'always' and not streaming:
    data = missing = None
    try:
      data = load_dataset(config.dataset, data_dir=config.data.data_dir,
                          image_size=config.data.image_size or None, source=config.data.source,
                          noise=config.data.noise, seed=config.data.seed)
    except DataMissingError as e:  # corrupt data is an error, not missing
      missing = e
    if not missing_on_some_host(config.dataset, missing, standin, any_host):
      return data
  if standin == 'never':
    raise ConfigError(f'{config.dataset} is a streaming dataset: it cannot be loaded into '
                      f'memory (set data.standin for a smoke test on random data).')
  logging.warning('Using random STAND-IN data with the shapes of %s (data.standin=%s): a smoke '
                  'test, not a result.', config.dataset, standin)
  # Small, unless the config labels more (a paper config's full split, e.g. its benchmark):
  # then its labeled split and as many unlabeled images again.
  num_train = max(STANDIN_TRAIN_SIZE, 2 * int(config.num_labeled))
  return standin_dataset(config.dataset, image_size=config.data.image_size or None,
                         num_train=num_train, seed=config.data.seed)


# Examples in (train, test) of the datasets with stand-in shapes, for memory planning
# (`mpl.bench --dry_run`) without reading them.
SIZES: dict[str, tuple[int, int]] = {
    'fashion_mnist': (60000, 10000),
    'cifar10': (50000, 10000),
    'cifar100': (50000, 10000),
    'svhn_cropped': (73257, 26032),
    'imagenet2012': (1281167, 50000),
}

# Shapes of the datasets users bring, for stand-in data: (height, width, channels, classes).
STANDIN_SHAPES: dict[str, tuple[int, int, int, int]] = {
    'fashion_mnist': (28, 28, 1, 10),
    'cifar10': (32, 32, 3, 10),
    'cifar100': (32, 32, 3, 100),
    'svhn_cropped': (32, 32, 3, 10),
    'imagenet2012': (224, 224, 3, 1000),
}


STANDIN_TRAIN_SIZE = 512


def standin_dataset(name: str, *, image_size: int | None = None,
                    num_train: int = STANDIN_TRAIN_SIZE,
                    num_test: int = 256, seed: int = 0) -> InMemoryDataset:
  """Random uint8 images and balanced labels with the shapes of dataset `name`.

  For the `runlocal` variants of the paper configs, so that the real pipeline (model, method,
  sharding, checkpoints) runs on a machine without the real data. Never for results.
  """
  if name not in STANDIN_SHAPES:
    raise ConfigError(f'no stand-in shapes for {name!r}; known: {sorted(STANDIN_SHAPES)}')
  height, width, channels, num_classes = STANDIN_SHAPES[name]
  if image_size:
    height = width = image_size
  rng = np.random.default_rng(seed)
  def make(n):
    images = rng.integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    return images, labels
  train_images, train_labels = make(num_train)
  test_images, test_labels = make(num_test)
  return InMemoryDataset(name=f'{name} (stand-in)', train_images=train_images,
                         train_labels=train_labels, test_images=test_images,
                         test_labels=test_labels, num_classes=num_classes,
                         mean=(0.5,) * channels, std=(0.29,) * channels)


# --------------------------------------------------------------------------------------------
# Helpers shared by all image datasets.


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Exact per-channel mean and std of uint8 images (N, H, W, C), in [0, 1] units."""
  levels = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  for c in range(images.shape[-1]):
    counts = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
    p = counts / counts.sum()
    mean = float(p @ levels)
    var = max(float(p @ levels**2) - mean**2, 0.0)
    means.append(mean)
    stds.append(var**0.5)
  return tuple(means), tuple(stds)


def pad_to(images: np.ndarray, image_size: int, name: str = '') -> np.ndarray:
  """Zero-pads (N, H, W, C) images symmetrically to (N, image_size, image_size, C)."""
  h, w = images.shape[1:3]
  if image_size < max(h, w):
    raise ConfigError(f'image_size={image_size} is smaller than the native {h}x{w} images of '
                      f'{name or "this dataset"}; use image_size >= {max(h, w)} (or None).')
  if image_size == h == w:
    return images
  top, left = (image_size - h) // 2, (image_size - w) // 2
  pad = ((0, 0), (top, image_size - h - top), (left, image_size - w - left), (0, 0))
  return np.pad(images, pad)


# --------------------------------------------------------------------------------------------
# scikit-learn datasets.


def _two_moons(noise: float, seed: int) -> InMemoryDataset:
  from sklearn import datasets as skd  # pylint: disable=g-import-not-at-top
  x, y = skd.make_moons(TWO_MOONS_SIZE, noise=noise, random_state=seed)
  x, y = x.astype(np.float32), y.astype(np.int32)
  # The MPL paper reports two-moons accuracy on the training points themselves.
  return InMemoryDataset(name='two_moons', train_images=x, train_labels=y, test_images=x.copy(),
                         test_labels=y.copy(), num_classes=2, mean=(0.,), std=(1.,))


def _digits() -> dict[str, np.ndarray]:
  """sklearn digits, 0..16 scaled to 0..255; fixed stratified 1438/359 split (random_state 0)."""
  from sklearn import datasets as skd  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  d = skd.load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=0)
  train, test = np.sort(train), np.sort(test)  # Keep the original order within each split.
  return {'train_images': images[train], 'train_labels': labels[train],
          'test_images': images[test], 'test_labels': labels[test]}


# --------------------------------------------------------------------------------------------
# Fashion-MNIST.


def fashion_mnist_dir(data_dir: str | None = None) -> str:
  """The directory holding the four Fashion-MNIST .gz files; `DataError` if there is none."""
  env = os.environ.get(FASHION_MNIST_ENV)
  if env:
    candidates = [env]
  else:
    candidates = []
    if data_dir:
      candidates += [os.path.join(data_dir, 'fashion-mnist'), data_dir]
    candidates.append(FASHION_MNIST_DEFAULT_DIR)
  for d in candidates:
    if all(os.path.isfile(os.path.join(d, f)) for f in idx.FASHION_MNIST_FILES.values()):
      logging.info('Fashion-MNIST: the IDX files in %s.', d)
      return d
  files = ', '.join(idx.FASHION_MNIST_FILES.values())
  if env:  # the variable replaces every other place: say so, the files may be elsewhere
    raise DataMissingError(
        f'Fashion-MNIST files ({files}) not found in {env}, where {FASHION_MNIST_ENV} points '
        f'(it replaces the other places, {FASHION_MNIST_DEFAULT_DIR} included). Point it at '
        f'the directory holding them, or unset it.')
  raise DataMissingError(
      f'Fashion-MNIST files ({files}) not found in {", ".join(candidates)}. Install them '
      f'with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu; puts them in '
      f'{FASHION_MNIST_DEFAULT_DIR}), or set {FASHION_MNIST_ENV} to a directory holding them.')


def tensorflow_available() -> bool:
  """Whether TensorFlow and tensorflow-datasets are installed (without importing them)."""
  def installed(module):
    if module in sys.modules and sys.modules[module] is None:  # import blocked
      return False
    try:
      return importlib.util.find_spec(module) is not None
    except (ValueError, ImportError):
      return False
  return all(installed(m) for m in ('tensorflow', 'tensorflow_datasets'))


def _fashion_mnist(data_dir: str | None, source: str) -> dict[str, np.ndarray]:
  if source == 'auto':
    # The variable names the files to read: TFDS's copy, built from other files, would not be.
    explicit_files = bool(os.environ.get(FASHION_MNIST_ENV))
    source = 'tfds' if tensorflow_available() and not explicit_files else 'idx'
  if source == 'idx':
    directory = fashion_mnist_dir(data_dir)
    if data_dir and directory == FASHION_MNIST_DEFAULT_DIR and os.path.realpath(data_dir) not in (
        os.path.realpath(directory), os.path.realpath(os.path.dirname(directory))):
      logging.warning('data_dir=%s holds no Fashion-MNIST files: reading those in %s.',
                      data_dir, directory)
    return idx.read_fashion_mnist(directory)
  return _fashion_mnist_tfds(data_dir)


def _fashion_mnist_tfds(data_dir: str | None) -> dict[str, np.ndarray]:
  """TFDS `fashion_mnist` from `data_dir`, built from the local IDX files when missing."""
  builder = tfds_builder('fashion_mnist', data_dir)
  if not is_prepared(builder) or _jax_process_count() > 1:   # hosts of a run: all, see below
    # Runs started together on a fresh machine would otherwise all build it, and all but the
    # first fail when TFDS renames its finished folder into place.
    run_once_across_processes(
        os.path.join(builder.data_dir_root, '.fashion_mnist.lock'),
        done=lambda: is_prepared(tfds_builder('fashion_mnist', data_dir)),
        make=lambda: prepare_fashion_mnist_tfds(data_dir))
    builder = tfds_builder('fashion_mnist', data_dir)
  out = {}
  for split in ('train', 'test'):
    images, labels = _tfds_split(builder, split)
    # TFDS stores the examples sorted by a hash of their key (the index in the IDX file, see
    # tfds.core.hashing); undo that permutation so both sources give the file order.
    if not builder.info.disable_shuffling:
      order = _tfds_write_order(split, len(labels))
      images[order], labels[order] = images.copy(), labels.copy()
    out[f'{split}_images'], out[f'{split}_labels'] = images, labels
  return out


def _jax_process_count() -> int:
  """The processes of this (multi-host) JAX run; 1 without JAX imported (a tool, a test)."""
  jax = sys.modules.get('jax')
  return jax.process_count() if jax is not None else 1


def run_once_across_processes(lock_path: str, done: Callable[[], bool],
                              make: Callable[[], Any]) -> None:
  """Calls `make()` unless `done()`, holding an exclusive lock on `lock_path` meanwhile.

  Processes that wait for the lock check `done()` again once they hold it, so `make` runs once
  however many processes ask together. The hosts of a multi-host JAX run need no lock (a
  `gs://` path has none, nor some shared filesystems): every host must call this, the lead
  (process 0) makes, and the others wait for it (and stop with it if it fails). Otherwise a
  remote path cannot be locked: there each process checks and makes on its own.
  """
  if _jax_process_count() > 1:
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    error = None
    if jax.process_index() == 0 and not done():
      try:
        make()
      except Exception as e:  # pylint: disable=broad-except  (raised below, on every host)
        error = e
    failed = multihost_utils.process_allgather(np.asarray(error is not None)).any()
    if error is not None:
      raise error
    if failed:
      raise DataError(f'the lead host (process 0) could not make what {lock_path} guards; its '
                      f'log says why.')
    return
  if done():
    return
  if '://' in lock_path:
    make()
    return
  os.makedirs(os.path.dirname(lock_path) or '.', exist_ok=True)
  with open(lock_path, 'a') as lock:
    try:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        logging.info('Waiting for another process to finish building (lock %s).', lock_path)
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    except OSError as e:  # no flock on this filesystem (e.g. Lustre without -o flock)
      logging.warning('Cannot lock %s (%s); building without the lock.', lock_path, e)
    if not done():
      make()


def _tfds_write_order(split: str, n: int) -> np.ndarray:
  """`order[j]` = key (0..n-1) of the j-th record TFDS wrote for a generated split."""
  from tensorflow_datasets.core import hashing  # pylint: disable=g-import-not-at-top
  hasher = hashing.Hasher(split)  # TFDS salts the key hash with the split name.
  return np.array(sorted(range(n), key=hasher.hash_key), dtype=np.int64)


def prepare_fashion_mnist_tfds(data_dir: str | None = None,
                               manual_dir: str | None = None) -> str:
  """Builds TFDS `fashion_mnist` into `data_dir` from local IDX .gz files; returns its path.

  TFDS's `fashion_mnist` builder asks its download manager for the four official URLs. With
  `DownloadConfig(manual_dir=...)`, the download manager takes a URL's file from `manual_dir`
  when a file of the registered name is there, but it then checks the file's size and sha256
  against the registered ones (`url_checksums/fashion_mnist.txt`), which are those of the
  original .gz files; Debian re-gzipped them, so that check fails. We therefore
    1. check that the *decompressed* files are the official ones (sha256, `idx.py`), and
    2. build with a subclass of the stock builder whose `url_infos` (the checksums TFDS checks
       against) register the local .gz files' own size and sha256,
  leaving everything else -- name, version, features, split generation -- to the stock builder,
  so the result is the ordinary `fashion_mnist/3.0.1` that `tfds.builder('fashion_mnist')` reads.
  Nothing is downloaded; extracted copies go to a temporary dir that is deleted afterwards.
  """
  tfds = import_tfds()
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top
  manual_dir = manual_dir or fashion_mnist_dir(data_dir)
  for fname, digest in idx.FASHION_MNIST_SHA256.items():
    idx.read_idx(os.path.join(manual_dir, fname), sha256=digest)
  stock = tfds.builder_cls('fashion_mnist')
  url_infos = {}
  for fname in idx.FASHION_MNIST_FILES.values():
    info = checksums.compute_url_info(os.path.join(manual_dir, fname))
    url = stock.URL + fname
    url_infos[url] = checksums.UrlInfo(size=info.size, checksum=info.checksum, filename=fname)
  with without_tfds_tmp_folders():
    builder = _local_fashion_mnist_cls(stock, url_infos)(data_dir=data_dir)
  with tempfile.TemporaryDirectory(prefix='mpl_fashion_mnist_') as tmp:
    builder.download_and_prepare(
        download_dir=tmp,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                     try_download_gcs=False))
  return str(builder.data_dir)


def _local_fashion_mnist_cls(stock: type, url_infos: dict[str, Any]) -> type:
  # `url_infos` is a class property of TFDS builders; a plain class attribute overrides it (and
  # skips the stock lookup, which needs `importlib_resources`, missing from TFDS 4.9.10's
  # dependencies: tensorflow/datasets#11212). Not registered: `fashion_mnist` stays the stock one.
  return type('FashionMnist', (stock,),
              {'name': 'fashion_mnist', 'url_infos': url_infos, '__module__': __name__},
              skip_registration=True)


# --------------------------------------------------------------------------------------------
# TFDS datasets the user prepares.


def import_tfds():
  """Imports tensorflow_datasets (and TensorFlow, kept off any GPU); `DataError` if missing."""
  if not tensorflow_available():
    raise DataMissingError('This input path needs TensorFlow and tensorflow-datasets, which are not '
                    f'installed: `{_TFDS_PIP}`. (fashion_mnist, digits and two_moons load '
                    f'without them: fashion_mnist with --config.data.source=idx.)')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')  # The accelerators belong to JAX.
  except RuntimeError:  # TF already initialised its devices; nothing to do.
    pass
  return tfds


def prepare_command(name: str, data_dir: str | None) -> str:
  """The command that prepares TFDS dataset `name` (on a machine with network access)."""
  dd = f', data_dir={data_dir!r}' if data_dir else ''
  return (f'python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{name}'{dd}).download_and_prepare()\"")


def not_prepared_message(name: str, builder) -> str:
  """How to provide TFDS dataset `name` that `builder` did not find."""
  where = str(builder.data_dir_root)
  return (f'TFDS dataset {name} is not prepared in {where} (looked for {builder.data_dir}). On '
          f'a machine with network access run\n  {prepare_command(name, None)}\n(tensorflow-'
          f'datasets 4.9.10 also needs `pip install importlib_resources` there: '
          f'tensorflow/datasets#11212), then copy that machine\'s ~/tensorflow_datasets/{name} '
          f'to {where}/{name} on this one, or pass --config.data.data_dir=<the directory that '
          f'holds {name}/>.')


@contextlib.contextmanager
def without_tfds_tmp_folders():
  """Runs TFDS code with `tempfile` pointed at a scratch folder, removed afterwards: a TFDS
  builder of a dataset that is not prepared (its DatasetInfo.initialize_from_bucket) makes an
  empty tmpXXXXtfds folder in /tmp and never removes it (one per stand-in run, thousands over a
  few test runs)."""
  with tempfile.TemporaryDirectory(prefix='mpl_tfds_') as scratch:
    saved, tempfile.tempdir = tempfile.tempdir, scratch
    try:
      yield
    finally:
      tempfile.tempdir = saved


def tfds_builder(name: str, data_dir: str | None):
  """tfds.builder(name, data_dir=data_dir), leaving nothing in /tmp."""
  tfds = import_tfds()
  with without_tfds_tmp_folders():
    return tfds.builder(name, data_dir=data_dir)


def is_prepared(builder) -> bool:
  """builder.is_prepared(), without TFDS's warning about the folder it did not find (our
  DataError says it, with the fix; a Fashion-MNIST build then makes it)."""
  with reporting.without_log_message('Variant folder'):
    return builder.is_prepared()


def _tfds_arrays(name: str, data_dir: str | None) -> tuple[dict[str, np.ndarray], int]:
  builder = tfds_builder(name, data_dir)
  if not is_prepared(builder):
    raise DataMissingError(not_prepared_message(name, builder))
  out = {}
  for split in ('train', 'test'):
    out[f'{split}_images'], out[f'{split}_labels'] = _tfds_split(builder, split)
  return out, int(builder.info.features['label'].num_classes)


def _tfds_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images, int32 labels) of a whole split, in stored order."""
  tfds = import_tfds()
  ds = builder.as_dataset(split=split, batch_size=-1, shuffle_files=False)
  data = tfds.as_numpy(ds)
  images = np.asarray(data['image'], dtype=np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  return images, np.asarray(data['label'], dtype=np.int32)
