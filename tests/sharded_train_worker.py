"""Subprocess worker: a few sharded train steps of a tiny VGG on fixed global batches.

Run as ``python sharded_train_worker.py OUT --devices N [--model_axis M] [--accum K] [--reduce float32]
[--process_id I --num_processes P --port PORT]``. Every process feeds its slice of the same global batches, so
the result must not depend on the device or process layout. Process 0 writes the final params
to OUT (npz).
"""

from __future__ import annotations

import argparse
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, required=True, help="local CPU devices of this process")
parser.add_argument("--model_axis", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--num_processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--accum", type=int, default=1)
parser.add_argument("--plain", action="store_true", help="vgg11 without dropout instead of vgg11_bn")
parser.add_argument("--reduce", default="compute", help="mesh.grad_reduce_dtype")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if args.num_processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from vgg_jax import models, optim, sharding  # noqa: E402
from vgg_jax.train_step import create_train_state, jit_train_step  # noqa: E402

GLOBAL_BATCH, CROP, CLASSES = 16, 32, 10

model = models.get_model(
    "vgg11" if args.plain else "vgg11_bn",
    num_classes=CLASSES,
    width=4,
    fc_width=32,
    crop_size=CROP,
    init_scheme="he",
    dropout_rate=0.0 if args.plain else 0.5,
)
opt_cfg = ml_collections.ConfigDict(
    dict(
        learning_rate=0.01,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        decay_biases=False,
        schedule="constant",
        trainable=".*",
    )
)
tx = optim.make_optimizer(opt_cfg, args.steps)
mesh = sharding.make_mesh(args.model_axis)
abstract = jax.eval_shape(lambda r: create_train_state(model, tx, r), jax.random.PRNGKey(0))
shardings = sharding.state_shardings(mesh, abstract, shard_fc=args.model_axis > 1)
state = jax.jit(lambda r: create_train_state(model, tx, r), out_shardings=shardings)(jax.random.PRNGKey(0))
step = jit_train_step(shardings, sharding.batch_sharding(mesh), accum_steps=args.accum, reduce_dtype=args.reduce)

local = sharding.split_batch(GLOBAL_BATCH, num_processes=jax.process_count(), num_devices=mesh.shape[sharding.DATA])
lo = jax.process_index() * local
for i in range(args.steps):
    rng = np.random.default_rng(i)
    images = rng.normal(size=(GLOBAL_BATCH, CROP, CROP, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=GLOBAL_BATCH).astype(np.int32)
    batch = sharding.to_global({"image": images[lo : lo + local], "label": labels[lo : lo + local]}, mesh)
    state, metrics = step(state, batch)
    assert float(metrics.finite.total) == 1.0

if args.model_axis > 1:
    fc6 = state.params["fc6"]["kernel"]
    assert fc6.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "model"), fc6.sharding
    print("fc6 shard shape", fc6.addressable_shards[0].data.shape, file=sys.stderr)
flat = jax.tree_util.tree_flatten_with_path({"params": state.params, "batch_stats": state.batch_stats})[0]
arrays = {jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True)) for p, x in flat}
if jax.process_index() == 0:
    np.savez(args.out, **arrays)
