"""Input pipeline: datasets (TFDS, image folders, the built-in demo set), transforms, iterators."""

from vgg_jax.data.config import default_data_config
from vgg_jax.data.pipeline import (
    BadImageError,
    EvalIterable,
    TrainIterator,
    class_names,
    create_eval_iterator,
    create_train_iterator,
    num_classes,
    num_examples,
)
from vgg_jax.data.sources import DatasetError, default_cache_dir
from vgg_jax.data.transforms import (
    TransformConfig,
    decode_rgb,
    eval_center_view,
    eval_full_view,
    multicrop_views,
    train_view,
)

__all__ = [
    "BadImageError",
    "DatasetError",
    "EvalIterable",
    "TrainIterator",
    "TransformConfig",
    "class_names",
    "create_eval_iterator",
    "create_train_iterator",
    "decode_rgb",
    "default_cache_dir",
    "default_data_config",
    "eval_center_view",
    "eval_full_view",
    "multicrop_views",
    "num_classes",
    "num_examples",
    "train_view",
]
