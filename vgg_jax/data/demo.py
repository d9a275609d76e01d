"""The built-in demo dataset ``vgg_jax_demo``: ten texture classes of ImageNet-like JPEGs, generated locally.

docs/data.md#datasets
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASS_NAMES = (
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "polka_dots",
    "concentric_rings",
    "grid_lines",
    "zigzag",
    "blobs",
    "speckle",
)
SPLIT_SIZES = {"train": 200, "validation": 30}  # examples per class
_SPLIT_IDS = {"train": 0, "validation": 1}
_SEED = 20150410  # ICLR 2015

Pattern = Callable[[np.random.Generator, np.ndarray, np.ndarray, float], np.ndarray]


def _stripes(angle_deg: float, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    """Stripes whose normal points at ``angle_deg`` (0: horizontal stripes)."""
    period = short / rng.uniform(4, 10)
    a = np.deg2rad(angle_deg)
    t = yy * np.cos(a) + xx * np.sin(a) + rng.uniform(0, period)
    return (t % period) < rng.uniform(0.3, 0.6) * period


def _tilt(rng: np.random.Generator, max_deg: float) -> float:
    return rng.uniform(-max_deg, max_deg)


def _horizontal(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    return _stripes(_tilt(rng, 8), rng, yy, xx, short)


def _vertical(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    return _stripes(90 + _tilt(rng, 8), rng, yy, xx, short)


def _diagonal(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    # Both directions belong to the class, so a horizontal flip never changes it.
    return _stripes(rng.choice([-1, 1]) * rng.uniform(32, 58), rng, yy, xx, short)


def _rotated(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, max_deg: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.deg2rad(_tilt(rng, max_deg))
    return yy * np.cos(a) - xx * np.sin(a), yy * np.sin(a) + xx * np.cos(a)


def _checkerboard(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    cell = short / rng.uniform(4, 9)
    y, x = _rotated(rng, yy, xx, 10)
    return ((np.floor(y / cell + rng.uniform()) + np.floor(x / cell + rng.uniform())) % 2) == 1


def _polka_dots(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    step = short / rng.uniform(4, 8)
    y, x = _rotated(rng, yy, xx, 10)
    dy = (y / step + rng.uniform()) % 1 - 0.5
    dx = (x / step + rng.uniform()) % 1 - 0.5
    return np.hypot(dy, dx) < rng.uniform(0.2, 0.35)


def _rings(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    h, w = yy.shape
    cy, cx = h * rng.uniform(0.3, 0.7), w * rng.uniform(0.3, 0.7)
    period = short / rng.uniform(6, 12)
    return (np.hypot(yy - cy, xx - cx) % period) < 0.5 * period


def _grid_lines(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    step = short / rng.uniform(4, 8)
    width = step * rng.uniform(0.08, 0.15)
    y, x = _rotated(rng, yy, xx, 10)
    return ((y + rng.uniform(0, step)) % step < width) | ((x + rng.uniform(0, step)) % step < width)


def _zigzag(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    period = short / rng.uniform(5, 10)
    wavelength = short / rng.uniform(3, 7)
    tri = np.abs((xx / wavelength + rng.uniform()) % 1 - 0.5) * 2  # symmetric: a flip only shifts it
    return ((yy + tri * period * rng.uniform(0.8, 1.5)) % period) < 0.5 * period


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    h, w = shape
    gh, gw = max(2, round(cells * h / min(h, w))), max(2, round(cells * w / min(h, w)))
    low = Image.fromarray(rng.uniform(0, 255, (gh, gw)).astype(np.float32))
    return np.asarray(low.resize((w, h), Image.BICUBIC))


def _blobs(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    field = _smooth_noise(rng, yy.shape, rng.uniform(3, 6))
    return field > np.median(field)


def _speckle(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, short: float) -> np.ndarray:
    block = max(2, round(short / rng.uniform(40, 70)))
    h, w = yy.shape
    cells = rng.uniform(size=(-(-h // block), -(-w // block))) < 0.5
    return np.repeat(np.repeat(cells, block, 0), block, 1)[:h, :w]


_PATTERNS: tuple[Pattern, ...] = (
    _horizontal,
    _vertical,
    _diagonal,
    _checkerboard,
    _polka_dots,
    _rings,
    _grid_lines,
    _zigzag,
    _blobs,
    _speckle,
)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours whose luminance differs by at least 60 levels."""
    luma = np.array([0.299, 0.587, 0.114])
    while True:
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if abs((a - b) @ luma) >= 60:
            return a, b


@functools.cache
def _noise_tile() -> np.ndarray:
    """A fixed float32 [640, 640, 3] N(0, 8) noise tile; each image takes a random window of it."""
    return np.random.default_rng(_SEED).normal(0, 8, (640, 640, 3)).astype(np.float32)


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 RGB image [h, w, 3] of class ``label``.

    The pattern is drawn at half resolution and upsampled bilinearly (soft edges, 4x cheaper).
    """
    short = int(rng.integers(256, 401))
    long = int(short * rng.uniform(1.0, 1.6))
    h, w = (short, long) if rng.uniform() < 0.7 else (long, short)
    yy, xx = np.mgrid[: (h + 1) // 2, : (w + 1) // 2].astype(np.float32)
    half = _PATTERNS[label](rng, yy, xx, short / 2).astype(np.float32)
    mask = np.asarray(Image.fromarray(half).resize((w, h), Image.BILINEAR))[..., None]
    fg, bg = _colours(rng)
    ramp = np.add.outer(
        np.linspace(-0.5, 0.5, h, dtype=np.float32) * rng.uniform(-25, 25),
        np.linspace(-0.5, 0.5, w, dtype=np.float32) * rng.uniform(-25, 25),
    )
    tile = _noise_tile()
    oy, ox = rng.integers(0, tile.shape[0] - h + 1), rng.integers(0, tile.shape[1] - w + 1)
    noise = tile[oy : oy + h, ox : ox + w]
    image = bg.astype(np.float32) + (fg - bg).astype(np.float32) * mask + ramp[..., None] + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def generate(split: str) -> Iterator[tuple[str, dict]]:
    """(key, example) pairs of a split; example i has label i % 10 and its own seeded generator."""
    for i in range(SPLIT_SIZES[split] * len(CLASS_NAMES)):
        label = i % len(CLASS_NAMES)
        rng = np.random.default_rng([_SEED, _SPLIT_IDS[split], i])
        yield f"{split}_{i:05d}", {"image": encode_jpeg(render(label, rng)), "label": label}


class VggJaxDemo(tfds.core.GeneratorBasedBuilder):
    """Registered in TFDS as ``vgg_jax_demo``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Ten texture classes, 200 train / 30 validation images per class."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        return generate(split)
