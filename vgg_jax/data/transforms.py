"""Per-image transforms (paper Sect. 3.1 and 3.2) as pure TF functions for ``tf.data`` maps.

Training view: isotropic rescale so the shorter side is S (fixed, or drawn uniformly per image
from the integers in [scale_min, scale_max]), one random crop, random horizontal flip, AlexNet
PCA lighting, mean subtraction. Only the source region that maps to the crop is decoded
(``tf.image.decode_and_crop_jpeg``) and resampled, never the whole image at scale S.

Resampling is bilinear with half-pixel centres, no antialiasing: exactly what
``tf.image.resize(image, size, 'bilinear')`` computes, evaluated at the crop's pixels only
(``tf.image.crop_and_resize`` on the decoded source window, a reversed box for the flip). On
ImageNet photos (about 400x350) S in [256, 512] shrinks by under 1.5x, where bilinear barely
aliases; antialiased resampling (``ScaleAndTranslate``) cost ~3x as much per crop here. All
randomness is stateless: a seed fixes the view.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import tensorflow as tf

# libjpeg's accurate integer IDCT, as Pillow decodes. TF's default ('' = INTEGER_FAST) differs
# from it by ~1 level on average (up to 5-8 on busy images) and was no faster here (bench.py).
DCT_METHOD = "INTEGER_ACCURATE"

# ImageNet constants (REFERENCE.md): PCA on RGB in [0, 1] (fb.resnet.torch), Caffe mean RGB.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Transform settings; mean/std on the 0..255 scale, PCA eigen-values on the 0..1 scale."""

    crop_size: int = 224
    scale_min: int = 256
    scale_max: int = 512
    flip: bool = True
    mean_rgb: tuple[float, float, float] = IMAGENET_MEAN_RGB
    std_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pca_eigval: tuple[float, float, float] = IMAGENET_PCA_EIGVAL
    pca_eigvec: tuple[tuple[float, float, float], ...] = IMAGENET_PCA_EIGVEC
    pca_alpha_std: float = 0.1

    def __post_init__(self) -> None:
        # Normalise lists (e.g. from a ConfigDict or JSON) to hashable tuples.
        object.__setattr__(self, "mean_rgb", tuple(float(v) for v in self.mean_rgb))
        object.__setattr__(self, "std_rgb", tuple(float(v) for v in self.std_rgb))
        object.__setattr__(self, "pca_eigval", tuple(float(v) for v in self.pca_eigval))
        object.__setattr__(self, "pca_eigvec", tuple(tuple(float(v) for v in row) for row in self.pca_eigvec))
        if not 0 < self.crop_size <= self.scale_min <= self.scale_max:
            raise ValueError(
                f"need 0 < crop_size <= scale_min <= scale_max, got crop_size={self.crop_size}, "
                f"scale_min={self.scale_min}, scale_max={self.scale_max}: the shorter side S must "
                "hold the crop; set scale_min >= crop_size (the paper: S >= 256 for 224 crops)."
            )
        if len(self.mean_rgb) != 3 or len(self.std_rgb) != 3 or min(self.std_rgb) <= 0:
            raise ValueError(f"mean_rgb and std_rgb need 3 values, std > 0; got {self.mean_rgb}, {self.std_rgb}.")
        if len(self.pca_eigval) != 3 or len(self.pca_eigvec) != 3 or any(len(r) != 3 for r in self.pca_eigvec):
            raise ValueError(
                "pca_eigval needs 3 values and pca_eigvec a 3x3 matrix (rows R, G, B; columns the "
                f"eigen-vectors); got {self.pca_eigval} and {self.pca_eigvec}."
            )
        if self.pca_alpha_std < 0:
            raise ValueError(f"pca_alpha_std must be >= 0 (0 turns the colour shift off), got {self.pca_alpha_std}.")

    @classmethod
    def from_config(cls, data_cfg: Any) -> TransformConfig:
        """From the data ConfigDict; ``stats_path`` (JSON of the stats command) overrides mean and PCA."""
        fields = {f.name: data_cfg[f.name] for f in dataclasses.fields(cls)}
        if data_cfg.get("stats_path"):
            fields.update(load_stats(data_cfg.stats_path))
        return cls(**fields)


def load_stats(path: str) -> dict[str, Any]:
    """``mean_rgb``, ``pca_eigval`` and ``pca_eigvec`` from a JSON written by ``vgg_jax.data.stats``."""
    try:
        with tf.io.gfile.GFile(path) as f:
            stats = json.load(f)
    except (tf.errors.NotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError(
            f"stats_path={path!r} does not exist; write it with `python -m vgg_jax.data.stats "
            f"--dataset=... --out {path}` or unset stats_path to use the ImageNet constants."
        ) from e
    keys = ("mean_rgb", "pca_eigval", "pca_eigvec")
    missing = [k for k in keys if k not in stats]
    if missing:
        raise ValueError(f"{path} lacks {missing}; regenerate it with `python -m vgg_jax.data.stats`.")
    return {k: stats[k] for k in keys}


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


def shorter_side_size(hw: tf.Tensor, size: tf.Tensor | int) -> tf.Tensor:
    """int32 [2]: the (height, width) an isotropic rescale to shorter side ``size`` gives."""
    hw_f = tf.cast(hw, tf.float32)
    size = tf.cast(size, tf.int32)
    out = tf.cast(tf.round(hw_f * (tf.cast(size, tf.float32) / tf.reduce_min(hw_f))), tf.int32)
    return tf.maximum(out, size)  # the shorter side is exactly `size` despite float rounding


def pca_offset(alpha: tf.Tensor, cfg: TransformConfig) -> tf.Tensor:
    """AlexNet lighting on 0..255 pixels: offset_i = 255 * sum_j eigvec[i][j] * alpha_j * eigval_j."""
    eigvec = tf.constant(cfg.pca_eigvec, tf.float32)
    eigval = tf.constant(cfg.pca_eigval, tf.float32) * 255.0
    return tf.linalg.matvec(eigvec, alpha * eigval)


def normalize(image: tf.Tensor, cfg: TransformConfig, offset: tf.Tensor | None = None) -> tf.Tensor:
    """float32 ``(image + offset - mean_rgb) / std_rgb`` (offset: the PCA colour shift, or none)."""
    shift = -tf.constant(cfg.mean_rgb, tf.float32)
    if offset is not None:
        shift += offset
    image = tf.cast(image, tf.float32)
    # Broadcasting a [3] vector is slow on CPU (inner dimension 3); add whole [w * 3] rows instead.
    shape = tf.shape(image)
    rows = tf.reshape(image, [-1, shape[-2] * 3]) + tf.tile(shift, shape[-2:-1])
    if cfg.std_rgb != (1.0, 1.0, 1.0):  # the paper only subtracts the mean
        rows *= tf.tile(tf.constant([1.0 / s for s in cfg.std_rgb], tf.float32), shape[-2:-1])
    return tf.reshape(rows, shape)


def sample_train_params(seed: tf.Tensor, hw: tf.Tensor, cfg: TransformConfig) -> dict[str, tf.Tensor]:
    """The random choices of one training view of an image of size ``hw``, fixed by ``seed``.

    scale: S, uniform over the integers in [scale_min, scale_max]; size: the rescaled (h, w);
    offset: the crop's top-left corner in the rescaled image, uniform over all valid positions;
    flip: horizontal flip with probability 1/2 (if cfg.flip); alpha: PCA weights ~ N(0, alpha_std).
    """
    # One uniform draw for S, the two offsets and the flip (few ops: this runs per image).
    u = tf.random.stateless_uniform([4], seed)
    scale = cfg.scale_min + tf.cast(u[0] * (cfg.scale_max - cfg.scale_min + 1), tf.int32)
    size = shorter_side_size(hw, scale)
    offset = tf.cast(u[1:3] * tf.cast(size - cfg.crop_size + 1, tf.float32), tf.int32)
    flip = tf.logical_and(cfg.flip, u[3] < 0.5)
    alpha_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    alpha = tf.random.stateless_normal([3], alpha_seed) * cfg.pca_alpha_std
    return dict(scale=scale, size=size, offset=offset, flip=flip, alpha=alpha)


def train_view(encoded: tf.Tensor, seed: tf.Tensor, cfg: TransformConfig) -> tf.Tensor:
    """Paper training view: float32 [crop, crop, 3], normalised, PCA-shifted, maybe flipped."""
    source = _probe(encoded)
    params = sample_train_params(seed, source.hw, cfg)
    crop = tf.constant([cfg.crop_size] * 2, tf.int32)
    image = _resized_crop(source, params["size"], params["offset"], crop, params["flip"])
    image = normalize(image, cfg, pca_offset(params["alpha"], cfg))
    image.set_shape([cfg.crop_size, cfg.crop_size, 3])
    return image


def eval_center_view(encoded: tf.Tensor, scale: int, cfg: TransformConfig) -> tf.Tensor:
    """Centre crop_size crop of the image rescaled to shorter side ``scale``: float32 [crop, crop, 3]."""
    check_scale(scale, cfg)
    source = _probe(encoded)
    size = shorter_side_size(source.hw, scale)
    crop = tf.constant([cfg.crop_size] * 2, tf.int32)
    image = _resized_crop(source, size, (size - crop) // 2, crop, tf.constant(False))
    image = normalize(image, cfg)
    image.set_shape([cfg.crop_size, cfg.crop_size, 3])
    return image


def eval_full_view(encoded: tf.Tensor, scale: int, cfg: TransformConfig) -> tf.Tensor:
    """The whole image rescaled to shorter side ``scale`` (dense protocol): float32 [h, w, 3]."""
    return normalize(_full_resized(encoded, scale), cfg)


def multicrop_views(encoded: tf.Tensor, scale: int, cfg: TransformConfig, grid: int = 5) -> tf.Tensor:
    """The paper's multi-crop views: float32 [2 * grid * grid, crop, crop, 3].

    Crops of the image at shorter side ``scale`` on a regular grid whose first and last crops touch
    the borders: top-left corners ``(k * (h - crop)) // (grid - 1)`` for k = 0..grid-1 (rows and
    columns alike). Views 0..grid*grid-1 are row-major (row k // grid, column k % grid); the next
    grid*grid are the same crops flipped horizontally, in the same order.
    """
    check_scale(scale, cfg)
    if grid < 2:
        raise ValueError(f"multicrop grid must be >= 2 (the paper uses 5), got {grid}.")
    image = normalize(_full_resized(encoded, scale), cfg)
    c = cfg.crop_size
    hw = tf.shape(image)[:2]
    k = tf.range(grid)
    corners = (k[None, :] * (hw[:, None] - c)) // (grid - 1)  # [2, grid]
    idx = corners[:, :, None] + tf.range(c)[None, None, :]  # [2, grid, crop]
    rows = tf.gather(image, idx[0], axis=0)  # [grid, crop, w, 3]
    crops = tf.gather(rows, idx[1], axis=2)  # [grid, crop, grid, crop, 3]
    crops = tf.reshape(tf.transpose(crops, [0, 2, 1, 3, 4]), [grid * grid, c, c, 3])
    return tf.concat([crops, tf.reverse(crops, [2])], axis=0)


def check_scale(scale: int, cfg: TransformConfig) -> None:
    """A clear error for a test scale Q below the crop size."""
    if scale < cfg.crop_size:
        raise ValueError(
            f"test scale Q={scale} is smaller than crop_size={cfg.crop_size}; crops need Q >= crop_size "
            "(the paper's Q are 224..512 for 224 crops)."
        )


def _full_resized(encoded: tf.Tensor, scale: int) -> tf.Tensor:
    """float32 [h, w, 3]: the whole image at shorter side ``scale`` (bilinear, half-pixel centres)."""
    image = decode_rgb(encoded)
    return tf.image.resize(image, shorter_side_size(tf.shape(image)[:2], scale), "bilinear")


class _Source(NamedTuple):
    encoded: tf.Tensor  # the bytes
    is_jpeg: tf.Tensor  # bool
    full: tf.Tensor  # uint8 [h, w, 3] decoded image if not a JPEG, else empty
    hw: tf.Tensor  # int32 [2] (height, width)


def _probe(encoded: tf.Tensor) -> _Source:
    """The image size: from the header for a JPEG (no decode), else by decoding it whole."""
    is_jpeg = tf.io.is_jpeg(encoded)
    full, hw = tf.cond(
        is_jpeg,
        lambda: (tf.zeros([0, 0, 3], tf.uint8), tf.image.extract_jpeg_shape(encoded)[:2]),
        lambda: _decode_with_size(encoded),
    )
    return _Source(encoded, is_jpeg, full, hw)


def _decode_with_size(encoded: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    image = _decode_other(encoded)
    return image, tf.shape(image)[:2]


def _resized_crop(source: _Source, size: tf.Tensor, offset: tf.Tensor, crop: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
    """float32 [crop_h, crop_w, 3]: the ``crop`` pixels at ``offset`` of the image resized to
    ``size`` (mirrored if ``flip``), decoding a JPEG on just the source window it needs."""
    # Small conds only: one tf.cond around probing, sampling and decoding cost ~0.1 ms more per image.
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
