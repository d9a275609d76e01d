"""Input conventions: the pixels a network expects (RGB on [0, scale], mean/std, resize arithmetic).

docs/backbone.md#input-conventions
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

# Mean RGB of the ImageNet training set as the VGG Caffe release subtracts it (0..255; the paper,
# Sect. 2.1: "subtracting the mean RGB value, computed on the training set, from each pixel").
IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
# How the shorter-side rescale rounds the long side: 'round' (this project, as tf.image.resize
# callers usually do) or 'torchvision' (torchvision.transforms.Resize truncates the long side,
# int(size * long / short), and CenterCrop rounds its offset, int(round((h - crop) / 2))).
RESIZE_RULES = ("round", "torchvision")


@dataclasses.dataclass(frozen=True)
class InputConvention:
    """RGB images scaled to ``[0, input_scale]``, then ``(x - mean) / std`` per channel.

    Every checkpoint of this project takes RGB: weights of BGR networks (Keras, Caffe) are flipped
    at conversion, so the channel order is not a setting.
    """

    input_scale: float = 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN_RGB
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    resize: str = "round"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "input_scale", float(self.input_scale))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0 or self.input_scale <= 0:
            raise ValueError(
                f"mean and std need 3 values, std > 0, and input_scale > 0; got mean {self.mean}, "
                f"std {self.std}, input_scale {self.input_scale}."
            )
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"resize must be one of {RESIZE_RULES}, got {self.resize!r}.")

    @property
    def mean_rgb(self) -> tuple[float, float, float]:
        """The mean on the 0..255 scale (the data config's ``mean_rgb``)."""
        return tuple(m * 255.0 / self.input_scale for m in self.mean)

    @property
    def std_rgb(self) -> tuple[float, float, float]:
        """The std on the 0..255 scale (the data config's ``std_rgb``)."""
        return tuple(s * 255.0 / self.input_scale for s in self.std)

    def normalize(self, images: Any) -> Any:
        """Network input from RGB images on 0..255 (numpy or jax, channels last)."""
        x = images * (self.input_scale / 255.0)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def data_fields(self) -> dict[str, Any]:
        """The data-config fields that apply this convention in the input pipeline."""
        return {"mean_rgb": self.mean_rgb, "std_rgb": self.std_rgb, "resize": self.resize}

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any]) -> InputConvention:
        """The convention a data config applies (its 0..255 ``mean_rgb`` / ``std_rgb``)."""
        return cls(255.0, data_config["mean_rgb"], data_config["std_rgb"], data_config.get("resize", "round"))

    def to_meta(self) -> dict[str, Any]:
        return {"input_scale": self.input_scale, "mean": list(self.mean), "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_meta(cls, record: Mapping[str, Any]) -> InputConvention:
        """From a checkpoint's ``meta['preprocessing']``."""
        if record.get("channel_order", "RGB") != "RGB":
            raise ValueError(
                f"meta['preprocessing'] = {dict(record)} asks for {record['channel_order']!r} input; checkpoints of "
                "this project take RGB (conversion flips conv1_1 of BGR networks). Re-run the conversion."
            )
        missing = [k for k in ("input_scale", "mean", "std") if k not in record]
        if missing:
            raise ValueError(f"meta['preprocessing'] = {dict(record)} lacks {missing}. Re-run the conversion.")
        return cls(record["input_scale"], record["mean"], record["std"], record.get("resize", "round"))

    def resized_size(self, height: int, width: int, size: int) -> tuple[int, int]:
        """(height, width) after rescaling the shorter side to ``size`` (integers, as the pipeline)."""
        short = min(height, width)
        if self.resize == "torchvision":
            return (size * height // short, size * width // short)
        return (max(round(height * size / short), size), max(round(width * size / short), size))

    def crop_offset(self, size: int, crop: int) -> int:
        """Top (or left) of a centred ``crop`` in a side of ``size`` pixels."""
        return int(round((size - crop) / 2.0)) if self.resize == "torchvision" else (size - crop) // 2


# The conventions of published weights (``python -m vgg_jax.convert`` stores the one of its input).
PRESETS: dict[str, InputConvention] = {
    # torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms(): Resize(256), CenterCrop(224), [0, 1].
    "torchvision": InputConvention(1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "torchvision"),
    # Caffe release and keras.applications (BGR mean [103.939, 116.779, 123.68], reordered to RGB).
    "caffe": InputConvention(),
}


def of_checkpoint(meta: Mapping[str, Any]) -> InputConvention:
    """A checkpoint's convention: converted weights' ``preprocessing``, else its run's data config."""
    if meta.get("preprocessing"):
        return InputConvention.from_meta(meta["preprocessing"])
    return InputConvention.from_data_config(meta["config"]["data"])
