"""Orbax checkpoints: train state, input-iterator state and meta (schedule state, config), saved together
with a SHA-256 digest of every file, verified before any restore.

docs/training.md#checkpoints
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging as std_logging
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from vgg_jax import cli, models, storage
from vgg_jax.errors import CheckpointError

STATE, DATA, META = "state", "data", "meta"
DIGESTS = "_CHECKSUMS.sha256.json"
LEASE = "lease.json"  # in the checkpoints directory: the training run that owns the workdir (vgg_jax.storage)
# Written by orbax after the items' finalize (step metadata, commit marker): not hashed, checked as JSON.
_NOT_HASHED = {DIGESTS, DIGESTS + ".tmp", "_CHECKPOINT_METADATA", "commit_success.txt"}


# ----------------------------------------------------------------------------------------------
# Checksums. orbax 0.12.8 stores array data without checksums (OCDBT checksums only its own index;
# zarr2 has no checksum codec), so every item records a digest of its files when it is finalized:
# on one process, after all processes have written, before orbax's atomic rename (docs/training.md).


def _sha256(path: epath.Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _files(directory: epath.Path) -> list[str]:
    found, stack = [], [directory]
    while stack:  # an explicit walk: epath's rglob is refused on GCS
        for p in stack.pop().iterdir():
            if p.is_dir():
                stack.append(p)
            elif p.name not in _NOT_HASHED:
                found.append(str(p.relative_to(directory)))
    return sorted(found)


def _hash_all(directory: epath.Path, names: Iterable[str]) -> dict[str, tuple[str, int] | None]:
    def one(name: str) -> tuple[str, tuple[str, int] | None]:
        path = directory / name
        return name, (_sha256(path) if path.exists() else None)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:  # hashlib releases the GIL
        return dict(pool.map(one, names))


def write_digests(directory: str | epath.Path) -> None:
    """Records the SHA-256 and size of every file under ``directory`` in its ``DIGESTS`` file."""
    directory = epath.Path(directory)
    digests = _hash_all(directory, _files(directory))
    record = {"algorithm": "sha256", "files": {k: {"sha256": d, "size": n} for k, (d, n) in digests.items()}}
    tmp = directory / (DIGESTS + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    tmp.replace(directory / DIGESTS)


def verify_item(directory: epath.Path) -> list[str]:
    """What is wrong with one item's files (empty: they match the digests written with them)."""
    if not directory.is_dir():
        return [f"{directory.name}/ is missing"]
    if not (directory / DIGESTS).exists():
        return [f"{directory.name}/{DIGESTS} is missing"]
    try:
        expected = json.loads((directory / DIGESTS).read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{directory.name}/{DIGESTS} is unreadable"]
    problems = []
    for name, (want, got) in ((n, (expected[n], g)) for n, g in _hash_all(directory, sorted(expected)).items()):
        where = f"{directory.name}/{name}"
        if got is None:
            problems.append(f"{where} is missing")
        elif got[1] != want["size"]:
            problems.append(f"{where} has {got[1]} bytes, {want['size']} were written")
        elif got[0] != want["sha256"]:
            problems.append(f"{where} does not match its checksum")
    return problems


UNFINISHED = "orbax never finalized it: its save was interrupted"


def is_finalized(step_dir: epath.Path) -> bool:
    """Whether orbax finished writing a checkpoint, by orbax's own rule for its filesystem: on a local disk the
    step was renamed from its temporary name; on GCS, written in place, it holds ``commit_success.txt``.
    Converted weights are one orbax item, ``state``, finalized the same way."""
    finalized = ocp.path.step.is_path_finalized
    return finalized(step_dir) or (not step_dir.name.isdigit() and finalized(step_dir / STATE))


def has_digests(step_dir: epath.Path, items: Sequence[str] = (STATE, DATA, META)) -> bool:
    return any((step_dir / item / DIGESTS).exists() for item in items)


def verify_step(
    step_dir: str | epath.Path, items: Sequence[str] = (STATE, DATA, META), *, allow_unverified: bool = False
) -> list[str]:
    """What is wrong with a checkpoint step (empty: orbax finalized it and every item matches its checksums).

    Every step this project writes has checksums, so a step without any is damaged or foreign; it passes only
    with ``allow_unverified`` (its items present)."""
    step_dir = storage.path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir} is missing"]
    if not is_finalized(step_dir):
        return [UNFINISHED]
    if not has_digests(step_dir, items):
        present = [i for i in items if (step_dir / i).is_dir()]
        if present != list(items):
            return [f"{', '.join(sorted(set(items) - set(present)))} missing"]
        if allow_unverified:
            return []
        return [
            f"no {DIGESTS} files, which every step vgg_jax writes has, so it cannot be verified (if you trust it, "
            "allow unverified steps: docs/training.md#checkpoints)"
        ]
    problems = [p for item in items for p in verify_item(step_dir / item)]
    metadata = step_dir / "_CHECKPOINT_METADATA"
    if metadata.exists():
        try:
            json.loads(metadata.read_text())
        except ValueError:
            problems.append("_CHECKPOINT_METADATA is not valid JSON")
    return problems


class _WithDigests:
    """A handler mixin: digests written in ``finalize`` (once, after every process wrote its files)."""

    def finalize(self, directory: epath.Path) -> None:
        super().finalize(directory)  # e.g. the OCDBT merge of a pytree item: first
        write_digests(directory)


class StateHandler(_WithDigests, ocp.StandardCheckpointHandler):
    """The train state as orbax's standard pytree item, with digests."""


class MetaHandler(_WithDigests, ocp.JsonCheckpointHandler):
    """The meta JSON item, with digests."""


@ocp.args.register_with_handler(StateHandler, for_save=True)
@dataclasses.dataclass
class StateSave(ocp.args.StandardSave):
    pass


@ocp.args.register_with_handler(StateHandler, for_restore=True)
@dataclasses.dataclass
class StateRestore(ocp.args.StandardRestore):
    pass


@ocp.args.register_with_handler(MetaHandler, for_save=True)
@dataclasses.dataclass
class MetaSave(ocp.args.JsonSave):
    pass


@ocp.args.register_with_handler(MetaHandler, for_restore=True)
@dataclasses.dataclass
class MetaRestore(ocp.args.JsonRestore):
    pass


class IteratorStateHandler(_WithDigests, ocp.CheckpointHandler):
    """Each process's input-iterator state (a JSON-able dict) as ``process_<i>.json``; restore returns
    every process's state by process index, so a run can resume on another process count."""

    def save(self, directory: epath.Path, args: IteratorStateSave) -> None:
        (directory / f"process_{jax.process_index()}.json").write_text(json.dumps({"json": args.state}))

    def restore(self, directory: epath.Path, args: IteratorStateRestore | None = None) -> dict[int, Any]:
        states = {}
        for path in directory.iterdir():
            if path.name.startswith("process_") and path.name.endswith(".json"):
                states[int(path.name[len("process_") : -len(".json")])] = json.loads(path.read_text())["json"]
        return states


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------
# The training run's checkpoints


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """Leaves by '/'-joined path (attribute and dict keys alike), parameters first."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}
    return dict(sorted(leaves.items(), key=lambda kv: "params" not in kv[0].split("/")[:1]))


def check_compatible(expected: Any, stored: Any, where: str) -> None:
    """Raises CheckpointError naming the first parameter whose presence or shape differs."""
    want, have = _leaves_by_path(expected), _leaves_by_path(stored)
    for key, leaf in want.items():
        if key not in have:
            if key.startswith("opt_state/"):
                raise CheckpointError(
                    f"Checkpoint {where} has no {key}: its optimizer state is laid out for other optimizer settings "
                    "(e.g. optimizer.trainable). Start a new run from its weights with --config.init_from."
                )
            raise CheckpointError(f"Checkpoint {where} has no {key}: it was written for another model.")
        if tuple(have[key].shape) != tuple(leaf.shape):
            raise CheckpointError(
                f"Checkpoint {where} does not fit this model: {key} has shape {tuple(have[key].shape)} "
                f"there but {tuple(leaf.shape)} here. Use the same model config (name, width, fc_width, "
                "crop_size, num_classes) as the run that wrote it."
            )
    extra = sorted(set(have) - set(want))
    if extra:
        what = "this run's optimizer state" if extra[0].startswith("opt_state/") else "this model"
        raise CheckpointError(f"Checkpoint {where} has {extra[0]} that {what} lacks: it was saved by another setup.")


@dataclasses.dataclass
class BestValidation:
    """An orbax preservation policy: the ``n`` steps with the highest validation top-1 in ``scores``.

    ``scores`` (step -> top-1 accuracy) is shared with the training loop, which records each evaluation
    after the checkpoint of its step was saved (a checkpoint precedes every evaluation).
    """

    n: int
    scores: dict[int, float]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        ranked = sorted((c.step for c in checkpoints if c.step in self.scores), key=lambda s: (self.scores[s], -s))
        best = set(ranked[len(ranked) - self.n :]) if self.n else set()
        return [c.step in best for c in checkpoints]


@dataclasses.dataclass
class OlderBy:
    """An orbax preservation policy: the newest step at least ``gap`` steps older than the newest step, so that a
    rollback (docs/training.md#rollback) always finds a checkpoint from before the trouble (0: none kept)."""

    gap: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        newest = max((c.step for c in checkpoints), default=0)
        older = max((c.step for c in checkpoints if c.step <= newest - self.gap), default=None) if self.gap else None
        return [c.step == older for c in checkpoints]


class Checkpointer:
    """A thin layer over ``ocp.CheckpointManager`` for the training loop. It holds the directory's lease
    (``LEASE``, vgg_jax.storage) from its creation to ``close``: a second run on the same workdir is refused."""

    def __init__(
        self,
        directory: str | epath.Path,
        *,
        keep: int = 3,
        keep_best: int = 1,
        keep_older_by: int = 0,
        async_save: bool = True,
        allow_unverified: bool = False,
        fresh_start_if_damaged: bool = False,
    ):
        self.directory = storage.path(directory)
        self.allow_unverified, self.fresh_start_if_damaged = allow_unverified, fresh_start_if_damaged
        self.lease = self._take_lease()  # before orbax cleans up or writes anything
        self.scores: dict[int, float] = {}  # step -> validation top-1 accuracy, for keep_best
        kept = [policies.LatestN(n=keep), BestValidation(keep_best, self.scores), OlderBy(keep_older_by)]
        policy = policies.AnyPreservationPolicy(kept)
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            preservation_policy=policy,
            cleanup_tmp_directories=True,
        )
        handlers = {STATE: StateHandler(), DATA: IteratorStateHandler(), META: MetaHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._saving: int | None = None  # the step being saved in the background, until it is reported saved

    def _take_lease(self) -> storage.Lease | None:
        """Process 0 takes the lease; every process stops with the same error if another run holds it."""
        lease, error = None, ""
        if jax.process_index() == 0:
            workdir = self.directory.parent if self.directory.name == "checkpoints" else self.directory
            try:
                lease = storage.Lease(self.directory / LEASE, f"a training run in {workdir}").acquire(
                    advice="Two runs on one workdir would overwrite each other's checkpoints and results: wait for "
                    "it to end, stop it, or pass another --workdir."
                )
            except storage.LeaseHeld as e:
                error = str(e)
        if jax.process_count() > 1:
            held = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
            error = error or ("another training run holds this workdir (process 0 says why)" if held else "")
        if error:
            raise storage.LeaseHeld(error)
        return lease

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_intact_step(self) -> int | None:
        """The newest step that orbax finalized and whose files match their checksums. Damaged newer steps are
        reported in one line each and set aside (renamed ``<step>.damaged``, never deleted). If every step is
        damaged, CheckpointError names them and nothing is changed, unless ``fresh_start_if_damaged``."""
        damaged: list[tuple[int, list[str]]] = []
        for step in reversed(self.steps()):
            problems = verify_step(self.directory / str(step), allow_unverified=self.allow_unverified)
            if not problems:
                break
            damaged.append((step, problems))
        else:
            step = None
            if damaged and not self.fresh_start_if_damaged:
                listed = "; ".join(f"step {s}: {'; '.join(p[:2])}" for s, p in damaged)
                raise CheckpointError(
                    f"Every checkpoint in {self.directory} is damaged ({listed}); nothing was changed. "
                    "Inspect or move them, or start this run afresh with "
                    "--config.checkpoint.fresh_start_if_damaged=True (they are then set aside as <step>.damaged)."
                )
        for bad, problems in damaged:
            self._set_aside(bad, problems)
        if step is None and damaged:
            logging.warning(
                "Every checkpoint was damaged and set aside: starting afresh from step 0 "
                "(--config.checkpoint.fresh_start_if_damaged=True)."
            )
        elif step is not None and not has_digests(self.directory / str(step)):
            logging.warning("Checkpoint step %d has no checksums: restoring it unverified, as allowed.", step)
        return step

    def _rename(self, step: int, suffix: str) -> epath.Path:
        """Renames step ``step`` to ``<step>.<suffix>`` (``-<n>`` added if taken) on process 0."""
        aside = self.directory / f"{step}.{suffix}"
        n = 1
        while aside.exists():
            aside, n = self.directory / f"{step}.{suffix}-{n}", n + 1
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        return aside

    def _set_aside(self, step: int, problems: list[str]) -> None:
        aside = self._rename(step, "damaged")
        multihost_utils.sync_global_devices(f"vgg_jax set aside checkpoint {step}")
        logging.warning(
            "Checkpoint step %d is damaged (%s): set aside as %s; falling back to an earlier step.",
            step,
            "; ".join(problems[:3]),
            aside,
        )
        self.manager.reload()

    def set_aside_after(self, step: int, suffix: str) -> list[epath.Path]:
        """Renames every step after ``step`` to ``<step>.<suffix>`` (never deleted: a rollback's diverged steps,
        those a run resumed before); returns their new paths."""
        self.wait()
        moved = [self._rename(s, suffix) for s in self.steps() if s > step]
        if moved:
            multihost_utils.sync_global_devices(f"vgg_jax set aside checkpoints after {step}")
            self.manager.reload()
        return moved

    def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any]) -> None:
        """Starts an (asynchronous) save of everything needed to resume at ``step``; logs its start, and its
        end when ``report_saved`` (called every step) or ``wait`` sees it done."""
        if self.lease is not None and self.lease.lost is not None:
            raise CheckpointError(
                f"Another process took over {self.directory} ({self.lease.lost.get('holder', '?')}) after this run "
                f"stalled for over {self.lease.ttl:.0f} s: stopping without saving step {step}."
            )
        args = ocp.args.Composite(
            **{STATE: StateSave(state), DATA: IteratorStateSave(data_state), META: MetaSave(meta)}
        )
        logging.info("saving checkpoint step %d to %s", step, self.directory / str(step))
        self.manager.save(step, args=args, force=True)  # first waits for the previous save
        self.report_saved()
        self._saving = step
        self.report_saved()

    def report_saved(self) -> None:
        """Logs ``saved checkpoint step N`` once the background save of step N has completed."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            logging.info("saved checkpoint step %d", self._saving)
            self._saving = None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[int, Any], dict[str, Any]]:
        """``(state, {process index: iterator state}, meta)``; the state onto ``abstract_state``'s shardings."""
        self.check(step, abstract_state)
        args = {STATE: StateRestore(abstract_state), DATA: IteratorStateRestore(), META: MetaRestore()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored[STATE], restored[DATA], restored[META]

    def check(self, step: int, abstract_state: Any) -> None:
        stored = self.manager.item_metadata(step)[STATE]
        check_compatible(abstract_state, stored, f"{self.directory / str(step)}")

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self.report_saved()

    def close(self) -> None:
        self.manager.close()
        if self.lease is not None:
            self.lease.release()


# ----------------------------------------------------------------------------------------------
# Weights: any checkpoint of a run, or converted weights


def restore_model(
    path: str | epath.Path, *, allow_unverified: bool = False
) -> tuple[models.VGG, dict[str, Any], dict[str, Any]]:
    """``(model, variables, meta)`` of the newest finished checkpoint under ``path`` (a training workdir, its
    checkpoints dir, a step dir, or converted weights): the model its meta config describes, with
    fc8's class count, checked against the stored parameters. The files are verified against their
    checksums first (a step without checksums only with ``allow_unverified``). Works on any device count:
    the arrays land on this process's first device."""
    step_dir = find_checkpoint(path)
    check_intact(step_dir, allow_unverified=allow_unverified)
    meta = read_meta(step_dir)
    if "model" not in meta.get("config", {}):
        raise CheckpointError(
            f"{step_dir} has no model config in its meta item: it was not written by vgg_jax.main or "
            "vgg_jax.convert, so the model cannot be rebuilt."
        )
    variables = _restore_variables(step_dir)
    num_classes = int(variables["params"]["fc8"]["bias"].shape[0])
    crop_size = meta["config"].get("data", {}).get("crop_size", models.VGG.crop_size)
    model = models.from_config(meta["config"]["model"], num_classes=num_classes, crop_size=crop_size)
    check_compatible(models.variable_shapes(model)["params"], variables["params"], str(path))
    return model, variables, meta


def check_intact(step_dir: epath.Path, *, allow_unverified: bool = False) -> None:
    """CheckpointError naming the step, what is wrong and the intact steps beside it, if it is damaged or
    unfinished."""
    problems = verify_step(step_dir, (STATE, META), allow_unverified=allow_unverified)
    if not problems:
        return
    if not step_dir.name.isdigit() and step_dir.parent.name != "checkpoints":  # converted weights: alone
        where = "re-create it (e.g. run the conversion again)"
    else:
        siblings = [p for p in step_dir.parent.iterdir() if p.name.isdigit() and p != step_dir]  # not set aside
        intact = sorted(
            (int(p.name) for p in siblings if not verify_step(p, (STATE, META), allow_unverified=allow_unverified)),
            reverse=True,
        )
        where = (
            f"intact steps: {', '.join(map(str, intact))}; pass one, e.g. {step_dir.parent / str(intact[0])}"
            if intact
            else "no intact step beside it"
        )
    what = "unfinished" if problems[0] == UNFINISHED else "damaged"
    raise CheckpointError(f"Checkpoint {step_dir} is {what} ({'; '.join(problems[:3])}); {where}.")


@contextlib.contextmanager
def _item_read_alone():
    """Reading one item directory by itself, orbax warns that it lacks ``_CHECKPOINT_METADATA``: that file
    belongs to the step directory above (converted weights have none). Expected, so not shown (``cli.QUIET``),
    also where no entry point set up the filters (a notebook)."""
    quiet, logger = cli.Quiet(), std_logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _restore_variables(step_dir: epath.Path) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of one step, on this process's first device."""
    with _item_read_alone():
        metadata = ocp.StandardCheckpointer().metadata(step_dir / STATE).item_metadata
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = {
            key: jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), metadata[key]
            )
            for key in ("params", "batch_stats")
            if key in metadata
        }
        restore_args = jax.tree_util.tree_map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / STATE, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
        return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}


def save_variables(directory: str | epath.Path, variables: dict[str, Any], meta: dict[str, Any]) -> epath.Path:
    """Writes a standalone checkpoint (``state`` = {'params', 'batch_stats'}, ``meta`` = JSON), with digests.

    Converted weights use this layout; ``restore_model``, ``read_meta``, ``vgg_jax.load`` and
    ``--config.init_from`` all accept the directory.
    """
    directory = storage.path(directory)
    checkpointer = ocp.Checkpointer(StateHandler())
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    checkpointer.save(directory / STATE, args=StateSave(state))
    (directory / META).mkdir(parents=True, exist_ok=True)
    (directory / META / "metadata").write_text(json.dumps(meta))
    write_digests(directory / META)
    return directory


def read_meta(path: str | epath.Path) -> dict[str, Any]:
    """The ``meta`` item (config, schedule state) of a checkpoint."""
    file = find_checkpoint(path) / META / "metadata"
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: the checkpoint is incomplete or damaged.") from None
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): the checkpoint is damaged.") from None


def find_checkpoint(path: str | epath.Path) -> epath.Path:
    """Resolves a workdir, its ``checkpoints`` dir, or a step dir to the newest step dir that orbax finalized
    (``is_finalized``: steps whose save was interrupted are passed over, on every filesystem). A step dir or
    converted weights named directly are returned as they are (``check_intact`` judges them)."""
    path = storage.path(path)
    if (path / STATE).exists():
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir():
            steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit())
            finished = [p for _, p in steps if is_finalized(p)]
            if finished:
                return finished[-1]
            if steps:
                raise CheckpointError(
                    f"No finished checkpoint under {path}: orbax never finalized step(s) "
                    f"{', '.join(str(s) for s, _ in steps)} (their saves were interrupted); resume the run first."
                )
    if path.name.isdigit() and path.is_dir():
        return path  # a step whose state was never written: check_intact names what is wrong
    raise FileNotFoundError(
        f"No complete checkpoint under {path}: expected a training workdir (with checkpoints/<step>/state), "
        "its checkpoints directory, or one checkpoint step directory."
    )


def numpy_tree(tree: Any) -> Any:
    """Host copies of a (possibly sharded, multi-process-replicated) pytree."""
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
