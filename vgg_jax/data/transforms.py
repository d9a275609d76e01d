"""Per-image transforms of the paper (Sect. 3.1 training view, Sect. 3.2 test views) as pure TF functions.

docs/data.md#transforms
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from vgg_jax.data.config import TransformConfig

# libjpeg's accurate integer IDCT, as Pillow decodes (TF's default differs; docs/performance.md).
DCT_METHOD = "INTEGER_ACCURATE"


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """Any JPEG (RGB, grayscale, CMYK), PNG, GIF or BMP bytes -> uint8 RGB [h, w, 3], by content."""
    image = tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method=DCT_METHOD),
        lambda: _decode_other(encoded),
    )
    image.set_shape([None, None, 3])
    return image


def _decode_other(encoded: tf.Tensor) -> tf.Tensor:
    """PNG (any bit depth, alpha dropped), GIF (first frame), BMP -> uint8 RGB."""
    return tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)


def shorter_side_size(hw: tf.Tensor, size: tf.Tensor | int, resize: str = "round") -> tf.Tensor:
    """int32 [2]: the (height, width) an isotropic rescale to shorter side ``size`` gives.

    ``resize='round'`` rounds the long side; ``'torchvision'`` truncates it as torchvision's Resize
    does (``int(size * long / short)``, here in exact integer arithmetic).
    """
    size = tf.cast(size, tf.int32)
    if resize == "torchvision":
        return size * hw // tf.reduce_min(hw)
    hw_f = tf.cast(hw, tf.float32)
    out = tf.cast(tf.round(hw_f * (tf.cast(size, tf.float32) / tf.reduce_min(hw_f))), tf.int32)
    return tf.maximum(out, size)  # the shorter side is exactly `size` despite float rounding


def center_offset(size: tf.Tensor, crop: int, resize: str = "round") -> tf.Tensor:
    """int32: top-left of a centred ``crop`` in sides of ``size`` (torchvision's CenterCrop rounds,
    half to even as Python's ``round``; otherwise the floor)."""
    if resize == "torchvision":
        return tf.cast(tf.round(tf.cast(size - crop, tf.float64) / 2.0), tf.int32)
    return (size - crop) // 2


def pca_offset(alpha: tf.Tensor, config: TransformConfig) -> tf.Tensor:
    """AlexNet lighting on 0..255 pixels: offset_i = 255 * sum_j eigvec[i][j] * alpha_j * eigval_j."""
    eigvec = tf.constant(config.pca_eigvec, tf.float32)
    eigval = tf.constant(config.pca_eigval, tf.float32) * 255.0
    return tf.linalg.matvec(eigvec, alpha * eigval)


def normalize(image: tf.Tensor, config: TransformConfig, offset: tf.Tensor | None = None) -> tf.Tensor:
    """float32 ``(image + offset - mean_rgb) / std_rgb`` (offset: the PCA colour shift, or none)."""
    shift = -tf.constant(config.mean_rgb, tf.float32)
    if offset is not None:
        shift += offset
    image = tf.cast(image, tf.float32)
    # Adds whole [w * 3] rows: broadcasting a [3] vector is slow on CPU (inner dimension 3).
    shape = tf.shape(image)
    rows = tf.reshape(image, [-1, shape[-2] * 3]) + tf.tile(shift, shape[-2:-1])
    if config.std_rgb != (1.0, 1.0, 1.0):  # the paper only subtracts the mean
        rows *= tf.tile(tf.constant([1.0 / s for s in config.std_rgb], tf.float32), shape[-2:-1])
    return tf.reshape(rows, shape)


def sample_train_params(seed: tf.Tensor, hw: tf.Tensor, config: TransformConfig) -> dict[str, tf.Tensor]:
    """The random choices of one training view of an image of size ``hw``, fixed by ``seed``.

    scale: S, uniform over the integers in [scale_min, scale_max]; size: the rescaled (h, w);
    offset: the crop's top-left corner in the rescaled image, uniform over all valid positions;
    flip: horizontal flip with probability 1/2 (if config.flip); alpha: PCA weights ~ N(0, alpha_std).
    """
    # One uniform draw for S, the two offsets and the flip (few ops: this runs per image).
    u = tf.random.stateless_uniform([4], seed)
    scale = config.scale_min + tf.cast(u[0] * (config.scale_max - config.scale_min + 1), tf.int32)
    size = shorter_side_size(hw, scale, config.resize)
    offset = tf.cast(u[1:3] * tf.cast(size - config.crop_size + 1, tf.float32), tf.int32)
    flip = tf.logical_and(config.flip, u[3] < 0.5)
    alpha_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    alpha = tf.random.stateless_normal([3], alpha_seed) * config.pca_alpha_std
    return dict(scale=scale, size=size, offset=offset, flip=flip, alpha=alpha)


def train_view(encoded: tf.Tensor, seed: tf.Tensor, config: TransformConfig) -> tf.Tensor:
    """Paper training view: float32 [crop, crop, 3], normalised, PCA-shifted, maybe flipped."""
    source = _probe(encoded)
    params = sample_train_params(seed, source.hw, config)
    crop = tf.constant([config.crop_size] * 2, tf.int32)
    image = _resized_crop(source, params["size"], params["offset"], crop, params["flip"])
    image = normalize(image, config, pca_offset(params["alpha"], config))
    image.set_shape([config.crop_size, config.crop_size, 3])
    return image


def eval_center_view(encoded: tf.Tensor, scale: int, config: TransformConfig) -> tf.Tensor:
    """Centre crop_size crop of the image rescaled to shorter side ``scale``: float32 [crop, crop, 3]."""
    check_scale(scale, config)
    source = _probe(encoded)
    size = shorter_side_size(source.hw, scale, config.resize)
    crop = tf.constant([config.crop_size] * 2, tf.int32)
    offset = center_offset(size, config.crop_size, config.resize)
    image = _resized_crop(source, size, offset, crop, tf.constant(False))
    image = normalize(image, config)
    image.set_shape([config.crop_size, config.crop_size, 3])
    return image


def eval_full_view(encoded: tf.Tensor, scale: int, config: TransformConfig) -> tf.Tensor:
    """The whole image rescaled to shorter side ``scale`` (dense protocol): float32 [h, w, 3]."""
    return normalize(_full_resized(encoded, scale, config.resize), config)


def multicrop_views(encoded: tf.Tensor, scale: int, config: TransformConfig, grid: int = 5) -> tf.Tensor:
    """The paper's multi-crop views: float32 [2 * grid * grid, crop, crop, 3].

    Crops of the image at shorter side ``scale`` on a regular grid whose first and last crops touch
    the borders: top-left corners ``(k * (h - crop)) // (grid - 1)`` for k = 0..grid-1 (rows and
    columns alike). Views 0..grid*grid-1 are row-major (row k // grid, column k % grid); the next
    grid*grid are the same crops flipped horizontally, in the same order.
    """
    check_scale(scale, config)
    if grid < 2:
        raise ValueError(f"multicrop grid must be >= 2 (the paper uses 5), got {grid}.")
    image = normalize(_full_resized(encoded, scale, config.resize), config)
    c = config.crop_size
    hw = tf.shape(image)[:2]
    k = tf.range(grid)
    corners = (k[None, :] * (hw[:, None] - c)) // (grid - 1)  # [2, grid]
    idx = corners[:, :, None] + tf.range(c)[None, None, :]  # [2, grid, crop]
    rows = tf.gather(image, idx[0], axis=0)  # [grid, crop, w, 3]
    crops = tf.gather(rows, idx[1], axis=2)  # [grid, crop, grid, crop, 3]
    crops = tf.reshape(tf.transpose(crops, [0, 2, 1, 3, 4]), [grid * grid, c, c, 3])
    return tf.concat([crops, tf.reverse(crops, [2])], axis=0)


def check_scale(scale: int, config: TransformConfig) -> None:
    """A clear error for a test scale Q below the crop size."""
    if scale < config.crop_size:
        raise ValueError(
            f"test scale Q={scale} is smaller than crop_size={config.crop_size}; crops need Q >= crop_size "
            "(the paper's Q are 224..512 for 224 crops)."
        )


def _full_resized(encoded: tf.Tensor, scale: int, resize: str) -> tf.Tensor:
    """float32 [h, w, 3]: the whole image at shorter side ``scale`` (bilinear, half-pixel centres)."""
    image = decode_rgb(encoded)
    return tf.image.resize(image, shorter_side_size(tf.shape(image)[:2], scale, resize), "bilinear")


class _EncodedImage(NamedTuple):
    encoded: tf.Tensor  # the bytes
    is_jpeg: tf.Tensor  # bool
    full: tf.Tensor  # uint8 [h, w, 3] decoded image if not a JPEG, else empty
    hw: tf.Tensor  # int32 [2] (height, width)


def _probe(encoded: tf.Tensor) -> _EncodedImage:
    """The image size: from the header for a JPEG (no decode), else by decoding it whole."""
    is_jpeg = tf.io.is_jpeg(encoded)
    full, hw = tf.cond(
        is_jpeg,
        lambda: (tf.zeros([0, 0, 3], tf.uint8), tf.image.extract_jpeg_shape(encoded)[:2]),
        lambda: _decode_with_size(encoded),
    )
    return _EncodedImage(encoded, is_jpeg, full, hw)


def _decode_with_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    image = _decode_other(encoded)
    return image, tf.shape(image)[:2]


def _resized_crop(
    source: _EncodedImage, size: tf.Tensor, offset: tf.Tensor, crop: tf.Tensor, flip: tf.Tensor
) -> tf.Tensor:
    """float32 [crop_h, crop_w, 3]: the ``crop`` pixels at ``offset`` of the image resized to
    ``size`` (mirrored if ``flip``), decoding a JPEG on just the source window it needs."""
    # Small conds only: one tf.cond around probing, sampling and decoding is slower (docs/performance.md).
    start, extent, pad, box = _window_and_box(source.hw, size, offset, crop, flip)
    window = tf.cond(
        source.is_jpeg,
        lambda: tf.image.decode_and_crop_jpeg(
            source.encoded, tf.concat([start, extent], 0), channels=3, dct_method=DCT_METHOD
        ),
        lambda: tf.slice(source.full, tf.concat([start, [0]], 0), tf.concat([extent, [3]], 0)),
    )
    window = tf.cast(window, tf.float32)
    window = tf.cond(pad, lambda: _edge_pad(window), lambda: window)
    return tf.image.crop_and_resize(window[None], box[None], [0], crop)[0]


def _edge_pad(image: tf.Tensor) -> tf.Tensor:
    """One-pixel border copying the edge pixels (tf.pad's SYMMETRIC mode is several times slower)."""
    image = tf.concat([image[:1], image, image[-1:]], 0)
    return tf.concat([image[:, :1], image, image[:, -1:]], 1)


def _window_and_box(
    hw: tf.Tensor, size: tf.Tensor, offset: tf.Tensor, crop: tf.Tensor, flip: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Where output pixels [offset, offset + crop) of the image resized from ``hw`` to ``size``
    sample: the source window (start, extent: int32 [2]), whether it needs an edge pad (bool),
    and the ``crop_and_resize`` box (float32 [4]) in the (padded) window, mirrored if ``flip``.

    tf.image.resize(image, size, 'bilinear') gives output pixel j the value at source position
    (j + 0.5) * hw / size - 0.5 (pixel centres at integers), clamped to the image; bilinear
    sampling reads the two pixels around it. The window keeps one more pixel either side against
    float rounding. Positions beyond the image (upscaling, at a border) need the edge pad, which
    makes the clamping. crop_and_resize samples y1 + i * (y2 - y1) / (crop - 1) in units of
    (window size - 1), and mirrors the crop for x1 > x2.
    """
    hw_f = tf.cast(hw, tf.float32)
    inv_scale = hw_f / tf.cast(size, tf.float32)
    first = (tf.cast(offset, tf.float32) + 0.5) * inv_scale - 0.5
    last = first + tf.cast(crop - 1, tf.float32) * inv_scale
    start = tf.maximum(tf.cast(tf.floor(first), tf.int32) - 1, 0)
    extent = tf.minimum(tf.cast(tf.floor(last), tf.int32) + 3, hw) - start
    pad = tf.reduce_any(tf.logical_or(first < 0.0, last > hw_f - 1.0))
    border = tf.cast(pad, tf.float32)
    origin = tf.cast(start, tf.float32) - border  # source position of the window's pixel 0
    scale = tf.cast(tf.tile(extent, [2]), tf.float32) + (2.0 * border - 1.0)
    box = tf.concat([first - origin, last - origin], 0) / scale
    box = tf.gather(box, tf.where(flip, [0, 3, 2, 1], [0, 1, 2, 3]))
    return start, extent, pad, box
