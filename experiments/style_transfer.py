"""Neural style transfer (Gatys, Ecker & Bethge, CVPR 2016) with VGG-19 features.

``python -m experiments.style_transfer --weights=CKPT --content=photo.jpg --style=painting.jpg --out=x.png``;
docs/backbone.md#style-transfer
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from PIL import Image

from vgg_jax import checkpoints, cli, losses, models, preprocessing, storage
from vgg_jax.errors import UserError

CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def load_image(path: str, size: int) -> np.ndarray:
    """An RGB image as float32 (1, H, W, 3) in [0, 1], its shorter side resized to ``size``."""
    image = Image.open(io.BytesIO(storage.path(path).read_bytes())).convert("RGB")  # local or gs://
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return (np.asarray(image, np.float32) / 255.0)[None]


def _image_format(suffix: str) -> str:
    """PIL's format for a file suffix ('.png' -> 'PNG'), as ``Image.save(path)`` would pick it."""
    formats = Image.registered_extensions()
    if suffix.lower() not in formats:
        raise UserError(f"--out must end in an image suffix PIL writes (.png, .jpg, ...), not {suffix!r}.")
    return formats[suffix.lower()]


def style_layer_weights(model: models.VGG, style_weight: float) -> dict[str, float]:
    """``style_weight / C_l^2`` per style layer: the tutorial's mean over Gram entries as a sum."""
    channels = {f"relu{b}_1": model.block_features(b) for b in range(1, 6)}
    return {layer: style_weight / channels[layer] ** 2 for layer in STYLE_LAYERS}


def stylize(
    model: models.VGG,
    variables: Mapping[str, Any],
    convention: preprocessing.InputConvention,
    content: np.ndarray,
    style: np.ndarray,
    *,
    steps: int,
    learning_rate: float = 0.02,
    content_weight: float = 1.0,
    style_weight: float = 1e6,
    tv_weight: float = 0.0,
) -> tuple[np.ndarray, list[float]]:
    """Returns the stylised image (1, H, W, 3) in [0, 1] and the total loss before each step and at the end."""
    content_weights = {layer: content_weight for layer in CONTENT_LAYERS}
    style_weights = style_layer_weights(model, style_weight)
    layers = [*CONTENT_LAYERS, *STYLE_LAYERS]

    def features(image: jax.Array) -> dict[str, jax.Array]:
        return models.extract_features(model, variables, convention.normalize(image * 255.0), layers)

    jitted_features = jax.jit(features)
    content_targets = jitted_features(jnp.asarray(content))
    style_grams = {k: losses.gram_matrix(v) for k, v in jitted_features(jnp.asarray(style)).items()}

    def loss_fn(image: jax.Array) -> jax.Array:
        f = features(image)
        return (
            losses.feature_reconstruction_loss(f, content_targets, content_weights)
            + losses.style_loss(f, style_grams, style_weights)
            + tv_weight * losses.total_variation(image)
        )

    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(image: jax.Array, opt_state: Any) -> tuple[jax.Array, Any, jax.Array]:
        loss, grad = jax.value_and_grad(loss_fn)(image)
        updates, opt_state = optimizer.update(grad, opt_state)
        return jnp.clip(optax.apply_updates(image, updates), 0.0, 1.0), opt_state, loss

    image = jnp.asarray(content)
    opt_state = optimizer.init(image)
    history = []
    for _ in range(steps):
        image, opt_state, loss = step(image, opt_state)
        history.append(float(loss))
    history.append(float(jax.jit(loss_fn)(image)))
    return np.asarray(image), history


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string(
        "weights", None, "Converted VGG-19 checkpoint (python -m vgg_jax.convert).", required=True, flag_values=values
    )
    flags.DEFINE_string("content", None, "Content image.", required=True, flag_values=values)
    flags.DEFINE_string("style", None, "Style image.", required=True, flag_values=values)
    flags.DEFINE_string("out", None, "Output image (.png, .jpg).", required=True, flag_values=values)
    flags.DEFINE_integer("size", 384, "Shorter side of both images (>= the crop size).", flag_values=values)
    flags.DEFINE_integer("steps", 300, "Adam steps.", flag_values=values)
    flags.DEFINE_float("learning_rate", 0.02, "Adam's learning rate.", flag_values=values)
    flags.DEFINE_float("content_weight", 1.0, "Weight of the relu4_2 feature loss.", flag_values=values)
    flags.DEFINE_float(
        "style_weight", 1e6, "Weight of the Gram losses (lower by ~1e3 for Caffe/Keras weights).", flag_values=values
    )
    flags.DEFINE_float("tv_weight", 0.0, "Weight of the total-variation prior.", flag_values=values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    values, rest = cli.parse(argv, define_flags, "python -m experiments.style_transfer", __doc__)
    if rest:
        cli.fail(f"unexpected arguments {rest}.")
    model, variables, meta = checkpoints.restore_model(values.weights)
    if values.size < model.crop_size:
        raise UserError(f"--size={values.size} is below the model's crop size {model.crop_size}: raise it.")
    image, history = stylize(
        model,
        variables,
        preprocessing.of_checkpoint(meta),
        load_image(values.content, values.size),
        load_image(values.style, values.size),
        steps=values.steps,
        learning_rate=values.learning_rate,
        content_weight=values.content_weight,
        style_weight=values.style_weight,
        tv_weight=values.tv_weight,
    )
    out = storage.path(values.out)
    encoded = io.BytesIO()
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8)).save(encoded, format=_image_format(out.suffix))
    out.write_bytes(encoded.getvalue())
    summary = {"out": values.out, "steps": values.steps, "initial_loss": history[0], "final_loss": history[-1]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    cli.run(main)
