"""The labeled / unlabeled split of a training set, and its record in the workdir.

`labeled_indices` draws a class-balanced labeled subset: `num_labeled // num_classes` examples
per class, and the remaining `num_labeled % num_classes` examples one each to classes chosen by
the seed (among classes that have an example to spare). Same seed -> same indices; a different
seed -> a different subset. `num_labeled` = -1 (or the size of the training set) means all.

`unlabeled_indices`: as in the official MPL code, by default every training image is also in the
unlabeled pool (`exclude_labeled=False`).

`save_split` / `load_split` keep the split in `workdir/labeled_split.json` (indices, dataset,
seed, num_labeled, per-class counts), so a run can be audited and a resumed run reuses exactly
the same split.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
from etils import epath

from mpl.errors import ConfigError

SPLIT_FILENAME = 'labeled_split.json'
# Keys of the metadata that must match between a saved split and the run that reuses it.
MATCH_KEYS = ('dataset', 'num_labeled', 'seed')


def labeled_indices(labels: np.ndarray, num_labeled: int, num_classes: int,
                    seed: int) -> np.ndarray:
  """Sorted int64 indices of a class-balanced labeled subset of `labels` (see module doc)."""
  labels = np.asarray(labels)
  n = len(labels)
  if num_labeled == -1 or num_labeled == n:
    return np.arange(n, dtype=np.int64)
  if num_labeled > n:
    raise ConfigError(f'num_labeled={num_labeled} exceeds the {n} training examples; use at '
                      f'most {n} (or -1 for all).')
  if num_labeled < num_classes:
    raise ConfigError(f'num_labeled={num_labeled} is less than num_classes={num_classes}: a '
                      f'class-balanced split needs at least one label per class (or -1 for '
                      f'all).')
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(f'labels range over [{labels.min()}, {labels.max()}] but '
                      f'num_classes={num_classes}; pass the dataset\'s num_classes.')
  sizes = np.bincount(labels, minlength=num_classes)
  per_class, remainder = divmod(num_labeled, num_classes)
  if (short := np.flatnonzero(sizes < per_class)).size:
    c = int(short[0])
    raise ConfigError(
        f'num_labeled={num_labeled} asks for {per_class} labels per class, but class {c} has '
        f'only {sizes[c]} training examples (smallest class: {sizes.min()}); use num_labeled <= '
        f'{sizes.min() * num_classes} (or -1 for all).')
  rng = np.random.default_rng(seed)
  counts = np.full(num_classes, per_class, dtype=np.int64)
  if remainder:
    spare = np.flatnonzero(sizes > per_class)
    if len(spare) < remainder:
      raise ConfigError(f'num_labeled={num_labeled}: only {len(spare)} classes have more than '
                        f'{per_class} examples to take the remaining {remainder} labels; use '
                        f'num_labeled={per_class * num_classes + len(spare)} or less.')
    counts[rng.choice(spare, size=remainder, replace=False)] += 1
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:counts[c]]
            for c in range(num_classes)]
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def unlabeled_indices(num_train: int, labeled: np.ndarray,
                      exclude_labeled: bool = False) -> np.ndarray:
  """Indices of the unlabeled pool: all of 0..num_train-1, or those not in `labeled`."""
  all_idx = np.arange(num_train, dtype=np.int64)
  if not exclude_labeled:
    return all_idx
  return np.setdiff1d(all_idx, np.asarray(labeled, dtype=np.int64)).astype(np.int64)


def per_class_counts(labels: np.ndarray, idx: np.ndarray,
                     num_classes: int | None = None) -> list[int]:
  """How many of `idx` fall in each class."""
  sub = np.asarray(labels)[np.asarray(idx, dtype=np.int64)]
  return [int(c) for c in np.bincount(sub, minlength=num_classes or 0)]


def save_split(workdir: str, labeled_idx: np.ndarray, meta: dict[str, Any], *,
               labels: np.ndarray | None = None) -> None:
  """Writes `workdir/labeled_split.json`: `meta` (dataset, num_labeled, seed, ...) + indices.

  Pass `labels` (the training labels) to record the per-class counts too. If the file exists
  already, it must be for the same dataset/num_labeled/seed and the same indices (then nothing
  is written), else `ConfigError`: a workdir keeps one split. Call it from one process only.
  """
  missing = [k for k in MATCH_KEYS if k not in meta]
  if missing:
    raise ConfigError(f'save_split: meta lacks {missing}; it needs {list(MATCH_KEYS)}.')
  idx = np.asarray(labeled_idx, dtype=np.int64)
  record = {k: _jsonable(v) for k, v in meta.items()}
  if labels is not None:
    record['per_class_counts'] = per_class_counts(labels, idx)
  record['num_indices'] = int(len(idx))
  record['indices'] = [int(i) for i in idx]
  existing = load_split(workdir, expected=meta)
  if existing is not None:
    if not np.array_equal(existing[0], idx):
      raise ConfigError(f'{_path(workdir)} already holds a different split for the same '
                        f'{MATCH_KEYS}; use a new --workdir (or delete the old one).')
    return
  path = _path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(json.dumps(record, indent=1))
  tmp.rename(path)


def load_split(workdir: str, expected: dict[str, Any] | None = None
               ) -> tuple[np.ndarray, dict[str, Any]] | None:
  """(indices, meta) from `workdir/labeled_split.json`, or None if there is none.

  With `expected`, its dataset/num_labeled/seed must match the saved ones, else `ConfigError`.
  """
  path = _path(workdir)
  if not path.exists():
    return None
  try:
    text = path.read_text()
  except FileNotFoundError:  # removed since (another host replaces it: see train.load_data)
    return None
  try:
    record = json.loads(text)
    idx = np.asarray(record.pop('indices'), dtype=np.int64)
  except (ValueError, KeyError) as e:
    raise ConfigError(f'{path} is not a valid split file ({e}); delete it or use a new '
                      f'--workdir.') from e
  if expected is not None:
    for key in MATCH_KEYS:
      if key in expected and record.get(key) != _jsonable(expected[key]):
        raise ConfigError(
            f'{path} was made for {key}={record.get(key)!r}, this run asks for '
            f'{key}={expected[key]!r}. Use a new --workdir (or delete the old one).')
  return idx, record


def check_fits(idx: np.ndarray, record: dict[str, Any], labels: np.ndarray, path: str) -> None:
  """A saved split must still describe this training set: its indices in range and distinct,
  and, where the file recorded them, the same per-class counts (another copy or version of the
  data, or stand-in images where the real ones now are, would reuse indices silently: a device
  gather clamps indices out of range)."""
  def stale(why):
    return ConfigError(f'{path} does not fit this training set ({len(labels)} examples): {why}. '
                       f'The data changed since the split was made (another data_dir or '
                       f'version, or stand-in data then); use a new --workdir.')
  if len(idx) and (idx.min() < 0 or idx.max() >= len(labels)):
    raise stale(f'indices range over {idx.min()}..{idx.max()}')
  if len(np.unique(idx)) != len(idx):
    raise stale(f'{len(idx) - len(np.unique(idx))} indices are repeated')
  recorded = record.get('per_class_counts')
  if recorded is not None:
    now = per_class_counts(labels, idx, len(recorded))
    if now != list(recorded):
      raise stale(f'its labeled examples per class were {list(recorded)}, in this data {now}')


def _path(workdir: str) -> epath.Path:
  return epath.Path(workdir) / SPLIT_FILENAME


def _jsonable(v: Any) -> Any:
  if isinstance(v, np.generic):
    return v.item()
  if isinstance(v, (np.ndarray, tuple)):
    return [_jsonable(x) for x in v]
  return v
