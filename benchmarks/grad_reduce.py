"""What all-reducing gradients in bfloat16 instead of float32 does to training (mesh.grad_reduce_dtype).

XLA:CPU promotes a bfloat16 all-reduce to float32 (its AllReducePromotion pass), so simulated CPU devices
cannot show the bfloat16 sum; this script emulates it. Each of D devices computes the gradient of its share
of the global batch with the bfloat16 model (vmapped over the devices); ``float32`` averages them in float32,
``bfloat16`` sums them in bfloat16 in ring order (each partial sum rounded to bfloat16, the D - 1 roundings of
a ring all-reduce's reduce-scatter), as a bfloat16 all-reduce does at worst. ``float32, seed+1`` changes only
the dropout masks: the run-to-run variation SGD has anyway. The recipe is the paper's (SGD, momentum 0.9,
learning rate 1e-2, weight decay 5e-4, dropout 0.5, batch 256; Glorot initialisation) on VGG-11 (A) at
reduced size, on the built-in demo images resized to 32 x 32.

    python benchmarks/grad_reduce.py --devices=64,256 --steps=300

Results: docs/training.md#the-gradient-all-reduce.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import default  # noqa: E402
from vgg_jax import models, optim  # noqa: E402
from vgg_jax.data import demo  # noqa: E402
from vgg_jax.train_step import _loss_and_grads, create_train_state  # noqa: E402


def demo_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` demo images (balanced classes) resized to ``size``, standardised per channel, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(demo.CLASS_NAMES)

    def small(image: np.ndarray) -> np.ndarray:  # the centre square, box-filtered down to size x size
        h, w = image.shape[:2]
        s = min(h, w)
        square = image[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
        return np.asarray(Image.fromarray(square).resize((size, size), Image.BOX))

    images = np.stack([small(demo.render(int(y), rng)) for y in labels]).astype(np.float32) / 255.0
    images = (images - images.mean((0, 1, 2))) / images.std((0, 1, 2))
    return images, labels.astype(np.int32)


def bf16_ring_sum(grads: jax.Array) -> jax.Array:
    """Sum over the leading (device) axis with every partial sum rounded to bfloat16."""
    g = grads.astype(jnp.bfloat16)
    total, _ = jax.lax.scan(lambda acc, x: ((acc + x).astype(jnp.bfloat16), None), g[0], g[1:])
    return total.astype(jnp.float32)


def run(devices: int, steps: int, reduce: str, seed: int, data: tuple[np.ndarray, np.ndarray], batch: int = 256):
    config = default.get_config()
    config.model.update(name="A", width=8, fc_width=64, dtype="bfloat16", init_scheme="glorot")
    config.optimizer.schedule = "constant"
    model = models.from_config(dict(config.model), num_classes=len(demo.CLASS_NAMES), crop_size=32)
    state = create_train_state(model, optim.make_optimizer(config.optimizer, steps), jax.random.PRNGKey(0))
    images, labels = data

    @jax.jit
    def step(state, x, y, key):
        per = batch // devices
        xs, ys = x.reshape(devices, per, *x.shape[1:]), y.reshape(devices, per)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(devices))
        loss, _, _, grads = jax.vmap(lambda a, b, k: _loss_and_grads(state.apply_fn, state.params, {}, a, b, k))(
            xs, ys, keys
        )
        if reduce == "bfloat16":
            mean = jax.tree_util.tree_map(lambda g: bf16_ring_sum(g) / devices, grads)
        else:
            mean = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32).mean(0), grads)
        exact = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32).mean(0), grads)
        error = optax_norm(jax.tree_util.tree_map(jnp.subtract, mean, exact)) / optax_norm(exact)
        return state.apply_gradients(grads=mean), loss.mean(), error

    losses, errors, snapshots = [], [], {}
    order = np.random.default_rng(1).permutation(len(labels))
    for i in range(steps):
        idx = order[(i * batch) % len(labels) :][:batch]
        if len(idx) < batch:
            idx = np.concatenate([idx, order[: batch - len(idx)]])
        state, loss, error = step(state, images[idx], labels[idx], jax.random.PRNGKey(1000 * seed + i))
        losses.append(float(loss))
        errors.append(float(error))
        if (i + 1) % (steps // 3) == 0:
            snapshots[i + 1] = jax.tree_util.tree_map(np.asarray, state.params)
    print(f"  {devices} devices, {reduce}, seed {seed}: loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return np.array(losses), np.array(errors), snapshots


def optax_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def distance(a, b) -> float:
    flat = [(np.ravel(x), np.ravel(y)) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
    diff = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in flat))
    return float(diff / np.sqrt(sum(np.sum(x**2) for x, _ in flat)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="64,256")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=2560)
    args = parser.parse_args()
    started = time.time()
    data = demo_images(args.images, 32)
    print(f"{args.images} demo images at 32 x 32 in {time.time() - started:.0f} s", flush=True)
    print(
        "| devices | per device | reduction | loss, mean of the last 50 steps | gradient error vs float32 sum "
        "(mean, max) | parameters vs float32, relative, at steps "
        + " / ".join(str(args.steps * k // 3) for k in (1, 2, 3))
        + " |",
        flush=True,
    )
    print("|---|---|---|---|---|---|", flush=True)
    for devices in [int(d) for d in args.devices.split(",")]:
        base_losses, _, base = run(devices, args.steps, "float32", 0, data)
        rows = [("float32", base_losses, None, base)]
        for name, reduce, seed in (("bfloat16 (ring)", "bfloat16", 0), ("float32, seed+1", "float32", 1)):
            losses, errors, snaps = run(devices, args.steps, reduce, seed, data)
            rows.append((name, losses, errors, snaps))
        for name, losses, errors, snaps in rows:
            err = "-" if errors is None else f"{errors.mean():.2e}, {errors.max():.2e}"
            dist = " / ".join(f"{distance(snaps[s], base[s]):.2e}" for s in sorted(snaps))
            print(f"| {devices} | {256 // devices} | {name} | {losses[-50:].mean():.4f} | {err} | {dist} |", flush=True)
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
