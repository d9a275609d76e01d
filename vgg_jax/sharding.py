"""Where every array lives: processes, the device mesh, the partition rules, batches as global arrays.

docs/training.md#devices-and-hosts
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vgg_jax.errors import ConfigError

DATA, MODEL = "data", "model"

# (regex on the '/'-joined parameter path, spec) for model-parallel FC layers. fc6/fc7 kernels are
# (h, w, in, out): their output channels (and biases) are split. The optimizer's momentum mirrors
# the params, so the same rules apply to it.
FC_RULES: tuple[tuple[str, P], ...] = (
    (r"(^|/)fc[67]/kernel$", P(None, None, None, MODEL)),
    (r"(^|/)fc[67]/bias$", P(MODEL)),
)


def default_distributed_config() -> ml_collections.ConfigDict:
    """``config.distributed``: jax.distributed.initialize() before anything else when ``enabled``. With no
    address it auto-detects Cloud TPU pods and SLURM; set all three for a manual cluster (or localhost)."""
    config = ml_collections.ConfigDict()
    config.enabled = False
    config.coordinator_address = ""  # host:port of process 0
    config.num_processes = 0
    config.process_id = -1
    return config


def initialize_distributed(config: Any) -> None:
    """``jax.distributed.initialize`` per ``config.distributed``: an explicit cluster (``coordinator_address``,
    ``num_processes``, ``process_id``), or auto-detected (Cloud TPU pods, SLURM). Call before anything
    touches the devices."""
    if not config.enabled:
        return
    if config.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU devices
        jax.distributed.initialize(config.coordinator_address, config.num_processes, config.process_id)
    else:
        jax.distributed.initialize()
    logging.info(
        "Process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count()
    )


def make_mesh(model_axis: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over all devices of all processes."""
    devices = list(devices if devices is not None else jax.devices())
    if model_axis < 1 or len(devices) % model_axis:
        divisors = [d for d in range(1, len(devices) + 1) if len(devices) % d == 0]
        raise ConfigError(
            f"--config.mesh.model={model_axis} does not divide the {len(devices)} devices: use one of "
            f"{', '.join(map(str, divisors))}."
        )
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


def split_batch(
    global_batch_size: int,
    *,
    num_processes: int,
    num_devices: int | None = None,
    accum_steps: int = 1,
    name: str = "global_batch_size",
) -> int:
    """This process's share of a global batch; ValueError naming the fix when it does not split evenly.

    The batch must split over the processes (each loads its share), over the data-parallel devices,
    and, with gradient accumulation, into ``accum_steps`` micro-batches on every device.
    """
    parts = num_devices or num_processes
    if global_batch_size <= 0 or global_batch_size % (parts * accum_steps) or global_batch_size % num_processes:
        over = f"{parts} data-parallel devices" if num_devices else f"{num_processes} processes"
        micro = f" x {accum_steps} gradient-accumulation steps" if accum_steps > 1 else ""
        raise ConfigError(
            f"{name}={global_batch_size} is not a positive multiple of the {over}{micro}: set "
            f"--config.{name} to a multiple of {math.lcm(parts * accum_steps, num_processes)}."
        )
    return global_batch_size // num_processes


def round_up_batch(batch_size: int, mesh: Mesh, what: str = "batch") -> int:
    """The smallest multiple of the data-parallel devices (and processes) >= ``batch_size``, logged when it
    differs: evaluation pads its last batches with rows that are not counted, so any size works."""
    multiple = math.lcm(mesh.shape[DATA], jax.process_count())
    padded = -(-max(batch_size, 1) // multiple) * multiple
    if padded != batch_size:
        logging.info(
            "%s %d -> %d: a multiple of the %d data-parallel devices and %d processes",
            what,
            batch_size,
            padded,
            mesh.shape[DATA],
            jax.process_count(),
        )
    return padded


def log_batch(global_batch_size: int, mesh: Mesh, what: str = "batch") -> None:
    """One log line: the global, per-host and per-device size of a batch."""
    logging.info(
        "%s: %d global = %d per host x %d hosts = %d per device x %d data-parallel devices",
        what,
        global_batch_size,
        global_batch_size // jax.process_count(),
        jax.process_count(),
        global_batch_size // mesh.shape[DATA],
        mesh.shape[DATA],
    )


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles per-process numpy batches into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
