"""``python -m vgg_jax.data.stats``: mean RGB and RGB PCA of a training split, as the paper did.

Writes a JSON that ``data.stats_path`` points to (``TransformConfig.from_config`` reads it)::

    python -m vgg_jax.data.stats --dataset=imagenet2012 --data_dir=... --num_images=10000 --out=stats.json

Every pixel of the sampled images counts once (images at their stored size). ``mean_rgb`` is on
the 0..255 scale; ``pca_eigval`` are the eigen-values of the RGB covariance on the 0..1 scale,
descending, and ``pca_eigvec`` has the matching unit eigen-vectors as columns (rows R, G, B),
each signed so that its largest-magnitude entry is positive (the colour shift's alpha is
symmetric, so the sign does not matter). Sums are float64.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from vgg_jax.data import transforms


def pixel_moments(encoded: tf.Tensor) -> dict[str, tf.Tensor]:
    """Pixel count, sum [3] and sum of outer products [3, 3] (float64, 0..255) of one image."""
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
        raise ValueError("no decodable images in the sample; check the dataset and split.")
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


def compute_stats(data_cfg: Any, split: str, num_images: int, seed: int = 0) -> dict[str, Any]:
    """Stats of ``num_images`` images of ``split``, read in a seeded random order of files
    (TFDS stores each split's examples in a hashed, i.e. random, order)."""
    import tensorflow_datasets as tfds

    from vgg_jax.data import sources

    source = sources.get_source(data_cfg)
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
    return dict(dataset=data_cfg.dataset, split=split, **stats)


def main(argv: Sequence[str] | None = None) -> None:
    from vgg_jax.data.config import default_data_config

    parser = argparse.ArgumentParser(prog="python -m vgg_jax.data.stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="as data.dataset: imagenet2012, folder, a TFDS name, ...")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
    parser.add_argument("--manual_dir", default=None, help="imagenet2012: folder with the ILSVRC2012 tars")
    parser.add_argument("--folder", default=None, help="'folder' dataset: root with train/<class>/*")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=10000, help="images sampled from the split")
    parser.add_argument("--seed", type=int, default=0, help="file order of the sample")
    parser.add_argument("--out", required=True, help="JSON path for data.stats_path")
    args = parser.parse_args(argv)
    if args.num_images <= 0:
        parser.error(f"--num_images must be positive, got {args.num_images}")
    data_cfg = default_data_config()
    data_cfg.dataset, data_cfg.data_dir = args.dataset, args.data_dir
    data_cfg.manual_dir, data_cfg.folder = args.manual_dir, args.folder
    stats = compute_stats(data_cfg, args.split, args.num_images, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(stats, f, indent=2)
    print(json.dumps(stats, indent=2))
    print(f"wrote {args.out}; use it with --config.data.stats_path={args.out}")


if __name__ == "__main__":
    main()
