"""A plain-numpy reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or not.

IDX layout (http://yann.lecun.com/exdb/mnist/): a 4-byte magic number -- two zero bytes, a type
code (0x08 = unsigned byte) and the number of dimensions -- then one big-endian uint32 per
dimension, then the data, row-major. Every header field and the exact data size are checked, so a
truncated, corrupted or wrong file raises `DataError` instead of yielding garbage.

No TensorFlow: GPU machines without it read Fashion-MNIST through this module.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib

import numpy as np

from mpl.errors import DataError

_GZIP_MAGIC = b'\x1f\x8b'
_UBYTE = 0x08

FASHION_MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}

# sha256 of the *decompressed* official Fashion-MNIST files (zalandoresearch/fashion-mnist). The
# .gz bytes differ between distributors (Debian re-gzipped them), the contents do not, so the
# check is done on the contents and accepts the original .gz files and Debian's alike.
FASHION_MNIST_SHA256 = {
    'train-images-idx3-ubyte.gz':
        'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
    'train-labels-idx1-ubyte.gz':
        'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    't10k-images-idx3-ubyte.gz':
        '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
    't10k-labels-idx1-ubyte.gz':
        '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
}

_REINSTALL = ('Reinstall the files (`apt-get install --reinstall -y dataset-fashion-mnist`) or '
              'point MPL_FASHION_MNIST_DIR at a good copy.')


def read_bytes(path: str | os.PathLike) -> bytes:
  """The (decompressed, when gzipped) bytes of `path`; `DataError` if unreadable or corrupt."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f'Cannot read IDX file {path}: {e}. {_REINSTALL}') from e
  if raw[:2] != _GZIP_MAGIC:
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise DataError(f'{path} is not a valid gzip file ({e}): the file is truncated or '
                    f'corrupted. {_REINSTALL}') from e


def parse_idx(data: bytes, *, name: str = '<bytes>',
              ndim: int | None = None) -> np.ndarray:
  """Parses IDX bytes into a uint8 array; checks magic, dimensions and exact size."""
  if len(data) < 4:
    raise DataError(f'{name}: {len(data)} bytes is too short for an IDX header. {_REINSTALL}')
  zero0, zero1, dtype_code, file_ndim = data[0], data[1], data[2], data[3]
  if zero0 != 0 or zero1 != 0:
    raise DataError(f'{name}: bad IDX magic number {data[:4].hex()} (expected 0x0000TTNN): not '
                    f'an IDX file, or corrupted. {_REINSTALL}')
  if dtype_code != _UBYTE:
    raise DataError(f'{name}: IDX type code 0x{dtype_code:02x} is not supported (only 0x08, '
                    f'unsigned byte, as in (Fashion-)MNIST). {_REINSTALL}')
  if file_ndim == 0 or (ndim is not None and file_ndim != ndim):
    raise DataError(f'{name}: IDX file has {file_ndim} dimensions, expected '
                    f'{ndim if ndim is not None else "at least 1"} (magic '
                    f'{data[:4].hex()}). {_REINSTALL}')
  header = 4 + 4 * file_ndim
  if len(data) < header:
    raise DataError(f'{name}: truncated IDX header. {_REINSTALL}')
  shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=file_ndim, offset=4))
  expected = int(np.prod(shape, dtype=np.int64))
  if len(data) - header != expected:
    raise DataError(f'{name}: IDX header says shape {shape} ({expected} bytes of data) but the '
                    f'file holds {len(data) - header}: truncated or corrupted. {_REINSTALL}')
  return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike, *, ndim: int | None = None,
             sha256: str | None = None) -> np.ndarray:
  """Reads an IDX file (gzipped or not) into a writable uint8 array.

  Args:
    path: the file.
    ndim: expected number of dimensions (3 for images, 1 for labels); checked when given.
    sha256: expected sha256 of the decompressed bytes; checked when given.
  """
  data = read_bytes(path)
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise DataError(f'{path}: the decompressed contents do not match the official file '
                    f'(sha256 {hashlib.sha256(data).hexdigest()}, expected {sha256}). '
                    f'{_REINSTALL}')
  return parse_idx(data, name=str(path), ndim=ndim).copy()


def read_fashion_mnist(directory: str | os.PathLike, *, verify: bool = True
                       ) -> dict[str, np.ndarray]:
  """The four Fashion-MNIST arrays from `directory`, in file order.

  Returns {'train_images': uint8 (60000, 28, 28, 1), 'train_labels': int32 (60000,),
  'test_images': uint8 (10000, 28, 28, 1), 'test_labels': int32 (10000,)}. With `verify`, the
  decompressed bytes must match the official files' sha256.
  """
  out = {}
  for key, fname in FASHION_MNIST_FILES.items():
    is_images = key.endswith('images')
    arr = read_idx(os.path.join(directory, fname), ndim=3 if is_images else 1,
                   sha256=FASHION_MNIST_SHA256[fname] if verify else None)
    out[key] = arr[..., None] if is_images else arr.astype(np.int32)
  for split in ('train', 'test'):
    images, labels = out[f'{split}_images'], out[f'{split}_labels']
    if images.shape[1:] != (28, 28, 1):
      raise DataError(f'{directory}: {split} images have shape {images.shape[1:3]}, expected '
                      f'28x28. {_REINSTALL}')
    if len(images) != len(labels):
      raise DataError(f'{directory}: {len(images)} {split} images but {len(labels)} labels. '
                      f'{_REINSTALL}')
    if labels.size and (labels.min() < 0 or labels.max() > 9):
      raise DataError(f'{directory}: {split} labels outside 0..9. {_REINSTALL}')
  return out
