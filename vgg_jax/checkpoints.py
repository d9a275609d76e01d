"""Orbax checkpoints: train state, input-iterator state and meta (schedule state, config), saved together.

docs/training.md#checkpoints
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from vgg_jax import models

STATE, DATA, META = "state", "data", "meta"


class IteratorStateHandler(ocp.CheckpointHandler):
    """Saves each process's input-iterator state (a JSON-able dict) as ``process_<i>.json``."""

    def save(self, directory: epath.Path, args: IteratorStateSave) -> None:
        (directory / f"process_{jax.process_index()}.json").write_text(json.dumps({"json": args.state}))

    def restore(self, directory: epath.Path, args: IteratorStateRestore | None = None) -> Any:
        path = directory / f"process_{jax.process_index()}.json"
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(
                f"No input-iterator state for process {jax.process_index()} in {directory} (found {found}): "
                "the checkpoint was written by a run with fewer processes. Resume with the same process "
                "count, or start a new run from its parameters with --config.init_from."
            )
        return json.loads(path.read_text())["json"]


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


def absolute(path: str | epath.Path) -> epath.Path:
    """Orbax needs absolute paths: local relative paths are made absolute, URLs (gs://) are kept."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """Leaves by '/'-joined path (attribute and dict keys alike), parameters first."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}
    return dict(sorted(leaves.items(), key=lambda kv: "params" not in kv[0].split("/")[:1]))


def check_compatible(expected: Any, stored: Any, where: str) -> None:
    """Raises ValueError naming the first parameter whose presence or shape differs."""
    want, have = _leaves_by_path(expected), _leaves_by_path(stored)
    for key, leaf in want.items():
        if key not in have:
            raise ValueError(f"Checkpoint {where} has no {key}: it was written for another model or optimizer.")
        if tuple(have[key].shape) != tuple(leaf.shape):
            raise ValueError(
                f"Checkpoint {where} does not fit this model: {key} has shape {tuple(have[key].shape)} "
                f"there but {tuple(leaf.shape)} here. Use the same model config (name, width, fc_width, "
                "crop_size, num_classes) as the run that wrote it."
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"Checkpoint {where} has {extra[0]} that this model lacks: another model was saved there.")


class Checkpointer:
    """A thin layer over ``ocp.CheckpointManager`` for the training loop."""

    def __init__(self, directory: str | epath.Path, *, keep: int = 3, keep_best: int = 1, async_save: bool = True):
        self.directory = absolute(directory)
        policy = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=lambda m: m["top1"],
                    reverse=False,
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            preservation_policy=policy,
            cleanup_tmp_directories=True,
        )
        handlers = {
            STATE: ocp.StandardCheckpointHandler(),
            DATA: IteratorStateHandler(),
            META: ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any], top1: float | None = None) -> None:
        """Starts an (asynchronous) save of everything needed to resume at ``step``."""
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), DATA: IteratorStateSave(data_state), META: ocp.args.JsonSave(meta)}
        )
        self.manager.save(step, args=args, metrics=None if top1 is None else {"top1": top1}, force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restores ``(state, data_state, meta)``; the state onto ``abstract_state``'s shardings."""
        self.check(step, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    STATE: ocp.args.StandardRestore(abstract_state),
                    DATA: IteratorStateRestore(),
                    META: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[STATE], restored[DATA], restored[META]

    def check(self, step: int, abstract_state: Any) -> None:
        stored = self.manager.item_metadata(step)[STATE]
        check_compatible(abstract_state, stored, f"{self.directory / str(step)}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_model(path: str | epath.Path) -> tuple[models.VGG, dict[str, Any], dict[str, Any]]:
    """``(model, variables, meta)`` of the newest checkpoint under ``path`` (a training workdir, its
    checkpoints dir, a step dir, or converted weights): the model its meta config describes, with
    fc8's class count, checked against the stored parameters. Works on any device count: the arrays
    land on this process's first device whatever wrote them."""
    meta = read_meta(path)
    if "model" not in meta.get("config", {}):
        raise ValueError(
            f"{find_checkpoint(path)} has no model config in its meta item: it was not written by "
            "vgg_jax.main or vgg_jax.convert, so the model cannot be rebuilt."
        )
    variables = _restore_variables(path)
    num_classes = int(variables["params"]["fc8"]["bias"].shape[0])
    crop_size = meta["config"].get("data", {}).get("crop_size", models.VGG.crop_size)
    model = models.from_config(meta["config"]["model"], num_classes=num_classes, crop_size=crop_size)
    check_compatible(models.variable_shapes(model)["params"], variables["params"], str(path))
    return model, variables, meta


def _restore_variables(path: str | epath.Path) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of the newest checkpoint under ``path``, on this process's first device."""
    step_dir = find_checkpoint(path)
    metadata = ocp.StandardCheckpointer().metadata(step_dir / STATE).item_metadata
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        key: jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata[key])
        for key in ("params", "batch_stats")
        if key in metadata
    }
    restored = _partial_restore(step_dir / STATE, target)
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}


def _partial_restore(directory: epath.Path, target: dict[str, Any]) -> dict[str, Any]:
    restore_args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    return ocp.PyTreeCheckpointer().restore(
        directory, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
    )


def save_variables(directory: str | epath.Path, variables: dict[str, Any], meta: dict[str, Any]) -> epath.Path:
    """Writes a standalone checkpoint (``state`` = {'params', 'batch_stats'}, ``meta`` = JSON).

    Converted weights use this layout; ``restore_model``, ``read_meta``, ``vgg_jax.load`` and
    ``--config.init_from`` all accept the directory.
    """
    directory = absolute(directory)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(
        directory / STATE, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    )
    checkpointer.wait_until_finished()
    (directory / META).mkdir(parents=True, exist_ok=True)
    (directory / META / "metadata").write_text(json.dumps(meta))
    return directory


def read_meta(path: str | epath.Path) -> dict[str, Any]:
    """The ``meta`` item (config, schedule state) of a checkpoint."""
    return json.loads((find_checkpoint(path) / META / "metadata").read_text())


def find_checkpoint(path: str | epath.Path) -> epath.Path:
    """Resolves a workdir, its ``checkpoints`` dir, or a step dir to the newest complete step dir."""
    path = absolute(path)
    if (path / STATE).exists():
        return path
    for root in (path / "checkpoints", path):
        if root.exists():
            steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit() and (p / STATE).exists())
            if steps:
                return steps[-1][1]
    raise FileNotFoundError(
        f"No complete checkpoint under {path}: expected a training workdir (with checkpoints/<step>/state), "
        "its checkpoints directory, or one checkpoint step directory."
    )


def numpy_tree(tree: Any) -> Any:
    """Host copies of a (possibly sharded, multi-process-replicated) pytree."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
