"""Notebook API: ``vgg_jax.load(path)`` restores a trained (or converted) model for inference.

>>> clf = vgg_jax.load("workdirs/demo")            # a workdir, checkpoints dir, step dir or converted weights
>>> clf.predict(images, top_k=5)                   # uint8 images of any size: ids, names, probabilities
>>> clf.features(images, layers=["relu5_3", "fc7"])

The model's own preprocessing is applied: shorter side rescaled to the first evaluation scale of
its config (``data.eval_scales[0]``), centre crop of the crop size, ``(x - mean) / std``. Converted
weights carry ``meta['preprocessing']`` ({channel_order, input_scale, mean, std} of the network
they came from, e.g. Keras's BGR Caffe means or torchvision's [0, 1] mean/std); it is folded into
the same 0..255 RGB mean/std plus a channel reversal for BGR networks, so evaluation
(``vgg_jax.evaluate``) and ``predict`` apply it too. Restoring works on any device count: the
arrays land on this process's first device whatever wrote them.

Heavy modules (TensorFlow, orbax) are imported inside the functions that need them, so
``import vgg_jax`` stays light.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vgg_jax import models

ImageBatch = np.ndarray | Sequence[Any]  # [N, H, W, 3] uint8, or a list of [H, W(, C)] uint8 arrays / PIL images


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Top-k classes per image, most probable first."""

    ids: np.ndarray  # int [N, k]
    names: list[list[str]]
    probabilities: np.ndarray  # float32 [N, k]


def _bgr_apply(model: models.VGG, variables: Any, x: Any, **kwargs: Any) -> Any:
    """``model.apply`` of a network trained on BGR input, given RGB-ordered images."""
    return model.apply(variables, x[..., ::-1], **kwargs)


@dataclasses.dataclass(eq=False)  # identity hash: apply_fn is a static argument of jitted evaluators
class Classifier:
    """A restored model: ``model`` (linen VGG), ``variables``, ``config`` (the run's full config,
    with ``config.data`` holding the preprocessing), ``class_names``, ``channel_order``."""

    path: str
    model: models.VGG
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    class_names: list[str]
    channel_order: str = "RGB"
    batch_size: int = 32  # images per forward pass in predict / features
    apply_fn: Any = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        # RGB images in, the order the first layer was trained on inside.
        bgr = self.channel_order == "BGR"
        self.apply_fn = functools.partial(_bgr_apply, self.model) if bgr else self.model.apply
        self._probabilities = jax.jit(lambda v, x: jax.nn.softmax(self.apply_fn(v, x, train=False)))
        self._features: dict[tuple[str, ...], Any] = {}

    @property
    def scale(self) -> int:
        """Test scale Q of ``predict``: the shorter side before the centre crop."""
        return int(self.config.data.eval_scales[0])

    @property
    def crop_size(self) -> int:
        return int(self.config.data.crop_size)

    def preprocess(self, images: ImageBatch) -> np.ndarray:
        """float32 [N, crop, crop, 3]: shorter side -> ``scale`` (bilinear, antialiased when
        shrinking), centre crop, ``(x - mean_rgb) / std_rgb``; RGB order (``apply_fn`` reorders)."""
        import tensorflow as tf

        from vgg_jax.data import transforms

        tcfg = transforms.TransformConfig.from_config(self.config.data)
        if self.scale < self.crop_size:
            raise ValueError(f"data.eval_scales[0]={self.scale} < crop_size={self.crop_size}: no centre crop fits.")
        out = np.empty((0, self.crop_size, self.crop_size, 3), np.float32)
        crops = [out]
        for image in as_images(images):
            size = transforms.shorter_side_size(tf.shape(image)[:2], self.scale)
            resized = tf.image.resize(image, size, "bilinear", antialias=True)
            top, left = (int(v) for v in (size - self.crop_size) // 2)
            crop = resized[top : top + self.crop_size, left : left + self.crop_size]
            crops.append(transforms.normalize(crop, tcfg).numpy()[None])
        return np.concatenate(crops)

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
            raise ValueError(f"top_k must be in [1, {len(self.class_names)}] (the number of classes), got {top_k}.")
        probs = self.probabilities(images)
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
        names = [[self.class_names[i] for i in row] for row in ids]
        return Predictions(ids, names, np.take_along_axis(probs, ids, axis=1))

    def features(self, images: ImageBatch, layers: Sequence[str] = ("fc7",)) -> dict[str, np.ndarray]:
        """Activations of the centre crops by layer name (``conv3_1``, ``relu5_3``, ``pool5``,
        ``fc7``, ...; see ``models.extract_features``): numpy arrays [N, ...]."""
        layers = tuple(layers)
        if layers not in self._features:
            model, bgr = self.model, self.channel_order == "BGR"

            def extract(variables: Any, x: Any) -> dict[str, Any]:
                return models.extract_features(model, variables, x[..., ::-1] if bgr else x, layers, dense=False)

            self._features[layers] = jax.jit(extract)
        parts = self._batched(self._features[layers], self.preprocess(images))
        if not parts:
            raise ValueError("No images given.")
        return {name: np.concatenate([p[name] for p in parts]) for name in layers}


def as_images(images: ImageBatch) -> list[np.ndarray]:
    """A list of uint8 [H, W, 3] arrays from an [N, H, W, C] array, one image, or a list of images
    (grayscale gets three channels, an alpha channel is dropped)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = [np.asarray(image) for image in images]
    else:
        items = [np.asarray(images)]
    out = []
    for i, image in enumerate(items):
        if image.dtype != np.uint8:
            raise ValueError(
                f"Image {i} has dtype {image.dtype}; predict takes uint8 pixels (0..255) as read from an image file. "
                "Convert with np.clip(x, 0, 255).astype(np.uint8) (x * 255 first if it is in [0, 1])."
            )
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"Image {i} has shape {image.shape}; expected (H, W), (H, W, 3) or (H, W, 4).")
        out.append(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3])
    return out


def fold_preprocessing(data_cfg: ml_collections.ConfigDict, preprocessing: dict[str, Any]) -> str:
    """Sets ``mean_rgb``/``std_rgb`` (0..255 RGB) of ``data_cfg`` from a converted network's
    preprocessing (``convert.data_normalization``); returns its channel order."""
    from vgg_jax.convert import data_normalization

    missing = [k for k in ("channel_order", "input_scale", "mean", "std") if k not in preprocessing]
    if missing or preprocessing["channel_order"] not in ("RGB", "BGR"):
        raise ValueError(
            f"meta['preprocessing'] = {preprocessing} needs channel_order ('RGB' or 'BGR'), input_scale, mean "
            f"and std; missing or wrong: {missing or ['channel_order']}. Re-run the conversion."
        )
    mean, std = data_normalization(preprocessing)
    data_cfg.mean_rgb, data_cfg.std_rgb = list(mean), list(std)
    return preprocessing["channel_order"]


def restore_model(path: str) -> tuple[models.VGG, dict[str, Any], dict[str, Any]]:
    """``(model, variables, meta)`` of the newest checkpoint under ``path`` (a training workdir, its
    checkpoints dir, a step dir, or converted weights): the model its meta config describes, with
    fc8's class count, checked against the stored parameters."""
    from vgg_jax import checkpoints

    meta = checkpoints.read_meta(path)
    if "model" not in meta.get("config", {}):
        raise ValueError(
            f"{checkpoints.find_checkpoint(path)} has no model config in its meta item: it was not written by "
            "vgg_jax.main or vgg_jax.convert, so the model cannot be rebuilt."
        )
    variables = checkpoints.restore_variables(path)
    num_classes = int(variables["params"]["fc8"]["bias"].shape[0])
    crop_size = meta["config"].get("data", {}).get("crop_size", models.VGG.crop_size)
    model = models.from_config(meta["config"]["model"], num_classes=num_classes, crop_size=crop_size)
    checkpoints.check_compatible(models.variable_shapes(model)["params"], variables["params"], str(path))
    return model, variables, meta


def load(path: str, batch_size: int = 32) -> Classifier:
    """Restores the newest checkpoint under ``path`` (a training workdir, its checkpoints dir, a
    step dir, or converted weights) with its config, class names and preprocessing."""
    from vgg_jax import data

    model, variables, meta = restore_model(path)
    data_cfg = data.default_data_config()  # defaults for the fields the checkpoint does not set
    data_cfg.update(meta["config"].get("data", {}))
    config = ml_collections.ConfigDict({k: v for k, v in meta["config"].items() if k != "data"})
    config.data = data_cfg
    channel_order = fold_preprocessing(data_cfg, meta["preprocessing"]) if meta.get("preprocessing") else "RGB"
    class_names = list(meta.get("class_names") or [str(i) for i in range(model.num_classes)])
    if len(class_names) != model.num_classes:
        raise ValueError(f"{path}: {len(class_names)} class names for {model.num_classes} outputs of fc8.")
    if not variables.get("batch_stats"):
        variables = {"params": variables["params"]}
    return Classifier(str(path), model, variables, config, class_names, channel_order, batch_size)
