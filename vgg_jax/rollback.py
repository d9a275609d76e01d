"""Rollback on divergence: a non-finite or spiking loss sends the run back to a checkpoint from before the
trouble, past the batches that led to it (PaLM, Chowdhery et al. 2022, Sect. 5.1, did this by hand).

docs/training.md#rollback
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np

MIN_HISTORY = 5  # losses the spike rule needs before it judges: the median of fewer is noise


@dataclasses.dataclass(frozen=True)
class Trouble:
    """A step whose loss or gradient was bad. Its loss measured the parameters of the step before."""

    step: int
    reason: str  # 'non-finite loss or gradient' or 'loss spike'
    detail: str  # e.g. 'its update was not applied', '812 > 3 x 2.29, the median of 100 steps'

    def __str__(self) -> str:
        return f"{self.reason} at step {self.step} ({self.detail})"


class Guard:
    """The divergence rule over each step's loss, and the run's rollbacks so far. Both are saved in every
    checkpoint's meta (``state()``), so a resumed run judges and counts exactly as an uninterrupted one."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.losses: collections.deque[float] = collections.deque(maxlen=config.spike_window)
        self.rollbacks: list[dict[str, Any]] = []  # one record per rollback, oldest first

    def check(self, step: int, metrics: Any) -> Trouble | None:
        """The step's trouble, if any; else its loss joins the history. ``metrics``: one step's TrainMetrics."""
        finite, total, count = jax.device_get((metrics.finite.total, metrics.loss.total, metrics.loss.count))
        loss = float(total) / float(count)
        if float(finite) < 1.0 or not math.isfinite(loss):
            return Trouble(step, "non-finite loss or gradient", "its update was not applied")
        factor = self.config.spike_factor
        if factor and len(self.losses) >= MIN_HISTORY:
            median = float(np.median(self.losses))
            if loss > max(factor * median, self.config.spike_min_loss):
                detail = f"{loss:.4g} > {factor:g} x {median:.4g}, the median of the last {len(self.losses)} steps"
                return Trouble(step, "loss spike", detail)
        self.losses.append(loss)
        return None

    @property
    def skipped(self) -> int:
        """Batches drawn but skipped by the rollbacks so far: batches drawn = step + skipped."""
        return sum(r["skipped"] for r in self.rollbacks)

    @property
    def lr_scale(self) -> float:
        """The product of the rollbacks' learning-rate factors."""
        return math.prod(r["lr_factor"] for r in self.rollbacks)

    def state(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "rollbacks": list(self.rollbacks)}

    def load(self, meta: dict[str, Any]) -> None:
        """A resumed run's history and rollbacks (absent from checkpoints written before rollbacks existed)."""
        self.losses = collections.deque(meta.get("losses", []), maxlen=self.config.spike_window)
        self.rollbacks = list(meta.get("rollbacks", []))

    def record(self, trouble: Trouble, target: int, drawn: int) -> dict[str, Any]:
        """Records a rollback to step ``target`` when ``drawn`` batches have been drawn; the batches after the
        target's are skipped. The loss history goes back to the target's (``meta``: its checkpoint's)."""
        entry = {
            "step": trouble.step,
            "to": target,
            "skipped": drawn - target - self.skipped,
            "lr_factor": self.config.lr_factor,
            "reason": str(trouble),
        }
        self.rollbacks.append(entry)
        return entry


def describe(entry: dict[str, Any]) -> str:
    """'step 12 -> 8 (5 batches skipped, lr x0.5)'."""
    return f"step {entry['step']} -> {entry['to']} ({entry['skipped']} batches skipped, lr x{entry['lr_factor']:g})"


def last_good_step(trouble: Trouble, steps_before: int) -> int:
    """The newest step a rollback may return to: ``steps_before`` before the parameters that gave the bad
    loss (those of ``trouble.step - 1``)."""
    return trouble.step - 1 - steps_before


def spiked(before: Any, after: Any, factor: float, shardings: Any) -> Any:
    """``inject_spike`` (tests, demonstrations): the parameters as if the update from ``before`` to ``after``
    had been made with the learning rate times ``factor``. SGD's update is the rate times the momentum trace,
    so scaling the parameter change scales the rate of that one step."""
    return jax.jit(
        lambda b, a: jax.tree_util.tree_map(lambda x, y: x + factor * (y - x), b, a), out_shardings=shardings
    )(before, after)
