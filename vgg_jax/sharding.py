"""Where every array lives: the device mesh, the partition rules, batches as global arrays.

The mesh has two axes: ``data`` (the batch is split over it; it spans every device of every
host) and ``model`` (size 1 by default). With ``model > 1`` the large FC layers (fc6, fc7) are
split over ``model`` along their output channels; everything else is replicated. This file is the
one place that decides placements.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, MODEL = "data", "model"

# (regex on the '/'-joined parameter path, spec) for model-parallel FC layers. fc6/fc7 kernels are
# (h, w, in, out): their output channels (and biases) are split. The optimizer's momentum mirrors
# the params, so the same rules apply to it.
FC_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)fc[67]/kernel$", P(None, None, None, MODEL)),
    (r"(^|/)fc[67]/bias$", P(MODEL)),
)


def make_mesh(model_axis: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over all devices of all processes."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) % model_axis:
        raise ValueError(f"model axis {model_axis} does not divide the {len(devices)} devices.")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_axis, model_axis)
    return Mesh(grid, (DATA, MODEL))


def partition_specs(tree: Any, rules: Sequence[tuple[str, P]] = ()) -> Any:
    """PartitionSpecs for a pytree: the first matching rule, else replicated."""

    def spec(path, leaf) -> P:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        for pattern, rule in rules:
            if re.search(pattern, name) and len(rule) <= np.ndim(leaf):
                return rule
        return P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings(mesh: Mesh, abstract_state: Any, shard_fc: bool = False) -> Any:
    """NamedShardings for the train state (or any params-like pytree)."""
    specs = partition_specs(abstract_state, FC_RULES if shard_fc else ())
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch's leading axis split over ``data``; the rest replicated over ``model``."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """This process's share of a global batch; a clear error if it does not split evenly."""
    data_devices = mesh.shape[DATA]
    if global_batch_size % data_devices:
        raise ValueError(
            f"Global batch {global_batch_size} is not divisible by the {data_devices} data-parallel "
            "devices: pick a multiple."
        )
    return global_batch_size // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
