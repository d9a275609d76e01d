"""Neural style transfer (Gatys, Ecker & Bethge, CVPR 2016) with VGG-19 features.

The image itself is optimised with Adam (pixels in [0, 1], starting from the content image) to
match the content image's features at ``relu4_2`` and the style image's Gram matrices at
``relu1_1`` ... ``relu5_1`` (losses: ``vgg_jax.losses``, normalised as in Johnson et al. 2016),
plus an optional total-variation prior. Images are normalised as the checkpoint's ``preprocessing``
says, so torchvision, Keras and Caffe weights all work::

    python -m vgg_jax.convert --source=torchvision --model=vgg19 vgg19-dcbb9e9d.pth /tmp/vgg19
    python experiments/style_transfer.py --weights=/tmp/vgg19 --content=photo.jpg --style=painting.jpg \\
        --out=stylised.png [--size=384 --steps=300]

Default weights follow the PyTorch neural-style tutorial (content 1, style 1e6 on Gram MSEs, i.e.
``1e6 / C_l^2`` per layer here, where the style loss sums over the C x C Gram entries); they suit
torchvision's [0, 1]-scaled input. Caffe/Keras weights see 0..255 input, whose features are
~50x larger: lower ``--style_weight`` by about 1e3 for them. Images need sides of at least the
model's crop size (224). Prints a JSON summary (losses before and after) as its last line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from vgg_jax import convert, losses, models
from vgg_jax.load import restore_model

CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def load_image(path: str, size: int) -> np.ndarray:
    """An RGB image as float32 (1, H, W, 3) in [0, 1], its shorter side resized to ``size``."""
    image = Image.open(path).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return (np.asarray(image, np.float32) / 255.0)[None]


def style_layer_weights(model: models.VGG, style_weight: float) -> dict[str, float]:
    """``style_weight / C_l^2`` per style layer: the tutorial's mean over Gram entries as a sum."""
    channels = {f"relu{b}_1": model.block_features(b) for b in range(1, 6)}
    return {layer: style_weight / channels[layer] ** 2 for layer in STYLE_LAYERS}


def stylize(
    model: models.VGG,
    variables: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
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
        return models.extract_features(model, variables, convert.normalize(image * 255.0, preprocessing), layers)

    jitted_features = jax.jit(features)
    content_targets = jitted_features(jnp.asarray(content))
    style_grams = {k: losses.gram_matrix(v) for k, v in jitted_features(jnp.asarray(style)).items()}

    def loss_fn(image: jax.Array) -> jax.Array:
        f = features(image)
        return (losses.feature_reconstruction_loss(f, content_targets, content_weights)
                + losses.style_loss(f, style_grams, style_weights)
                + tv_weight * losses.total_variation(image))

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", required=True, help="converted VGG-19 checkpoint (python -m vgg_jax.convert)")
    parser.add_argument("--content", required=True)
    parser.add_argument("--style", required=True)
    parser.add_argument("--out", required=True, help="output image (.png, .jpg)")
    parser.add_argument("--size", type=int, default=384, help="shorter side of both images (>= the crop size)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning_rate", type=float, default=0.02)
    parser.add_argument("--content_weight", type=float, default=1.0)
    parser.add_argument("--style_weight", type=float, default=1e6)
    parser.add_argument("--tv_weight", type=float, default=0.0)
    args = parser.parse_args(argv)

    model, variables, meta = restore_model(args.weights)
    if args.size < model.crop_size:
        parser.error(f"--size {args.size} is below the model's crop size {model.crop_size}.")
    image, history = stylize(
        model, variables, convert.checkpoint_preprocessing(meta), load_image(args.content, args.size), load_image(args.style, args.size),
        steps=args.steps, learning_rate=args.learning_rate, content_weight=args.content_weight,
        style_weight=args.style_weight, tv_weight=args.tv_weight,
    )
    Image.fromarray(np.round(image[0] * 255).astype(np.uint8)).save(args.out)
    print(json.dumps({"out": args.out, "steps": args.steps, "initial_loss": history[0], "final_loss": history[-1]}))


if __name__ == "__main__":
    main()
