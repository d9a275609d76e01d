"""Input conventions (vgg_jax.preprocessing): torchvision's Resize + CenterCrop arithmetic reproduced exactly,
in Python (predict) and in TensorFlow (the evaluation pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from vgg_jax import preprocessing
from vgg_jax.data import transforms


def torchvision_resize_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision.transforms.functional._compute_resized_output_size for an int ``size`` (torchvision
    0.2x, https://github.com/pytorch/vision/blob/main/torchvision/transforms/functional.py)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def torchvision_crop_offset(side: int, crop: int) -> int:
    """torchvision.transforms.functional.center_crop: ``int(round((image_height - crop_height) / 2.0))``."""
    return int(round((side - crop) / 2.0))


SIZES = [
    (335, 502),
    (375, 500),
    (500, 375),
    (333, 500),
    (256, 256),
    (300, 451),
    (1024, 769),
    (257, 1000),
    (481, 640),
    (427, 640),
    (640, 427),
    (338, 450),
]


@pytest.mark.parametrize("size", [224, 256, 384])
def test_torchvision_preset_reproduces_resize_and_center_crop(size):
    convention = preprocessing.PRESETS["torchvision"]
    differs = 0
    for h, w in SIZES:
        expected = torchvision_resize_size(h, w, size)
        assert convention.resized_size(h, w, size) == expected, (h, w)
        tf_size = transforms.shorter_side_size(tf.constant([h, w]), size, convention.resize).numpy()
        assert tuple(tf_size) == expected, (h, w)
        for side in expected:
            assert convention.crop_offset(side, 224) == torchvision_crop_offset(side, 224)
            assert int(transforms.center_offset(tf.constant(side), 224, convention.resize)) == torchvision_crop_offset(
                side, 224
            )
        differs += preprocessing.InputConvention().resized_size(h, w, size) != expected
    assert differs > 0  # the project's own rounding differs on some of these: the preset matters


def test_335x502_at_256_is_torchvision_383_not_384():
    assert preprocessing.PRESETS["torchvision"].resized_size(335, 502, 256) == (256, 383)
    assert preprocessing.InputConvention().resized_size(335, 502, 256) == (256, 384)


def test_presets_and_meta_round_trip():
    torchvision = preprocessing.PRESETS["torchvision"]
    assert preprocessing.InputConvention.from_meta(torchvision.to_meta()) == torchvision
    assert preprocessing.InputConvention.from_data_config(torchvision.data_fields()) == preprocessing.InputConvention(
        255.0, torchvision.mean_rgb, torchvision.std_rgb, "torchvision"
    )
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(
        preprocessing.InputConvention.from_data_config(torchvision.data_fields()).normalize(x),
        torchvision.normalize(x),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match="resize must be one of"):
        preprocessing.InputConvention(resize="floor")
    with pytest.raises(ValueError, match="std > 0"):
        preprocessing.InputConvention(std=(1.0, 0.0, 1.0))
