"""The data config (every field the input pipeline reads) and the transform settings drawn from it.

docs/data.md
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from vgg_jax import preprocessing

# AlexNet PCA lighting on RGB in [0, 1] (fb.resnet.torch, datasets/imagenet.lua): eigen-values, and
# eigen-vectors as columns (rows R, G, B).
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
# Evaluation views (paper Sect. 3.2): the centre crop, the whole image (dense), the 5x5 grid of crops
# and their flips (multicrop).
VIEWS = ("center", "dense", "multicrop")
MULTICROP_GRID = 5
BAD_IMAGE_POLICIES = ("skip", "fail")


@dataclasses.dataclass(frozen=True)
class TransformConfig:
    """Per-image transform settings; mean/std on the 0..255 scale, PCA eigen-values on 0..1."""

    crop_size: int = 224
    scale_min: int = 256
    scale_max: int = 512
    flip: bool = True
    mean_rgb: tuple[float, float, float] = preprocessing.IMAGENET_MEAN_RGB
    std_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: str = "round"
    pca_eigval: tuple[float, float, float] = IMAGENET_PCA_EIGVAL
    pca_eigvec: tuple[tuple[float, float, float], ...] = IMAGENET_PCA_EIGVEC
    pca_alpha_std: float = 0.1

    def __post_init__(self) -> None:
        # Lists (from a ConfigDict or JSON) become hashable tuples.
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
        preprocessing.InputConvention(255.0, self.mean_rgb, self.std_rgb, self.resize)  # checks them
        if len(self.pca_eigval) != 3 or len(self.pca_eigvec) != 3 or any(len(r) != 3 for r in self.pca_eigvec):
            raise ValueError(
                "pca_eigval needs 3 values and pca_eigvec a 3x3 matrix (rows R, G, B; columns the "
                f"eigen-vectors); got {self.pca_eigval} and {self.pca_eigvec}."
            )
        if self.pca_alpha_std < 0:
            raise ValueError(f"pca_alpha_std must be >= 0 (0 turns the colour shift off), got {self.pca_alpha_std}.")

    @classmethod
    def from_config(cls, data_config: Any) -> TransformConfig:
        """From the data config; ``stats_path`` (JSON of the stats command) overrides mean and PCA."""
        fields = {f.name: data_config[f.name] for f in dataclasses.fields(cls)}
        if data_config.get("stats_path"):
            fields.update(load_stats(data_config.stats_path))
        return cls(**fields)

    @property
    def convention(self) -> preprocessing.InputConvention:
        return preprocessing.InputConvention(255.0, self.mean_rgb, self.std_rgb, self.resize)


STATS_KEYS = ("mean_rgb", "pca_eigval", "pca_eigvec")


def load_stats(path: str) -> dict[str, Any]:
    """``mean_rgb``, ``pca_eigval`` and ``pca_eigvec`` from a JSON written by ``vgg_jax.data.stats``."""
    from etils import epath

    try:
        stats = json.loads(epath.Path(path).read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"stats_path={path!r} does not exist; write it with `python -m vgg_jax.data.stats "
            f"--data.dataset=... --out={path}` or unset stats_path to use the ImageNet constants."
        ) from e
    missing = [k for k in STATS_KEYS if k not in stats]
    if missing:
        raise ValueError(f"{path} lacks {missing}; regenerate it with `python -m vgg_jax.data.stats`.")
    return {k: stats[k] for k in STATS_KEYS}


def train_scale(scale_min: int, scale_max: int) -> str:
    """The training scale S as the paper writes it: '256', or '[256;512]' when jittered."""
    return str(scale_min) if scale_min == scale_max else f"[{scale_min};{scale_max}]"


def default_data_config() -> ml_collections.ConfigDict:
    """Every data field with its default. Sequences are tuples so the command line can override them
    (``--config.data.mean_rgb='(120., 115., 100.)'``)."""
    transform = TransformConfig()
    config = ml_collections.ConfigDict()
    # Which dataset: 'vgg_jax_demo' (built in, generated locally on first use), 'imagenet2012'
    # (TFDS builder fed from manual_dir), 'folder' (your images, see `folder`) or any TFDS
    # image-classification dataset name (e.g. 'imagenette/320px-v2').
    config.dataset = "vgg_jax_demo"
    # TFDS data_dir holding prepared datasets. None: TFDS's default (~/tensorflow_datasets) for TFDS
    # datasets; ~/.cache/vgg_jax/tfds for 'vgg_jax_demo' and 'folder'.
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    # imagenet2012 only: folder holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar; the
    # first run prepares TFRecords from them into data_dir.
    config.manual_dir = ml_collections.FieldReference(None, field_type=str)
    # 'folder' only: root laid out as <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg
    # ('val' is read as the 'validation' split); prepared once into TFRecords under data_dir.
    config.folder = ml_collections.FieldReference(None, field_type=str)
    # Other TFDS datasets: download and prepare on first use (else an error says what to run).
    config.download = False
    # Split names, TFDS syntax (slices allowed, e.g. 'train[:95%]').
    config.train_split = "train"
    config.eval_split = "validation"

    # Training view (paper Sect. 3.1): shorter side rescaled to S, one crop_size x crop_size crop.
    config.crop_size = transform.crop_size
    # S is fixed when scale_min == scale_max (256 or 384 in the paper), else drawn uniformly per
    # image from the integers in [scale_min, scale_max] (scale jittering, the paper's [256, 512]).
    config.scale_min = transform.scale_min
    config.scale_max = transform.scale_max
    # Random horizontal flip with probability 1/2.
    config.flip = transform.flip
    # AlexNet PCA colour shift: alpha ~ N(0, pca_alpha_std) per component (0 turns it off);
    # eigen-values on the 0..1 RGB scale, eigen-vectors as columns (rows R, G, B); ImageNet's.
    config.pca_alpha_std = transform.pca_alpha_std
    config.pca_eigval = transform.pca_eigval
    config.pca_eigvec = transform.pca_eigvec
    # Input convention (vgg_jax.preprocessing) on the 0..255 RGB scale: (x - mean_rgb) / std_rgb.
    # The paper only subtracts the training-set mean (std 1); ImageNet's mean RGB by default.
    # resize: how the shorter-side rescale rounds the long side ('round', or 'torchvision' for
    # weights trained with torchvision's Resize + CenterCrop arithmetic).
    config.mean_rgb = transform.mean_rgb
    config.std_rgb = transform.std_rgb
    config.resize = transform.resize
    # JSON written by `python -m vgg_jax.data.stats`; when set, its mean_rgb / pca_eigval /
    # pca_eigvec replace the three fields above (read once when training starts).
    config.stats_path = ml_collections.FieldReference(None, field_type=str)

    # Evaluation (paper Sect. 3.2): the test scales Q (shorter side), one pass per scale and view.
    config.eval_scales = (256,)
    # Dense view: images (shorter side Q) are padded to a canvas of long side ceil32(ratio * Q),
    # the smallest ratio here that holds them, one canvas per ratio and orientation; longer
    # images are centre-cropped to the largest ratio. Few ratios: few XLA shapes.
    config.dense_aspect_buckets = (1.34, 1.5, 2.0)
    # Keep the processed eval examples in host memory after the first pass (small eval sets that
    # are evaluated often); costs examples x view size of RAM.
    config.cache_eval = False

    # Shuffling (per process): each epoch reads the process's examples in a random order of
    # shuffle_chunk-example chunks and shuffles them fully within windows of shuffle_buffer
    # examples (a multiple of shuffle_chunk). Encoded bytes are buffered: about 2 x
    # shuffle_buffer x 110 kB of RAM on ImageNet.
    config.shuffle_buffer = 8192
    config.shuffle_chunk = 128
    # Images that cannot be decoded (corrupt, truncated): 'skip' drops them and warns with their
    # key and a running count; 'fail' raises naming the image.
    config.on_bad_image = "skip"
    # Parallel decode / augmentation calls per process (None: tf.data AUTOTUNE).
    config.num_parallel_calls = ml_collections.FieldReference(None, field_type=int)
    return config
