"""streamseg: stream image/mask pairs larger than memory into Keras segmentation training.

Convert once (:func:`convert`), then stream forever (:class:`SegmentationDataset`).
Importing ``streamseg`` does not import TensorFlow; the dataset classes load Keras on
first use.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    CorruptChunkError,
    CorruptStoreError,
    DestinationError,
    IncompleteStoreError,
    InputError,
    LabelError,
    OptionError,
    SourceMismatchError,
    StoreExistsError,
    RemoteStoreError,
    StoreNotFoundError,
    StreamsegError,
    UnreadableFileError,
    WorkerDiedError,
    WorkerError,
)
from .store import Store, open_store

__version__ = "0.1.0"

__all__ = [
    "Augment",
    "CorruptChunkError",
    "CorruptStoreError",
    "DestinationError",
    "IncompleteStoreError",
    "InputError",
    "LabelError",
    "OptionError",
    "PatchDataset",
    "SegmentationDataset",
    "SourceMismatchError",
    "Store",
    "StoreExistsError",
    "RemoteStoreError",
    "RemoteStore",
    "StoreNotFoundError",
    "StreamsegError",
    "UnreadableFileError",
    "Volume",
    "VolumeStore",
    "WorkerDiedError",
    "WorkerError",
    "convert",
    "open_store",
    "predict_volume",
    "distribute_dataset",
    "read_volume",
    "split",
    "synth_sample",
    "__version__",
]

_LAZY = {
    "RemoteStore": ("store.remote", "RemoteStore"),
    "Augment": ("pipeline.augment", "Augment"),
    "SegmentationDataset": ("pipeline.dataset", "SegmentationDataset"),
    "PatchDataset": ("pipeline.patches", "PatchDataset"),
    "predict_volume": ("pipeline.predict", "predict_volume"),
    "distribute_dataset": ("pipeline.distribute", "distribute_dataset"),
    "VolumeStore": ("store.volume_reader", "VolumeStore"),
    "split": ("pipeline.split", "split"),
    "convert": ("store.converter", "convert"),
    "synth_sample": ("io.synth", "synth_sample"),
    "read_volume": ("io.volumes", "read_volume"),
    "Volume": ("io.volumes", "Volume"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'streamseg' has no attribute {name!r}")
