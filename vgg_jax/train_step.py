"""The train state and the pure ``train_step(state, batch) -> (state, metrics)``."""

# No `from __future__ import annotations`: clu metric Collections read their annotations.
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from flax.training import train_state

from vgg_jax import models, optim, sharding


class TrainState(train_state.TrainState):
    """Params, optimizer state and step (flax), plus BN statistics and the dropout key."""

    batch_stats: Any = flax.struct.field(default_factory=dict)
    dropout_rng: jax.Array | None = None


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    # Top-1 / top-5 error in percent on the training batches: the paper's unit, as the evaluations report it.
    top1_error: metrics.Average.from_output("top1_error")
    top5_error: metrics.Average.from_output("top5_error")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    # 1.0 when every merged step had a finite loss and gradient.
    finite: metrics.Average.from_output("finite")


def create_train_state(
    model: models.VGG, tx: optax.GradientTransformation, rng: jax.Array, params: Any | None = None
) -> TrainState:
    """A fresh state (``params`` given: start from them, e.g. staged init or fine-tuning)."""
    init_rng, dropout_rng = jax.random.split(rng)
    variables = models.init_variables(model, init_rng)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"] if params is None else params,
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        dropout_rng=dropout_rng,
    )


def abstract_train_state(
    model: models.VGG, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, shard_fc: bool = False
) -> tuple[TrainState, Any]:
    """The state's shapes placed on ``mesh`` (``ShapeDtypeStruct`` with shardings), and the shardings."""
    abstract = jax.eval_shape(lambda rng: create_train_state(model, tx, rng), jax.random.PRNGKey(0))
    shardings = sharding.state_shardings(mesh, abstract, shard_fc)
    placed = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return placed, shardings


def topk_correct(scores: jax.Array | np.ndarray, labels: jax.Array | np.ndarray, k: int) -> jax.Array | np.ndarray:
    """1.0 where the label is among the k highest scores, per example; of equal scores the lower class
    index ranks first. Numpy input (e.g. float64 posteriors averaged on the host) stays numpy."""
    if isinstance(scores, np.ndarray):
        top = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
        return (top == np.asarray(labels)[:, None]).any(axis=-1).astype(np.float32)
    _, top = jax.lax.top_k(scores, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _loss_and_grads(apply_fn, params: Any, batch_stats: Any, images, labels, rng):
    def loss_fn(p):
        variables = {"params": p} | ({"batch_stats": batch_stats} if batch_stats else {})
        logits, updates = apply_fn(
            variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"] if batch_stats else []
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates.get("batch_stats", batch_stats))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, new_stats, grads


def _gradients(apply_fn, params: Any, batch_stats: Any, images, labels, rng, accum_steps: int):
    """Loss, logits, new BN statistics and the gradient of a batch, averaged over ``accum_steps`` micro-batches."""
    if accum_steps == 1:
        return _loss_and_grads(apply_fn, params, batch_stats, images, labels, rng)

    # Example i of micro-batch m is batch[i * accum + m]: each device keeps its own examples.
    def split(x):
        return jnp.moveaxis(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 1, 0)

    def micro(carry, xs):
        grads_sum, stats = carry
        step_images, step_labels, m = xs
        loss, logits, stats, grads = _loss_and_grads(
            apply_fn, params, stats, step_images, step_labels, jax.random.fold_in(rng, m)
        )
        return (jax.tree_util.tree_map(jnp.add, grads_sum, grads), stats), (loss, logits)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (grads, new_stats), (losses, logits) = jax.lax.scan(
        micro, (zeros, batch_stats), (split(images), split(labels), jnp.arange(accum_steps))
    )
    grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grads)
    return losses.mean(), logits.swapaxes(0, 1).reshape(labels.shape[0], -1), new_stats, grads


def _gradients_reduced_in_float32(mesh: jax.sharding.Mesh, apply_fn, params, batch_stats, images, labels, rng, accum):
    """``_gradients`` with each device's gradient of its share of the batch summed over the data axis in float32.

    Under jit alone, XLA's partitioner all-reduces a weight gradient where the convolution or matmul that
    makes it ends: in bfloat16 when the model computes in bfloat16. Here each device computes the gradient of
    its own examples (shard_map, manual over ``data``; the ``model`` axis stays automatic), in float32 as the
    parameters are, and the mean over devices is a float32 ``pmean``. Dropout draws from the step's key folded
    with the device.
    """
    data = sharding.DATA

    def local(params, batch_stats, images, labels, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(data))
        # Differentiate with respect to this device's copy: otherwise JAX sums the gradient of a replicated
        # input over the devices itself, in the gradient's own type (bfloat16).
        params = jax.lax.pcast(params, data, to="varying")
        loss, logits, new_stats, grads = _gradients(apply_fn, params, batch_stats, images, labels, rng, accum)
        # The gradient of the float32 parameters is float32 (each layer's ends in a cast from its compute type).
        grads = jax.tree_util.tree_map(lambda g: jax.lax.pmean(g, data), grads)
        return jax.lax.pmean(loss, data), logits, jax.lax.pmean(new_stats, data), grads

    P = jax.sharding.PartitionSpec
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(data), P(data), P()),
        out_specs=(P(), P(data), P(), P()),
        axis_names={data},
    )(params, batch_stats, images, labels, rng)


def train_step(
    state: TrainState, batch: dict[str, jax.Array], accum_steps: int = 1, float32_reduce_mesh: Any = None
) -> tuple[TrainState, TrainMetrics]:
    """One SGD step on a global batch, the gradient averaged over ``accum_steps`` micro-batches.

    ``float32_reduce_mesh``: the run's mesh, to all-reduce the gradients in float32 (``mesh.grad_reduce_dtype``;
    ``_gradients_reduced_in_float32``). A step whose loss or gradient is not finite leaves the state unchanged;
    ``metrics.finite`` is then 0 and the training loop stops with an error naming the step.
    """
    rng = jax.random.fold_in(state.dropout_rng, state.step)
    args = (state.apply_fn, state.params, state.batch_stats, batch["image"], batch["label"], rng, accum_steps)
    if float32_reduce_mesh is None:
        loss, logits, new_stats, grads = _gradients(*args)
    else:
        loss, logits, new_stats, grads = _gradients_reduced_in_float32(float32_reduce_mesh, *args)
    labels = batch["label"]

    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    # A branch, not where(finite, new, old): no extra pass over the parameters and momentum.
    new_state = jax.lax.cond(
        finite, lambda s: s.apply_gradients(grads=grads, batch_stats=new_stats), lambda s: s, state
    )
    step_metrics = TrainMetrics.single_from_model_output(
        loss=loss,
        top1_error=100.0 * (1.0 - topk_correct(logits, labels, 1)),
        top5_error=100.0 * (1.0 - topk_correct(logits, labels, min(5, logits.shape[-1]))),
        learning_rate=optim.current_learning_rate(state.opt_state),
        finite=finite.astype(jnp.float32),
    )
    return new_state, step_metrics


# XLA:CPU gives convolutions to YNNPACK by default, whose kernel-gradient convolutions (a window
# the size of the image) run several times slower than Eigen's; on CPU the step keeps YNNPACK for
# dots and reductions only. XLA:CPU also drops jax.checkpoint's optimization barriers before its
# last CSE, which then merges the recomputation back into the forward pass: the barriers stay, so
# that the model's ``remat`` saves memory (docs/performance.md). A setting in XLA_FLAGS wins.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
    "xla_disable_hlo_passes": "cse_barrier_expander",
}


def compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """XLA options for the train step on ``platform`` (default: the default backend): ``CPU_COMPILER_OPTIONS``
    on CPU, none elsewhere."""
    if (platform or jax.default_backend()) != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in CPU_COMPILER_OPTIONS.items() if k not in flags} or None


def jit_train_step(state_shardings: Any, batch_sharding: Any, accum_steps: int = 1, reduce_dtype: str = "compute"):
    """``train_step`` under jit: state and batch placed by the given shardings, state donated; compiled for
    the platform of the batch's devices (a TPU topology's too, on a machine without one). ``reduce_dtype``:
    ``mesh.grad_reduce_dtype``, 'float32' to all-reduce the gradients in float32."""
    platform = next(iter(batch_sharding.device_set)).platform
    mesh = batch_sharding.mesh if reduce_dtype == "float32" else None
    return jax.jit(
        functools.partial(train_step, accum_steps=accum_steps, float32_reduce_mesh=mesh),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
        compiler_options=compiler_options(platform),
    )
