"""Perceptual losses on VGG features (Johnson et al., ECCV 2016): feature reconstruction, Gram-matrix
style, total variation. docs/backbone.md#perceptual-and-style-losses-vgg_jaxlossespy
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vgg_jax import models


def gram_matrix(features: jax.Array) -> jax.Array:
    """``(N, H, W, C) -> (N, C, C)`` Gram matrices normalised by ``C * H * W`` (float32)."""
    n, h, w, c = features.shape
    flat = features.reshape(n, h * w, c).astype(jnp.float32)
    return jnp.einsum("npc,npd->ncd", flat, flat) / (c * h * w)


def feature_reconstruction_loss(
    features: Mapping[str, jax.Array], targets: Mapping[str, jax.Array], weights: Mapping[str, float]
) -> jax.Array:
    """``sum_l w_l * mean_n ||phi_l(x_n) - phi_l(y_n)||^2 / (C H W)``; targets broadcast over the batch."""
    return sum(
        w * jnp.mean(jnp.square(features[layer].astype(jnp.float32) - targets[layer].astype(jnp.float32)))
        for layer, w in weights.items()
    )


def style_loss(
    features: Mapping[str, jax.Array], target_grams: Mapping[str, jax.Array], weights: Mapping[str, float]
) -> jax.Array:
    """``sum_l w_l * mean_n ||G_l(x_n) - G_l(y)||_F^2``; ``target_grams[layer]`` is (C, C) or (N, C, C)."""
    return sum(
        w * jnp.mean(jnp.sum(jnp.square(gram_matrix(features[layer]) - target_grams[layer]), axis=(-2, -1)))
        for layer, w in weights.items()
    )


def total_variation(images: jax.Array) -> jax.Array:
    """Mean over the batch of the summed absolute differences of neighbouring pixels
    (``tf.image.total_variation``, averaged): a smoothness prior for generated images."""
    dh = jnp.abs(images[:, 1:, :, :] - images[:, :-1, :, :]).sum(axis=(1, 2, 3))
    dw = jnp.abs(images[:, :, 1:, :] - images[:, :, :-1, :]).sum(axis=(1, 2, 3))
    return jnp.mean(dh + dw)


def perceptual_loss(
    model: models.VGG,
    variables: Mapping[str, jax.Array],
    images: jax.Array,
    targets: jax.Array,
    weights: Mapping[str, float],
) -> jax.Array:
    """Feature-reconstruction loss between two batches of (normalised) images in one VGG pass.

    Gradients flow to ``images`` only; e.g. ``weights={'relu2_2': 1.0}`` is Johnson et al.'s
    super-resolution loss. Jit with ``model`` and ``weights`` closed over.
    """
    both = jnp.concatenate([images, jax.lax.stop_gradient(targets)])
    features = models.extract_features(model, variables, both, weights)
    n = images.shape[0]
    return feature_reconstruction_loss(
        {layer: f[:n] for layer, f in features.items()}, {layer: f[n:] for layer, f in features.items()}, weights
    )
