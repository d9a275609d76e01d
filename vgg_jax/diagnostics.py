"""Per-layer training statistics (activations, dead ReLUs, gradient and update norms) and the stall warning.

docs/training.md#diagnosing-a-stalled-run
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from vgg_jax import train_step as ts

Stats = dict[str, float]


def layer_statistics(state: ts.TrainState, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Statistics of one training step on ``batch`` from ``state``, without applying it.

    The forward pass is the step's own (train mode, the step's dropout key). Per ReLU output
    (``relu1_1`` ... ``relu7``): ``act/<relu>/mean``, ``/std`` and ``/dead``, the fraction of its
    channels that are zero on every example and position of the batch (a unit that no input turns on
    gets no gradient and stays off). Per weight layer (``conv1_1`` ... ``fc8``): ``grad/<layer>``,
    ``update/<layer>`` (the optimizer's update, momentum and weight decay included) and
    ``param/<layer>`` L2 norms of kernel and bias together. ``logits/std_over_batch``: the spread of
    the logits across examples (0 when the network answers the same for every image), and ``loss``.
    """
    rng = jax.random.fold_in(state.dropout_rng, state.step)
    mutable = ["intermediates", *(["batch_stats"] if state.batch_stats else [])]

    def loss_fn(params):
        variables = {"params": params} | ({"batch_stats": state.batch_stats} if state.batch_stats else {})
        logits, extra = state.apply_fn(variables, batch["image"], train=True, rngs={"dropout": rng}, mutable=mutable)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, (logits, extra["intermediates"]["features"])

    (loss, (logits, features)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    out = {"loss": loss, "logits/std_over_batch": jnp.std(logits, axis=0).mean()}
    for name, x in features.items():
        if name.startswith("relu"):
            x = x.astype(jnp.float32)
            out[f"act/{name}/mean"] = x.mean()
            out[f"act/{name}/std"] = x.std()
            alive = jnp.any(x > 0, axis=tuple(range(x.ndim - 1)))  # per channel, over batch and positions
            out[f"act/{name}/dead"] = 1.0 - alive.mean()
    for kind, tree in (("grad", grads), ("update", updates), ("param", state.params)):
        for layer, leaves in tree.items():
            out[f"{kind}/{layer}"] = optax.tree.norm(leaves)
    return out


def jit_layer_statistics(state_shardings: Any, batch_sharding: Any) -> Callable[..., dict[str, jax.Array]]:
    """``layer_statistics`` under jit with the train step's placements; nothing donated."""
    platform = next(iter(batch_sharding.device_set)).platform
    return jax.jit(
        layer_statistics,
        in_shardings=(state_shardings, batch_sharding),
        compiler_options=ts.compiler_options(platform),
    )


def summary(stats: Mapping[str, Any]) -> str:
    """The statistics that tell why a network does not learn, in one phrase: the layers with the most dead
    ReLU channels, the activation spread of the first and last ReLU, gradient norms of the first and last
    layer, and how much the logits differ between the examples of the batch."""
    stats = {k: float(v) for k, v in stats.items()}
    dead = {k.split("/")[1]: v for k, v in stats.items() if k.startswith("act/") and k.endswith("/dead")}
    spread = {k.split("/")[1]: v for k, v in stats.items() if k.startswith("act/") and k.endswith("/std")}
    grads = {k.split("/")[1]: v for k, v in stats.items() if k.startswith("grad/")}
    parts = []
    if dead:
        worst = sorted(dead, key=lambda k: -dead[k])[:3]
        parts.append("dead ReLU channels " + ", ".join(f"{k} {dead[k]:.0%}" for k in worst))
    for what, values, fmt in (("activation std", spread, ".2g"), ("gradient norm", grads, ".1e")):
        if values:
            ends = dict.fromkeys([min(values, key=_layer_order), max(values, key=_layer_order)])
            parts.append(f"{what} " + ", ".join(f"{k} {values[k]:{fmt}}" for k in ends))
    parts.append(f"logit std over the batch {stats['logits/std_over_batch']:.1e}")
    return "; ".join(parts)


def _layer_order(name: str) -> tuple[int, ...]:
    """conv1_1 < conv1_2 < ... < conv5_4 < fc6 < fc8 (relu likewise), whatever the dict's order."""
    return tuple(int(n) for n in re.findall(r"\d+", name))


class StallWatch:
    """Warns once when the training loss stays near chance, ln(num_classes), past warm-up plus ``stall_steps``.

    ``update`` takes each logging interval's mean training loss; from step ``warmup_steps + stall_steps``
    on, when the losses logged over the last ``stall_steps`` steps average within ``stall_margin``
    (relative) of ln(num_classes) and are not falling (the later half of those steps no lower, by that margin,
    than the earlier), one warning line names the likely causes and the statistics
    (``layer_statistics`` of the current state) that show which applies.
    """

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int):
        self.chance = math.log(num_classes)
        self.steps = int(config.diagnostics.stall_steps)
        self.margin = float(config.diagnostics.stall_margin) * self.chance
        self.start = int(config.optimizer.warmup_steps if config.optimizer.schedule == "cosine" else 0)
        self.start += self.steps
        self.history: list[tuple[int, float]] = []
        self.warned = False

    def _falling(self) -> bool:
        """Whether the window's later half averages more than ``margin`` below its earlier half: a loss on its
        way down through chance (from large initial logits) averages near ln(C) without being stalled."""
        half = len(self.history) // 2
        if half == 0:
            return False
        early, late = [v for _, v in self.history[:half]], [v for _, v in self.history[-half:]]
        return sum(late) / half < sum(early) / half - self.margin

    def update(self, step: int, loss: float, statistics: Callable[[], Mapping[str, Any]]) -> bool:
        """Records ``loss`` at ``step``; True (and the warning logged) the first time the run is stalled."""
        if self.warned or self.steps <= 0:
            return False
        self.history = [(s, v) for s, v in [*self.history, (step, loss)] if s > step - self.steps]
        if step < self.start:
            return False
        mean = sum(v for _, v in self.history) / len(self.history)
        if abs(mean - self.chance) > self.margin or self._falling():
            return False
        self.warned = True
        logging.warning(
            "Step %d: stalled at chance: the training loss has averaged %.3f, within %.2f of ln(%d) = %.3f, "
            "over the last %d steps. Likely causes: a learning rate too large for this batch and width (the "
            "logits overshoot and SGD shrinks the whole signal until every image gets the same answer: logit std "
            "over the batch near 0, many dead ReLUs), a learning rate too small or 0, or an init scale that blows "
            "the logits up or makes them vanish (docs/training.md#diagnosing-a-stalled-run). Now: %s.",
            step,
            mean,
            self.margin,
            round(math.exp(self.chance)),
            self.chance,
            self.steps,
            summary(statistics()),
        )
        return True
