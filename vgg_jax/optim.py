"""The optimizer (paper Sect. 3.1: SGD, momentum, L2 weight decay) and its learning-rate schedules.

docs/training.md#optimizer-paper-sect-31
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(
    config: ml_collections.ConfigDict, num_steps: int, scale: float = 1.0
) -> optax.Schedule | float:
    """The step-wise part of the schedule (``plateau`` starts constant and is lowered on the host), times
    ``scale`` (the rollbacks' learning-rate factors)."""
    lr, kind = config.learning_rate * scale, config.schedule
    if kind in ("plateau", "constant"):
        return lr
    if kind == "step":
        boundaries = {int(b): config.decay_factor for b in config.step_boundaries}
        steps = optax.piecewise_constant_schedule(lr, boundaries)
        if not config.warmup_steps:
            return steps
        return lambda step: jnp.minimum(step / config.warmup_steps, 1.0) * steps(step)  # boundaries stay absolute
    if kind == "cosine":
        warmup = max(config.warmup_steps, 1)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))
    raise ValueError(f"Unknown schedule {kind!r}: use 'plateau', 'step', 'cosine' or 'constant'.")


PAPER_BATCH = 256  # the batch the paper's learning rate (1e-2) was chosen for (Sect. 3.1)


def linear_scaling(learning_rate: float, global_batch: int, base_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sect. 2.1; timm's
    ``--lr-base-size``): a rate chosen for ``base_batch`` images per step, used at ``global_batch``, is multiplied
    by ``global_batch / base_batch``. ``base_batch`` 0: the rate is used as given."""
    return learning_rate * global_batch / base_batch if base_batch else learning_rate


def batch_note(config: ml_collections.ConfigDict, before: int) -> str | None:
    """One line saying what a global batch derived from the hardware (``before`` -> ``config.global_batch_size``,
    e.g. preflight's ``--batch_per_chip``) does to the learning rate; None when the batch is unchanged."""
    after, opt = int(config.global_batch_size), config.optimizer
    if after == before:
        return None
    change = f"global batch {after} instead of the config's {before}"
    if opt.lr_base_batch:
        rate = linear_scaling(opt.learning_rate, after, opt.lr_base_batch)
        return (
            f"{change}: learning rate {opt.learning_rate:g} x {after}/{opt.lr_base_batch} = {rate:g} "
            f"(optimizer.lr_base_batch={opt.lr_base_batch}: linear scaling, Goyal et al. 2017)."
        )
    return (
        f"{change}: the learning rate stays {opt.learning_rate:g}, chosen for {before} images per step. To scale it "
        f"linearly (Goyal et al. 2017) add --config.optimizer.lr_base_batch={before}, with a warm-up "
        "(--config.optimizer.warmup_steps, schedule step or cosine)."
    )


def _decay_mask(params: Any, decay_biases: bool) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: decay_biases or path[-1].key == "kernel", params)


def make_optimizer(
    config: ml_collections.ConfigDict, num_steps: int, lr_scale: float = 1.0
) -> optax.GradientTransformation:
    """SGD + momentum + L2 weight decay, with the learning rate (times ``lr_scale``) injected as a hyperparameter."""

    def sgd(learning_rate):
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=lambda p: _decay_mask(p, config.decay_biases)),
            optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
        )

    tx = optax.inject_hyperparams(sgd)(learning_rate=learning_rate_schedule(config, num_steps, lr_scale))
    if config.trainable != ".*":
        tx = freeze_others(tx, config.trainable)
    return tx


def freeze_others(tx: optax.GradientTransformation, trainable: str) -> optax.GradientTransformation:
    """Trains only the layers whose name (``conv1_1``, ``fc8``, ...) matches the regex ``trainable``."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if re.fullmatch(trainable, path[0].key) else "freeze", params
        )

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def _is_injected(node: Any) -> bool:
    return isinstance(node, (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState))


def current_learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate held in the injected optimizer state (the value of the last update)."""
    injected = [n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected) if _is_injected(n)]
    return injected[0].hyperparams["learning_rate"]


def set_learning_rate(opt_state: Any, value: float) -> Any:
    """A copy of ``opt_state`` whose injected learning rate is ``value`` (placement kept)."""

    def replace(node: Any) -> Any:
        if not _is_injected(node):
            return node
        old = node.hyperparams["learning_rate"]
        new = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
        return node._replace(hyperparams={**node.hyperparams, "learning_rate": new})

    return jax.tree_util.tree_map(replace, opt_state, is_leaf=_is_injected)


def adopt_opt_state(restored: Any, template: Any) -> Any:
    """``restored`` (a checkpoint's optimizer state, written under another schedule) in ``template``'s structure:
    the update count, momentum and learning rate carried over. A step-wise schedule's own step count (absent
    from the ``constant`` and ``plateau`` states, whose rate is a stored number) is set to the update count, so
    the new schedule continues from the step. ``template``: the new optimizer's state, abstract (placed) or not.
    ValueError if the states differ elsewhere (e.g. another ``trainable``)."""

    def adopt(new: Any, old: Any) -> Any:
        same = jax.tree_util.tree_structure(new.inner_state) == jax.tree_util.tree_structure(old.inner_state)
        if not _is_injected(new) or not _is_injected(old) or not same:
            raise ValueError("the optimizer states differ beyond the learning-rate schedule")

        def count_like(leaf: Any) -> jax.Array:
            sharding = getattr(leaf, "sharding", None)
            return jax.jit(lambda c: c + 0, out_shardings=sharding)(old.count)  # a copy: no buffer held twice

        return new._replace(
            count=old.count,
            hyperparams={**new.hyperparams, **old.hyperparams},
            hyperparams_states=jax.tree_util.tree_map(count_like, new.hyperparams_states),
            inner_state=old.inner_state,
        )

    try:
        return jax.tree_util.tree_map(adopt, template, restored, is_leaf=_is_injected)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot carry the optimizer state over: {e}") from None


@dataclasses.dataclass
class Plateau:
    """Paper Sect. 3.1: divide the lr by 10 when validation accuracy stops improving, 3 times at most.

    ``patience`` evaluations without an improvement of at least ``min_delta`` trigger a decrease.
    The state is plain numbers, saved with each checkpoint.
    """

    factor: float = 0.1
    patience: int = 1
    min_delta: float = 0.0
    max_decreases: int = 3
    best: float = -1.0
    bad_evals: int = 0
    decreases: int = 0

    def update(self, accuracy: float) -> bool:
        """Records one validation accuracy; True when the learning rate must now be decreased."""
        if accuracy > self.best + self.min_delta:
            self.best, self.bad_evals = accuracy, 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.patience and self.decreases < self.max_decreases:
            self.bad_evals, self.decreases = 0, self.decreases + 1
            return True
        return False

    def state(self) -> dict[str, float]:
        return {"best": self.best, "bad_evals": self.bad_evals, "decreases": self.decreases}

    def load(self, state: dict[str, float]) -> None:
        self.best, self.bad_evals, self.decreases = state["best"], int(state["bad_evals"]), int(state["decreases"])
