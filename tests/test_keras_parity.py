"""Numerical parity with an independent implementation: keras.applications.VGG16 / VGG19 (TF backend)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax.numpy as jnp
import keras
import numpy as np
import pytest

from vgg_jax import convert, models


@pytest.mark.parametrize("name,keras_cls", [("vgg16", "VGG16"), ("vgg19", "VGG19")])
def test_logits_match_keras(name, keras_cls):
    keras.utils.set_random_seed(0)
    reference = getattr(keras.applications, keras_cls)(weights=None, classifier_activation=None)
    model = models.get_model(name)
    params = convert.from_keras(reference, model)
    # Keras' glorot-initialised weights, scaled so activations neither vanish nor explode over 16-19 layers.
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    expected = np.asarray(reference(x, training=False), np.float64)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(x)), np.float64)
    assert np.abs(expected).max() > 1e-3, "degenerate reference logits"
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 1e-4
    # The same weights, run fully convolutionally, give a 1x1 map equal to the logits.
    dense = np.asarray(model.apply({"params": params}, jnp.asarray(x[:1]), dense=True))
    np.testing.assert_allclose(dense[0, 0, 0], ours[0], rtol=1e-4, atol=1e-5 * np.abs(ours).max())
