"""Data: in-memory datasets (`datasets`), labeled splits (`split`), streaming input (`streaming`).

Nothing here imports TensorFlow at import time; only the TFDS code paths do, when called.
"""
from mpl.data.datasets import DATASETS
from mpl.data.datasets import InMemoryDataset
from mpl.data.datasets import load_dataset
from mpl.data.datasets import STREAMING_DATASETS
