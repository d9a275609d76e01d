"""Tiny archives in the real ILSVRC2012 layout, and small image folders, for the data tests.

``ILSVRC2012_img_train.tar`` holds one ``<synset>.tar`` per synset of ``<synset>_<n>.JPEG`` files;
``ILSVRC2012_img_val.tar`` holds ``ILSVRC2012_val_<8 digits>.JPEG`` files. Every image is one solid
colour that encodes its class (``label_colour``), so a test can check that images and labels stay
paired through the pipeline.
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

_TFDS_IMAGENET = "datasets/imagenet2012"


def imagenet_synsets() -> list[str]:
    """The 1000 synsets in TFDS's label order (label i is line i of labels.txt)."""
    return tfds_utils.tfds_path(f"{_TFDS_IMAGENET}/labels.txt").read_text().split()


def imagenet_validation_labels() -> list[str]:
    """Synset of validation image i + 1 (ILSVRC2012_val_%08d), as TFDS ships it."""
    return tfds_utils.tfds_path(f"{_TFDS_IMAGENET}/validation_labels.txt").read_text().split()


def label_colour(label: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class id 0..999 (base-10 digits, 25 levels apart)."""
    return (25 * (label % 10) + 15, 25 * (label // 10 % 10) + 15, 25 * (label // 100) + 15)


def colour_label(rgb: np.ndarray) -> int:
    """Inverse of ``label_colour`` (nearest level per channel)."""
    d = np.clip(np.round((np.asarray(rgb, np.float64) - 15) / 25), 0, 9).astype(int)
    return int(d[0] + 10 * d[1] + 100 * d[2])


def solid(label: int, size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", (size[1], size[0]), label_colour(label))


def encode(image: Image.Image, kind: str = "jpeg") -> bytes:
    """JPEG bytes ('jpeg', 'gray': grayscale JPEG, 'cmyk': Adobe CMYK JPEG) or PNG bytes ('png')."""
    buf = io.BytesIO()
    if kind == "png":
        image.save(buf, "PNG")
    elif kind == "gray":
        image.convert("L").save(buf, "JPEG", quality=95)
    elif kind == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=95)
    else:
        image.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def truncated_jpeg(size: tuple[int, int] = (48, 64)) -> bytes:
    """A JPEG cut in the middle of its entropy-coded data (busy pixels so there is data to cut)."""
    noise = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    return data[: len(data) // 2]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_ilsvrc(
    manual_dir: str, train: dict[str, list[tuple[str, bytes]]], val: list[bytes] | dict[str, bytes]
) -> None:
    """Write ILSVRC2012_img_train.tar ({synset: [(file name, bytes)]}) and ILSVRC2012_img_val.tar
    (a list: image i is ILSVRC2012_val_<i + 1>.JPEG; a dict: {file name: bytes})."""
    os.makedirs(manual_dir, exist_ok=True)
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_train.tar"), "w") as outer:
        for synset, files in train.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for name, data in files:
                    _add(t, name, data)
            _add(outer, f"{synset}.tar", inner.getvalue())
    if not isinstance(val, dict):
        val = {f"ILSVRC2012_val_{i + 1:08d}.JPEG": data for i, data in enumerate(val)}
    with tarfile.open(os.path.join(manual_dir, "ILSVRC2012_img_val.tar"), "w") as t:
        for name, data in val.items():
            _add(t, name, data)


def write_folder(root: str, splits: dict[str, dict[str, list[tuple[str, bytes]]]]) -> None:
    """Write ``root/<split>/<class>/<file>`` from {split: {class: [(file name, bytes)]}}."""
    for split, classes in splits.items():
        for cls, files in classes.items():
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for name, data in files:
                with open(os.path.join(root, split, cls, name), "wb") as f:
                    f.write(data)
