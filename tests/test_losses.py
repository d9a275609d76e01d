"""vgg_jax.losses against float64 numpy loops and TensorFlow's total variation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from vgg_jax import losses, models


def numpy_gram(f: np.ndarray) -> np.ndarray:
    """Johnson et al. eq. 3, literally: sum over positions of outer products, / (C H W)."""
    n, h, w, c = f.shape
    g = np.zeros((n, c, c))
    for i in range(h):
        for j in range(w):
            g += np.einsum("nc,nd->ncd", f[:, i, j], f[:, i, j])
    return g / (c * h * w)


def random_features(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"relu1_1": rng.normal(size=(2, 6, 5, 3)), "relu2_1": rng.normal(size=(2, 3, 2, 4))}


def test_gram_matrix():
    np.testing.assert_allclose(losses.gram_matrix(jnp.ones((1, 2, 2, 3))), np.full((1, 3, 3), 4 / 12), rtol=1e-6)
    f = random_features(0)["relu1_1"]
    np.testing.assert_allclose(losses.gram_matrix(jnp.asarray(f, jnp.float32)), numpy_gram(f), rtol=1e-5, atol=1e-6)


def test_feature_reconstruction_and_style_losses():
    x, y = random_features(1), random_features(2)
    weights = {"relu1_1": 0.3, "relu2_1": 2.0}
    expected_content = sum(
        w * np.mean([np.sum((x[k][i] - y[k][i]) ** 2) / x[k][i].size for i in range(2)]) for k, w in weights.items()
    )
    target_grams = {k: numpy_gram(y[k][:1])[0] for k in weights}  # one style image, broadcast over the batch
    expected_style = sum(
        w * np.mean([np.sum((numpy_gram(x[k])[i] - target_grams[k]) ** 2) for i in range(2)])
        for k, w in weights.items()
    )
    as32 = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}  # noqa: E731
    content = jax.jit(losses.feature_reconstruction_loss)(as32(x), as32(y), weights)
    style = jax.jit(losses.style_loss)(as32(x), as32(target_grams), weights)
    np.testing.assert_allclose(content, expected_content, rtol=1e-5)
    np.testing.assert_allclose(style, expected_style, rtol=1e-4)

    # Gatys et al.'s E_l (unnormalised Gram, 1 / (4 C^2 M^2)) is the style loss / 4.
    f, a = x["relu2_1"][:1], y["relu2_1"][:1]
    c, m = f.shape[-1], f.shape[1] * f.shape[2]
    fm, am = f.reshape(m, c).T, a.reshape(m, c).T
    gatys = np.sum((fm @ fm.T - am @ am.T) ** 2) / (4 * c**2 * m**2)
    ours = losses.style_loss(
        {"l": jnp.asarray(f, jnp.float32)}, {"l": losses.gram_matrix(jnp.asarray(a, jnp.float32))}, {"l": 1.0}
    )
    np.testing.assert_allclose(ours / 4, gatys, rtol=1e-4)


def test_total_variation_matches_tensorflow():
    x = np.random.default_rng(3).uniform(size=(3, 7, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(
        losses.total_variation(jnp.asarray(x)), np.mean(tf.image.total_variation(tf.constant(x))), rtol=1e-5
    )


@pytest.fixture(scope="module")
def tiny_vgg():
    """He-scaled random weights from numpy (jax.random's per-shape compiles are slow on CPU)."""
    model = models.get_model("vgg19", num_classes=3, width=4, fc_width=8, crop_size=32)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape, scale=np.sqrt(2 / np.prod(s.shape[:-1])) if len(s.shape) == 4 else 0.1),
        models.variable_shapes(model)["params"],
    )
    return model, {"params": jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)}


def test_perceptual_loss_through_the_network(tiny_vgg):
    model, variables = tiny_vgg
    rng = np.random.default_rng(4)
    x, y = (jnp.asarray(rng.normal(size=(2, 40, 36, 3)), jnp.float32) for _ in range(2))
    weights = {"relu2_2": 1.0, "relu4_1": 0.5, "pool5": 0.1}
    loss_fn = jax.jit(lambda a, b: losses.perceptual_loss(model, variables, a, b, weights))
    fx = models.extract_features(model, variables, x, weights)
    fy = models.extract_features(model, variables, y, weights)
    expected = sum(
        w * np.mean((np.asarray(fx[k], np.float64) - np.asarray(fy[k], np.float64)) ** 2) for k, w in weights.items()
    )
    assert expected > 0
    np.testing.assert_allclose(loss_fn(x, y), expected, rtol=1e-4)
    assert float(loss_fn(x, x)) == 0.0
    grad_x, grad_y = jax.grad(lambda a, b: loss_fn(a, b), argnums=(0, 1))(x, y)
    assert float(jnp.abs(grad_x).max()) > 0 and float(jnp.abs(grad_y).max()) == 0.0  # targets are constants
