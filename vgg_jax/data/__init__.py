"""Input pipeline: datasets (TFDS, image folders, the built-in demo set), transforms, iterators.

docs/data.md. ``vgg_jax.data.config`` (the data config) imports no TensorFlow; the rest loads it
on first use (``data.create_train_iterator`` etc. resolve lazily).
"""

import importlib
from typing import Any

from vgg_jax.data.config import VIEWS, TransformConfig, default_data_config

_LAZY = {
    "BadImageError": "pipeline",
    "EvalIterable": "pipeline",
    "TrainIterator": "pipeline",
    "class_names": "pipeline",
    "create_eval_iterator": "pipeline",
    "create_train_iterator": "pipeline",
    "num_classes": "pipeline",
    "num_examples": "pipeline",
    "DatasetError": "sources",
    "default_cache_dir": "sources",
    "decode_rgb": "transforms",
    "eval_center_view": "transforms",
    "eval_full_view": "transforms",
    "multicrop_views": "transforms",
    "train_view": "transforms",
}

__all__ = ["VIEWS", "TransformConfig", "default_data_config", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"vgg_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'vgg_jax.data' has no attribute {name!r}")
