"""A tiny TFDS image dataset built offline, for the streaming-input tests (single and multi-host).

Example i is a flat JPEG of value 10 * i (so a decoded image tells which example it is), of
height 20, 27 or 34 and width 30, label i % 3.
"""
import numpy as np

NUM_TINY = 25


def tiny_builder_class(with_labels: bool = True):
  """The builder class (TensorFlow Datasets is imported only when a test needs it).
  with_labels=False: images only, as an unlabeled dataset may be."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """JPEGs of different sizes; example i is a flat image of value 10 * i."""
    VERSION = tfds.core.Version('1.0.0')
    url_infos = None  # Nothing to download.

    def _info(self):
      features = {'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg')}
      if with_labels:
        features['label'] = tfds.features.ClassLabel(num_classes=3)
      return tfds.core.DatasetInfo(
          builder=self, supervised_keys=('image', 'label') if with_labels else None,
          features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(NUM_TINY)}

    def _generate_examples(self, n):
      for i in range(n):
        example = {'image': np.full((20 + 7 * (i % 3), 30, 3), 10 * i, np.uint8)}
        if with_labels:
          example['label'] = i % 3
        yield i, example

  return TinyImages


def example_ids(images: np.ndarray) -> list[int]:
  """Which example each decoded image is (JPEG of a flat image: its mean / 10)."""
  return [round(float(img.mean()) / 10) for img in images]
