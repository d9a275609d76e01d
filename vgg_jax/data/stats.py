"""``python -m vgg_jax.data.stats --data.dataset=... --out=stats.json``: mean RGB and RGB PCA of a training split.

docs/data.md#dataset-statistics
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import flags
from ml_collections import config_flags

from vgg_jax import cli, storage
from vgg_jax.data.config import default_data_config
from vgg_jax.errors import UserError

if TYPE_CHECKING:
    import tensorflow as tf


def pixel_moments(encoded: tf.Tensor) -> dict[str, tf.Tensor]:
    """Pixel count, sum [3] and sum of outer products [3, 3] (float64, 0..255) of one image."""
    import tensorflow as tf  # noqa: PLC0415  (TensorFlow loads when used: the CLI imports it quietly first)

    from vgg_jax.data import transforms  # noqa: PLC0415

    pixels = tf.reshape(tf.cast(transforms.decode_rgb(encoded), tf.float64), [-1, 3])
    return dict(
        count=tf.shape(pixels, out_type=tf.int64)[0],
        sum=tf.reduce_sum(pixels, 0),
        outer=tf.matmul(pixels, pixels, transpose_a=True),
    )


def stats_from_moments(moments: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Mean RGB (0..255) and the covariance's PCA (0..1 scale) from per-image moments."""
    count, total, outer, images = 0, np.zeros(3), np.zeros((3, 3)), 0
    for m in moments:
        count += int(m["count"])
        total += np.asarray(m["sum"], np.float64)
        outer += np.asarray(m["outer"], np.float64)
        images += 1
    if count == 0:
        raise UserError("no decodable images in the sample; check the dataset and split.")
    mean = total / count
    cov = outer / count - np.outer(mean, mean)
    eigval, eigvec = np.linalg.eigh(cov / 255.0**2)
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = np.maximum(eigval[order], 0.0), eigvec[:, order]
    eigvec *= np.sign(eigvec[np.abs(eigvec).argmax(0), range(3)])
    return dict(
        mean_rgb=mean.tolist(),
        pca_eigval=eigval.tolist(),
        pca_eigvec=eigvec.tolist(),
        std_rgb=np.sqrt(np.diag(cov)).tolist(),  # for reference; the paper does not divide by it
        num_images=images,
        num_pixels=count,
    )


def compute_stats(data_config: Any, split: str, num_images: int, seed: int = 0) -> dict[str, Any]:
    """Stats of ``num_images`` images of ``split``, read in a seeded random order of files
    (TFDS stores each split's examples in a hashed, i.e. random, order)."""
    import tensorflow as tf  # noqa: PLC0415
    import tensorflow_datasets as tfds  # noqa: PLC0415

    from vgg_jax.data import sources  # noqa: PLC0415

    source = sources.get_source(data_config)
    sources.check_split(source, split)
    ds = source.builder.as_dataset(
        split,
        shuffle_files=True,
        decoders={source.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
    ds = ds.take(num_images).map(lambda ex: pixel_moments(ex[source.image_key]), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)  # corrupt images are skipped (and logged), not fatal
    stats = stats_from_moments(ds.as_numpy_iterator())
    return dict(dataset=data_config.dataset, split=split, **stats)


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_dict(
        "data",
        default_data_config(),
        "Which dataset: --data.dataset, --data.data_dir, --data.manual_dir, --data.folder (as in training).",
        flag_values=values,
        sys_argv=argv,
    )
    flags.DEFINE_string("split", "train", "The split to sample.", flag_values=values)
    flags.DEFINE_integer("num_images", 10000, "Images sampled from the split.", lower_bound=1, flag_values=values)
    flags.DEFINE_integer("seed", 0, "File order of the sample.", flag_values=values)
    flags.DEFINE_string("out", None, "JSON path for --config.data.stats_path.", required=True, flag_values=values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    values, rest = cli.parse(argv, define_flags, "python -m vgg_jax.data.stats", __doc__)
    if rest:
        cli.fail(f"unexpected arguments {rest}: pick the dataset with --data.dataset=... and its location fields.")
    stats = compute_stats(values.data, values.split, values.num_images, values.seed)
    out = storage.path(values.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))
    print(f"wrote {values.out}; use it with --config.data.stats_path={values.out}")
    return stats


if __name__ == "__main__":
    cli.run(main, tensorflow=True)
