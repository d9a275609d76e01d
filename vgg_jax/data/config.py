"""The data config: every field the input pipeline reads, with its meaning.

``configs/default.py`` embeds ``default_data_config()`` as ``config.data``; experiments override
fields, e.g. ``--config.data.scale_min=384 --config.data.scale_max=384``.
"""

from __future__ import annotations

import ml_collections

from vgg_jax.data.transforms import IMAGENET_MEAN_RGB, IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC


def default_data_config() -> ml_collections.ConfigDict:
    """Every data field with its default. Sequences are tuples so the command line can override them
    (``--config.data.mean_rgb='(120., 115., 100.)'``)."""
    c = ml_collections.ConfigDict()
    # Which dataset: 'vgg_jax_demo' (built in, generated locally on first use), 'imagenet2012'
    # (TFDS builder fed from manual_dir), 'folder' (your images, see `folder`) or any TFDS
    # image-classification dataset name (e.g. 'imagenette/320px-v2').
    c.dataset = "vgg_jax_demo"
    # TFDS data_dir holding prepared datasets. None: TFDS's default (~/tensorflow_datasets) for TFDS
    # datasets; ~/.cache/vgg_jax/tfds for 'vgg_jax_demo' and 'folder'.
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    # imagenet2012 only: folder holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; the
    # first run prepares TFRecords from them into data_dir.
    c.manual_dir = ml_collections.FieldReference(None, field_type=str)
    # 'folder' only: root laid out as <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg
    # ('val' is read as the 'validation' split); prepared once into TFRecords under data_dir.
    c.folder = ml_collections.FieldReference(None, field_type=str)
    # Other TFDS datasets: download and prepare on first use (else an error says what to run).
    c.download = False
    # Split names, TFDS syntax (slices allowed, e.g. 'train[:95%]').
    c.train_split = "train"
    c.eval_split = "validation"

    # Training view (paper Sect. 3.1): shorter side rescaled to S, one crop_size x crop_size crop.
    c.crop_size = 224
    # S is fixed when scale_min == scale_max (256 or 384 in the paper), else drawn uniformly per
    # image from the integers in [scale_min, scale_max] (scale jittering, the paper's [256, 512]).
    c.scale_min = 256
    c.scale_max = 512
    # Random horizontal flip with probability 1/2.
    c.flip = True
    # AlexNet PCA colour shift: alpha ~ N(0, pca_alpha_std) per component (0 turns it off);
    # eigen-values on the 0..1 RGB scale, eigen-vectors as columns (rows R, G, B); ImageNet's.
    c.pca_alpha_std = 0.1
    c.pca_eigval = tuple(IMAGENET_PCA_EIGVAL)
    c.pca_eigvec = tuple(tuple(row) for row in IMAGENET_PCA_EIGVEC)
    # Normalisation on the 0..255 scale: (x - mean_rgb) / std_rgb. The paper only subtracts the
    # training-set mean (std 1); ImageNet's mean RGB by default.
    c.mean_rgb = tuple(IMAGENET_MEAN_RGB)
    c.std_rgb = (1.0, 1.0, 1.0)
    # JSON written by `python -m vgg_jax.data.stats`; when set, its mean_rgb / pca_eigval /
    # pca_eigvec replace the three fields above.
    c.stats_path = ml_collections.FieldReference(None, field_type=str)

    # Evaluation (paper Sect. 3.2): the test scales Q (shorter side), one pass per scale and view.
    c.eval_scales = (256,)
    # Dense view: images (shorter side Q) are padded to a canvas of long side ceil32(ratio * Q),
    # the smallest ratio here that holds them, one canvas per ratio and orientation; longer
    # images are centre-cropped to the largest ratio. Few ratios: few XLA shapes.
    c.dense_aspect_buckets = (1.34, 1.5, 2.0)
    # Keep the processed eval examples in host memory after the first pass (small eval sets that
    # are evaluated often); costs examples x view size of RAM.
    c.cache_eval = False

    # Shuffling (per process): each epoch reads the process's examples in a random order of
    # shuffle_chunk-example chunks and shuffles them fully within windows of shuffle_buffer
    # examples (a multiple of shuffle_chunk). Encoded bytes are buffered: about 2 x
    # shuffle_buffer x 110 kB of RAM on ImageNet.
    c.shuffle_buffer = 8192
    c.shuffle_chunk = 128
    # Images that cannot be decoded (corrupt, truncated): 'skip' drops them and warns with their
    # key and a running count; 'fail' raises naming the image.
    c.on_bad_image = "skip"
    # Parallel decode / augmentation calls per process (None: tf.data AUTOTUNE).
    c.num_parallel_calls = ml_collections.FieldReference(None, field_type=int)
    return c
