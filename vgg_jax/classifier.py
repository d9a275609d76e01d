"""Notebook API: ``vgg_jax.load(path)`` restores a trained (or converted) model for inference.

docs/evaluation.md#notebooks
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vgg_jax import checkpoints, cli, models, preprocessing, storage
from vgg_jax.errors import UserError

ImageBatch = np.ndarray | Sequence[Any] | str | os.PathLike  # [N, H, W, 3] uint8; arrays, PIL images or files


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Top-k classes per image, most probable first."""

    ids: np.ndarray  # int [N, k]
    names: list[list[str]]
    probabilities: np.ndarray  # float32 [N, k]


@dataclasses.dataclass(eq=False)  # identity hash: apply_fn is a static argument of jitted evaluators
class Classifier:
    """A restored model: ``model`` (linen VGG), ``variables``, ``config`` (the run's full config,
    with ``config.data`` holding its input convention), ``class_names``."""

    path: str
    model: models.VGG
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    class_names: list[str]
    batch_size: int = 32  # images per forward pass in predict / features
    apply_fn: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.apply_fn = self.model.apply
        self._probabilities = jax.jit(lambda v, x: jax.nn.softmax(self.apply_fn(v, x, train=False)))
        self._features: dict[tuple[str, ...], Any] = {}

    @property
    def scale(self) -> int:
        """Test scale Q of ``predict``: the shorter side before the centre crop."""
        return int(self.config.data.eval_scales[0])

    @property
    def crop_size(self) -> int:
        return int(self.config.data.crop_size)

    @property
    def convention(self) -> preprocessing.InputConvention:
        return preprocessing.InputConvention.from_data_config(self.config.data)

    def crops(self, images: ImageBatch) -> np.ndarray:
        """float32 [N, crop, crop, 3] RGB on 0..255, what the model classifies: shorter side -> ``scale``
        (bilinear, antialiased when shrinking), then the centre crop."""
        tf = cli.import_tensorflow()  # without its start-up banner: a notebook needs no set-up
        if self.scale < self.crop_size:
            raise ValueError(f"data.eval_scales[0]={self.scale} < crop_size={self.crop_size}: no centre crop fits.")
        convention, crop = self.convention, self.crop_size
        crops = [np.empty((0, crop, crop, 3), np.float32)]
        for image in as_images(images):
            h, w = convention.resized_size(*image.shape[:2], self.scale)
            resized = tf.image.resize(image, (h, w), "bilinear", antialias=True).numpy()
            top, left = convention.crop_offset(h, crop), convention.crop_offset(w, crop)
            crops.append(resized[None, top : top + crop, left : left + crop].astype(np.float32))
        return np.concatenate(crops)

    def preprocess(self, images: ImageBatch) -> np.ndarray:
        """The network input, float32 [N, crop, crop, 3]: ``crops`` in the checkpoint's input convention."""
        return self.convention.normalize(self.crops(images)).astype(np.float32)

    def _batched(self, fn: Any, x: np.ndarray) -> list[Any]:
        """``fn(variables, chunk)`` over fixed-size chunks (padded: one compiled shape)."""
        outputs = []
        for start in range(0, len(x), self.batch_size):
            chunk = x[start : start + self.batch_size]
            padded = np.concatenate([chunk, np.zeros((self.batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            n, result = len(chunk), jax.device_get(fn(self.variables, padded))
            outputs.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], result))
        return outputs

    def probabilities(self, images: ImageBatch) -> np.ndarray:
        """Soft-max posteriors [N, classes] of the centre crops."""
        x = self.preprocess(images)
        parts = self._batched(self._probabilities, x)
        return np.concatenate(parts) if parts else np.zeros((0, len(self.class_names)), np.float32)

    def predict(self, images: ImageBatch, top_k: int = 5) -> Predictions:
        """The ``top_k`` most probable classes of each image (ids, names, probabilities)."""
        if not 1 <= top_k <= len(self.class_names):
            raise UserError(f"top_k must be in [1, {len(self.class_names)}] (the number of classes), got {top_k}.")
        probs = self.probabilities(images)
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        names = [[self.class_names[i] for i in row] for row in ids]
        return Predictions(ids, names, np.take_along_axis(probs, ids, axis=1))

    def features(self, images: ImageBatch, layers: Sequence[str] = ("fc7",)) -> dict[str, np.ndarray]:
        """Activations of the centre crops by layer name (``conv3_1``, ``relu5_3``, ``pool5``,
        ``fc7``, ...; see ``models.extract_features``): numpy arrays [N, ...]."""
        layers = tuple(layers)
        if layers not in self._features:
            model = self.model
            self._features[layers] = jax.jit(lambda v, x: models.extract_features(model, v, x, layers, dense=False))
        parts = self._batched(self._features[layers], self.preprocess(images))
        if not parts:
            raise ValueError("No images given.")
        return {name: np.concatenate([p[name] for p in parts]) for name in layers}


def as_images(images: ImageBatch) -> list[np.ndarray]:
    """A list of uint8 [H, W, 3] RGB arrays from an [N, H, W, C] array, one image, a file path, or a list
    of these. PIL images of any mode and image files go through PIL to RGB, EXIF orientation applied;
    grayscale arrays get three channels, an alpha channel is dropped."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    out = []
    for i, image in enumerate(items):
        if isinstance(image, (str, os.PathLike)) or hasattr(image, "getexif"):
            out.append(_pil_rgb(image, i))
            continue
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise UserError(
                f"Image {i} has dtype {image.dtype}; predict takes uint8 pixels (0..255) as read from an image file. "
                "Convert with np.clip(x, 0, 255).astype(np.uint8) (x * 255 first if it is in [0, 1])."
            )
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise UserError(f"Image {i} has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4).")
        out.append(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3])
    return out


def _pil_rgb(image: Any, index: int) -> np.ndarray:
    """uint8 RGB pixels of a PIL image or image file: EXIF orientation applied, any mode converted by PIL."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(io.BytesIO(storage.path(image).read_bytes())) as opened:  # local or gs://
                opened.load()
                image = opened.copy()
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(
                f"Cannot read image {index}, {os.fspath(image)!r}: {e}. Pass a readable image file."
            ) from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: PIL's RGB conversion clips at 255
        pixels = np.asarray(image, np.float64)
        gray = np.clip(np.round(pixels * (255.0 / 65535.0)), 0, 255).astype(np.uint8)  # 16-bit range
        return np.repeat(gray[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def load(path: str, batch_size: int = 32, *, allow_unverified: bool = False) -> Classifier:
    """Restores the newest finished checkpoint under ``path`` (a training workdir, its checkpoints dir, a
    step dir, or converted weights; local or gs://) with its config, class names and input convention.
    A step without checksum files is refused unless ``allow_unverified``."""
    from vgg_jax.data.config import default_data_config

    model, variables, meta = checkpoints.restore_model(path, allow_unverified=allow_unverified)
    data_config = default_data_config()  # defaults for the fields the checkpoint does not set
    data_config.update(meta["config"].get("data", {}))
    data_config.update(preprocessing.of_checkpoint(meta).data_fields())
    config = ml_collections.ConfigDict({k: v for k, v in meta["config"].items() if k != "data"})
    config.data = data_config
    class_names = list(meta.get("class_names") or [str(i) for i in range(model.num_classes)])
    if len(class_names) != model.num_classes:
        raise ValueError(f"{path}: {len(class_names)} class names for {model.num_classes} outputs of fc8.")
    if not variables.get("batch_stats"):
        variables = {"params": variables["params"]}
    return Classifier(str(path), model, variables, config, class_names, batch_size)
