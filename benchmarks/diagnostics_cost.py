"""What ``diagnostics.every_steps`` costs: one ``layer_statistics`` call against one train step, same process.

python -m benchmarks.diagnostics_cost [REPEATS]  (configs/demo.py's model and batch); docs/benchmarks.md
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from configs import demo
from vgg_jax import diagnostics, models, optim, sharding
from vgg_jax.train_step import abstract_train_state, create_train_state, jit_train_step


def main(repeats: int = 20) -> None:
    config = demo.get_config()
    model = models.from_config(config.model, num_classes=10, crop_size=config.data.crop_size)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    mesh = sharding.make_mesh(1)
    _, shardings = abstract_train_state(model, tx, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    state = jax.jit(lambda r: create_train_state(model, tx, r), out_shardings=shardings)(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    n, c = config.global_batch_size, config.data.crop_size
    batch = sharding.to_global(
        {"image": rng.normal(0, 60, (n, c, c, 3)).astype(np.float32), "label": rng.integers(0, 10, n).astype(np.int32)},
        mesh,
    )
    step_fn = jit_train_step(shardings, batch_sharding)
    stats_fn = diagnostics.jit_layer_statistics(shardings, batch_sharding)
    state, _ = step_fn(state, batch)  # compile both
    jax.block_until_ready(stats_fn(state, batch))
    times = {"train step": [], "layer_statistics": []}
    for _ in range(repeats):  # interleaved, so that both see the same machine load
        started = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        times["train step"].append(time.perf_counter() - started)
        started = time.perf_counter()
        jax.block_until_ready(stats_fn(state, batch))
        times["layer_statistics"].append(time.perf_counter() - started)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: median {1e3 * v:.1f} ms over {repeats}")
    print(f"ratio: {med['layer_statistics'] / med['train step']:.2f} (every_steps=K adds this / K to a step)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
