"""The training loop: data -> sharded train step -> evaluation, schedule, checkpoints, metrics.

docs/training.md
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from etils import epath

from vgg_jax import (
    checkpoints,
    config_checks,
    data,
    diagnostics,
    evaluate,
    hardware,
    models,
    optim,
    preprocessing,
    rollback,
    sharding,
    storage,
)
from vgg_jax.data.config import load_stats
from vgg_jax.errors import CheckpointError, ConfigError, TrainingDiverged
from vgg_jax.train_step import TrainState, abstract_train_state, create_train_state, jit_train_step


class PreemptionFlag:
    """SIGTERM sets the flag (one process); with several processes JAX's preemption sync is used."""

    def __init__(self) -> None:
        self.raised = False
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.raised = True

    def reached(self, step: int, manager: Any) -> bool:
        return self.raised if jax.process_count() == 1 else manager.reached_preemption(step)

    def restore(self) -> None:
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._previous)


def _initial_params(config: ml_collections.ConfigDict, fresh: Any, fresh_stats: Any) -> tuple[Any, Any]:
    """Params from ``init_from`` / ``staged_init_from`` when configured, else the fresh ones."""
    params, stats = fresh, fresh_stats
    if config.staged_init_from:
        _, trained_a, _ = checkpoints.restore_model(
            config.staged_init_from, allow_unverified=config.checkpoint.allow_unverified
        )
        params, copied = models.staged_init(trained_a["params"], fresh)
        logging.info("Staged init from %s: copied %s", config.staged_init_from, copied)
    if config.init_from:
        _, source, meta = checkpoints.restore_model(
            config.init_from, allow_unverified=config.checkpoint.allow_unverified
        )
        src_params = source["params"]
        if config.reset_head:
            src_params = {**src_params, "fc8": fresh["fc8"]}
        checkpoints.check_compatible(fresh, src_params, config.init_from)
        params, stats = src_params, source["batch_stats"] or fresh_stats
        _check_convention(config, meta)
        logging.info("Initialised from %s", config.init_from)
    return params, stats


def _check_convention(config: ml_collections.ConfigDict, meta: dict[str, Any]) -> None:
    """Warns when the run feeds init_from's weights other pixels than they were trained on."""
    theirs = preprocessing.of_checkpoint(meta)
    ours = preprocessing.InputConvention.from_data_config(config.data)
    if theirs != ours:
        logging.warning(
            "init_from %s was trained on inputs %s but this run normalises %s: set --config.data.mean_rgb, "
            "std_rgb and resize to its values (configs/transfer.py does) unless the change is intended.",
            config.init_from,
            theirs.data_fields(),
            ours.data_fields(),
        )


def create_state(config: ml_collections.ConfigDict, model: models.VGG, tx, shardings: Any) -> TrainState:
    """A new train state placed by ``shardings`` (from init_from / staged_init_from when set)."""
    rng = jax.random.PRNGKey(config.seed)
    state = jax.jit(lambda r: create_train_state(model, tx, r), out_shardings=shardings)(rng)
    if config.init_from or config.staged_init_from:
        params, stats = _initial_params(
            config, checkpoints.numpy_tree(state.params), checkpoints.numpy_tree(state.batch_stats)
        )
        # Host copies: identical on every process, placed by the jit below.
        params, stats = checkpoints.numpy_tree(params), checkpoints.numpy_tree(stats)
        state = jax.jit(
            lambda r, p, s: create_train_state(model, tx, r, params=p).replace(batch_stats=s), out_shardings=shardings
        )(rng, params, stats)
    return state


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config made self-contained: ``data.stats_path``'s mean and PCA read into their fields once, and the
    learning rate scaled to the global batch when ``optimizer.lr_base_batch`` is set (the one place it is)."""
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    opt = config.optimizer
    if opt.lr_base_batch:
        rate = optim.linear_scaling(opt.learning_rate, config.global_batch_size, opt.lr_base_batch)
        logging.info(
            "learning rate %g = %g x global batch %d / %d (optimizer.lr_base_batch: linear scaling, Goyal et al. 2017)",
            rate,
            opt.learning_rate,
            config.global_batch_size,
            opt.lr_base_batch,
        )
        if rate > opt.learning_rate and not (opt.warmup_steps and opt.schedule in ("step", "cosine")):
            logging.warning(
                "linear scaling without a warm-up: Goyal et al. (2017) needed a gradual warm-up for large batches; "
                "set --config.optimizer.warmup_steps with --config.optimizer.schedule=step or cosine."
            )
        opt.learning_rate, opt.lr_base_batch = rate, 0
    if config.data.stats_path:
        stats = load_stats(config.data.stats_path)
        logging.info("Mean RGB and PCA from %s: %s", config.data.stats_path, stats)
        config.data.update({k: tuple(map(tuple, v)) if k == "pca_eigvec" else tuple(v) for k, v in stats.items()})
        config.data.stats_path = None
    return config


def check_before_training(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> list[str]:
    """Everything training and its evaluations need, checked before step 1; returns the class names."""
    sharding.split_batch(
        config.global_batch_size,
        num_processes=jax.process_count(),
        num_devices=mesh.shape[sharding.DATA],
        accum_steps=config.grad_accum_steps,
    )
    sharding.log_batch(config.global_batch_size, mesh, "training batch")
    class_names = data.class_names(config.data)
    for field in ("train_split", "eval_split"):  # they exist and are not empty
        split = config.data[field]
        if not data.num_examples(config.data, split):
            raise ConfigError(f"--config.data.{field}={split!r} holds no examples: choose a non-empty split.")
    return class_names


@dataclasses.dataclass
class Start:
    """Where a run starts: a fresh state, the newest intact checkpoint, or nothing to do (finished)."""

    state: TrainState | None
    data_states: dict[int, Any] | None  # every process's iterator state, by process index
    meta: dict[str, Any] | None
    finished: dict[str, Any] | None  # the results of a run already trained to num_train_steps


def start_or_resume(
    config,
    model,
    tx,
    mesh: jax.sharding.Mesh,
    abstract: TrainState,
    shardings: Any,
    ckpt: checkpoints.Checkpointer,
    results_path: epath.Path,
) -> Start:
    """A fresh state, or the resumed checkpoint's state, iterator positions and schedule."""
    latest = resume_step(config, ckpt)
    if latest is None:
        return Start(create_state(config, model, tx, shardings), None, None, None)
    meta = checkpoints.read_meta(ckpt.directory / str(latest))
    _check_resume_changes(config, meta, ckpt.directory.parent)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if latest >= config.num_train_steps and results.get("step", 0) >= config.num_train_steps:
        ckpt.check(latest, _abstract_as_written(config, meta, model, mesh, abstract))  # the same model?
        logging.info("%s is already trained to step %d: nothing to do.", ckpt.directory, latest)
        return Start(None, None, None, results)
    state, data_states, meta = restore_step(ckpt, latest, config, model, mesh, abstract)
    logging.info("Resumed from %s at step %d", ckpt.directory, latest)
    return Start(state, data_states, meta, None)


def resume_step(config: ml_collections.ConfigDict, ckpt: checkpoints.Checkpointer) -> int | None:
    """The step a run resumes from: the newest intact one, or ``resume_from_step`` (the newer steps set aside as
    ``<step>.superseded``). A checkpoint written after that very rewind (its config names the same step) wins."""
    latest, wanted = ckpt.latest_intact_step(), config.resume_from_step
    if not wanted:
        return latest
    if latest is None:
        raise ConfigError(f"--config.resume_from_step={wanted}: {ckpt.directory} holds no intact checkpoint.")
    if checkpoints.read_meta(ckpt.directory / str(latest)).get("config", {}).get("resume_from_step") == wanted:
        logging.info("resume_from_step=%d was applied before step %d was written: resuming from it.", wanted, latest)
        return latest
    steps = ckpt.steps()
    if wanted not in steps:
        raise ConfigError(
            f"--config.resume_from_step={wanted}: {ckpt.directory} has no step {wanted}; its steps are "
            f"{', '.join(map(str, steps))}."
        )
    problems = checkpoints.verify_step(ckpt.directory / str(wanted))
    if problems:
        raise CheckpointError(
            f"Checkpoint step {wanted} is damaged ({'; '.join(problems[:3])}): name another of the steps "
            f"{', '.join(str(s) for s in steps if s != wanted)} in --config.resume_from_step."
        )
    moved = ckpt.set_aside_after(wanted, "superseded")
    logging.warning(
        "Resuming from step %d (resume_from_step); the newer steps are set aside: %s",
        wanted,
        ", ".join(str(p) for p in moved) or "none",
    )
    return wanted


def restore_step(
    ckpt: checkpoints.Checkpointer,
    step: int,
    config: ml_collections.ConfigDict,
    model: models.VGG,
    mesh: jax.sharding.Mesh,
    abstract: TrainState,
) -> tuple[TrainState, dict[int, Any], dict[str, Any]]:
    """A checkpoint's state, iterator states and meta. An optimizer state written under another schedule (whose
    state holds its own step count, or not) is carried into this run's optimizer (``optim.adopt_opt_state``)."""
    written = _abstract_as_written(config, checkpoints.read_meta(ckpt.directory / str(step)), model, mesh, abstract)
    state, data_states, meta = ckpt.restore(step, written)
    if written is not abstract:
        try:
            opt_state = optim.adopt_opt_state(state.opt_state, abstract.opt_state)
        except ValueError as e:
            raise CheckpointError(
                f"Checkpoint {ckpt.directory / str(step)}: {e}. Start a new run from its weights "
                f"(--workdir=NEW --config.init_from={ckpt.directory.parent})."
            ) from None
        state = state.replace(tx=abstract.tx, opt_state=opt_state)
    return state, data_states, meta


def _abstract_as_written(
    config: ml_collections.ConfigDict, meta: dict[str, Any], model: models.VGG, mesh: jax.sharding.Mesh, abstract: Any
) -> TrainState:
    """The abstract state of the optimizer settings a checkpoint was written with where its structure differs
    from ``abstract`` (another schedule), else ``abstract``."""
    stored = meta.get("config", {}).get("optimizer") or {}
    opt = ml_collections.ConfigDict(config.optimizer.to_dict())
    opt.update({k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in opt})
    tx = optim.make_optimizer(opt, config.num_train_steps)
    written, _ = abstract_train_state(model, tx, mesh, config.mesh.model > 1)
    same = jax.tree_util.tree_structure(written.opt_state) == jax.tree_util.tree_structure(abstract.opt_state)
    return abstract if same else written


def _check_resume_changes(config: ml_collections.ConfigDict, meta: dict[str, Any], workdir: epath.Path) -> None:
    allowed, refused = config_checks.resume_changes(meta.get("config", {}), config)
    if refused:
        listed = ", ".join(map(str, refused))
        fields = ",".join(c.field for c in refused)
        raise ConfigError(
            f"{workdir} was trained with other settings of what is trained: {listed}. Start a new run from its "
            f"weights (--workdir=NEW --config.init_from={workdir}), or keep these changes knowingly with "
            f"--config.allow_resume_changes={fields}."
        )
    if allowed:
        logging.info("resuming with changes: %s", ", ".join(map(str, allowed)))


def apply_learning_rate(
    state: TrainState, config: ml_collections.ConfigDict, plateau: optim.Plateau, scale: float = 1.0
) -> TrainState:
    """The learning rate the config asks for, times ``scale`` (the rollbacks' factors), in a restored state. Where
    the rate lives in the optimizer state (``constant``; ``plateau``: the base rate times decay_factor per
    decrease so far) it is rewritten; the step-wise schedules compute it from the step at every update, so a
    scale other than 1 gives the state an optimizer with the scaled schedule."""
    opt = config.optimizer
    if opt.schedule not in ("constant", "plateau"):
        return state if scale == 1.0 else state.replace(tx=optim.make_optimizer(opt, config.num_train_steps, scale))
    want = scale * opt.learning_rate * (opt.decay_factor**plateau.decreases if opt.schedule == "plateau" else 1.0)
    have = float(optim.current_learning_rate(state.opt_state))
    if abs(have - want) <= 1e-7 * max(abs(want), 1e-30):
        return state
    logging.info(
        "learning rate %g -> %g (as configured%s)", have, want, ", times the rollbacks' factors" if scale != 1 else ""
    )
    return state.replace(opt_state=optim.set_learning_rate(state.opt_state, want))


def plateau_update(state: TrainState, plateau: optim.Plateau, top1: float, step: int) -> TrainState:
    """Paper Sect. 3.1: the learning rate divided by 10 when validation accuracy stops improving."""
    if not plateau.update(top1):
        return state
    new_lr = float(optim.current_learning_rate(state.opt_state)) * plateau.factor
    logging.info("Step %d: validation top-1 stopped improving; learning rate -> %g", step, new_lr)
    return state.replace(opt_state=optim.set_learning_rate(state.opt_state, new_lr))


def meta_item(
    step: int,
    config: ml_collections.ConfigDict,
    class_names: list[str],
    plateau: optim.Plateau,
    scores: dict[int, float],
    guard: rollback.Guard,
    pending_eval: bool,
) -> dict[str, Any]:
    """A checkpoint's meta item (JSON): what a resume needs besides the train and iterator states."""
    return {
        "step": step,
        "plateau": plateau.state(),
        "config": json.loads(config.to_json_best_effort()),
        "class_names": class_names,
        "scores": {str(k): v for k, v in scores.items()},  # JSON keys are strings
        "pending_eval": pending_eval,  # saved before this step's evaluation: a resume evaluates first
        **guard.state(),  # the recent losses and the rollbacks so far
    }


def load_meta_state(meta: dict[str, Any], plateau: optim.Plateau, scores: dict[int, float]) -> bool:
    """Loads a meta item's plateau state and validation scores (keyed by int step again, as keep_best looks
    them up) into ``plateau`` and ``scores``; returns its pending_eval. The rollback state: Guard.load."""
    plateau.load(meta["plateau"])
    scores.clear()
    scores.update({int(k): v for k, v in meta.get("scores", {}).items()})
    return bool(meta.get("pending_eval"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per ``config``, evaluating and checkpointing into ``workdir``; returns the final summary."""
    config_checks.validate(config)  # before anything is read or written
    config = resolve(config)
    workdir = storage.path(workdir)
    mesh = sharding.make_mesh(config.mesh.model)
    class_names = check_before_training(config, mesh)
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("workdir %s (checkpoints, TensorBoard events, results.json)", workdir)
    model = models.from_config(config.model, num_classes=len(class_names), crop_size=config.data.crop_size)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    plateau = optim.Plateau(
        factor=config.optimizer.decay_factor,
        patience=config.optimizer.patience,
        min_delta=config.optimizer.min_delta,
        max_decreases=config.optimizer.max_decreases,
    )
    guard = rollback.Guard(config.rollback)
    ckpt = checkpoints.Checkpointer(
        workdir / "checkpoints",
        keep=config.checkpoint.keep,
        keep_best=config.checkpoint.keep_best,
        keep_older_by=config.rollback.steps_before,  # a rollback's target always exists
        async_save=config.checkpoint.async_save,
        allow_unverified=config.checkpoint.allow_unverified,
        fresh_start_if_damaged=config.checkpoint.fresh_start_if_damaged,
    )
    results_path = workdir / "results.json"
    abstract, shardings = abstract_train_state(model, tx, mesh, config.mesh.model > 1)
    try:
        start = start_or_resume(config, model, tx, mesh, abstract, shardings, ckpt, results_path)
    except Exception:
        ckpt.close()
        raise
    if start.finished is not None:
        ckpt.close()
        return start.finished
    state = start.state
    train_iter = data.create_train_iterator(config.data, global_batch_size=config.global_batch_size, seed=config.seed)
    pending_eval = False

    def load_meta(meta: dict[str, Any]) -> None:
        """The schedule and rollback state of a checkpoint (resumed, or rolled back to)."""
        nonlocal state, pending_eval
        pending_eval = load_meta_state(meta, plateau, ckpt.scores)
        state = apply_learning_rate(state, config, plateau, guard.lr_scale)

    if start.data_states is not None:
        relayout = train_iter.resume(start.data_states)
        if relayout:
            logging.warning("%s", relayout)
        guard.load(start.meta)
        load_meta(start.meta)
    start_step = int(state.step)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        parameter_overview.log_parameter_overview(state.params)
        writer.write_hparams(_flat_config(config))
    hooks = _hooks(config, workdir, writer)
    step_fn = jit_train_step(
        shardings, sharding.batch_sharding(mesh), config.grad_accum_steps, config.mesh.grad_reduce_dtype
    )
    stats_fn = diagnostics.jit_layer_statistics(shardings, sharding.batch_sharding(mesh))
    stall = diagnostics.StallWatch(config, len(class_names))
    preemption = PreemptionFlag()
    throughput = Throughput(config, model, mesh)

    def save(step: int, before_eval: bool) -> None:
        meta = meta_item(step, config, class_names, plateau, ckpt.scores, guard, pending_eval=before_eval)
        ckpt.save(step, state, train_iter.get_state(), meta)

    def run_eval(step: int) -> dict[str, float]:
        nonlocal state
        variables = {"params": state.params} | ({"batch_stats": state.batch_stats} if state.batch_stats else {})
        results = evaluate.evaluate(
            state.apply_fn,
            variables,
            config.data,
            mesh,
            protocol=config.eval_protocol,
            batch_size=config.eval_batch_size,
        )
        writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        top1 = 1.0 - results[f"top1_error@{config.data.eval_scales[0]}"] / 100.0
        ckpt.scores[step] = top1
        if config.optimizer.schedule == "plateau":
            state = plateau_update(state, plateau, top1, step)
        return results

    def roll_back(trouble: rollback.Trouble, drawn: int) -> int:
        """Back to the newest intact checkpoint from before ``trouble`` (the initial state if none), the
        iterator left where it is, so that the batches drawn since are skipped; returns its step. After
        ``rollback.max_rollbacks`` rollbacks: TrainingDiverged."""
        nonlocal state
        aside = ckpt.set_aside_after(rollback.last_good_step(trouble, config.rollback.steps_before), "diverged")
        target = ckpt.latest_intact_step() or 0
        if len(guard.rollbacks) >= config.rollback.max_rollbacks:
            raise TrainingDiverged(_diverged_message(trouble, guard, aside, target))
        if target:
            state, _, meta = restore_step(ckpt, target, config, model, mesh, abstract)
        else:
            state = create_state(config, model, tx, shardings)
            meta = {"plateau": optim.Plateau().state(), "scores": {}}
        guard.load({**meta, "rollbacks": guard.rollbacks})
        entry = guard.record(trouble, target, drawn)
        load_meta(meta)
        logging.warning(
            "Rollback %d of %d: %s; restored %s, skipping the %d batches drawn since (learning rate x%g)%s.",
            len(guard.rollbacks),
            config.rollback.max_rollbacks,
            trouble,
            f"step {target}" if target else "the initial state (no checkpoint from before the trouble)",
            entry["skipped"],
            entry["lr_factor"],
            f"; set aside {', '.join(p.name for p in aside)}" if aside else "",
        )
        writer.write_scalars(trouble.step, {"train/rollbacks": len(guard.rollbacks), "train/rollback_to": target})
        return target

    train_metrics, last_eval, pending, started = None, None, None, time.time()
    step = start_step
    drawn = first_drawn = step + guard.skipped  # batches drawn from the iterator over the whole run
    spike = config.inject_spike
    try:
        if pending_eval:  # the checkpoint was saved before its evaluation: evaluate it now
            last_eval, pending_eval = run_eval(step), False
        while step < config.num_train_steps:
            local = throughput.next_batch(train_iter)
            drawn += 1
            batch = sharding.to_global({"image": local["image"], "label": local["label"]}, mesh)
            if config.diagnostics.every_steps and step % config.diagnostics.every_steps == 0:
                writer.write_scalars(step, {f"diag/{k}": v for k, v in stats_fn(state, batch).items()})
            # inject_spike: the params before this batch's update, copied because the step donates the state
            before = jax.tree_util.tree_map(jnp.copy, state.params) if drawn == spike.at_batch else None
            compiling = drawn == first_drawn + 1
            if compiling:
                logging.info("step %d: compiling the train step", step + 1)
                compile_started = time.perf_counter()
            state, step_metrics = step_fn(state, batch)
            if compiling:
                logging.info("train step compiled in %.1f s", time.perf_counter() - compile_started)
            if before is not None:
                params = rollback.spiked(before, state.params, spike.lr_factor, shardings.params)
                state = state.replace(params=params)
                logging.warning("inject_spike: batch %d's update made at %g x the rate", drawn, spike.lr_factor)
            step += 1
            ckpt.report_saved()
            preempted = preemption.reached(step, ckpt.manager)
            evaluating = not preempted and (step % config.eval_every_steps == 0 or step == config.num_train_steps)
            saving = evaluating or preempted or step % config.checkpoint.every_steps == 0
            # Checked one step late, so the host never waits for the device here; a step to be saved is checked
            # at once: no checkpoint is written before its step's check.
            trouble, pending = (guard.check(*pending) if pending else None), (step, step_metrics)
            if trouble is None and saving:
                trouble, pending = guard.check(*pending), None
            if trouble is not None:
                step = roll_back(trouble, drawn)
                train_metrics, pending, hooks = None, None, _hooks(config, workdir, writer)
                if pending_eval:  # as on resume: the target was saved before its evaluation
                    last_eval = run_eval(step)
                throughput.reset()
                continue
            train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
            for hook in hooks:
                hook(step)
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                scalars = train_metrics.compute()
                writer.write_scalars(step, {f"train/{k}": v for k, v in scalars.items()})
                stall.update(step, float(scalars["loss"]), lambda: stats_fn(state, batch))
                throughput.report(step, writer)
                train_metrics = None
            if saving:
                save(step, before_eval=evaluating)  # before the evaluation: no evaluation error loses training
            if evaluating:
                last_eval = run_eval(step)
                throughput.reset()  # the evaluation's time is not the steps'
            if preempted:
                logging.warning("Preempted at step %d: checkpoint saved, stopping.", step)
                break
    finally:
        ckpt.wait()
        ckpt.close()
        preemption.restore()
        writer.flush()

    if last_eval is None and step >= config.num_train_steps:
        last_eval = run_eval(step)  # a finished run restarted without its results.json
    seconds = time.time() - started
    summary = {
        "step": step,
        "model": config.model.name,
        "dataset": f"{config.data.dataset} {config.data.eval_split}",
        "train_seconds": round(seconds, 1),
        "images_per_second": round((drawn - first_drawn) * config.global_batch_size / max(seconds, 1e-9), 1),
        **(last_eval or {}),
        "learning_rate": float(optim.current_learning_rate(state.opt_state)),  # the final one, for a resume
        **({"rollbacks": len(guard.rollbacks)} if guard.rollbacks else {}),
    }
    if jax.process_index() == 0:
        results_path.write_text(json.dumps(summary, indent=2))
    return summary


def _hooks(config: ml_collections.ConfigDict, workdir: epath.Path, writer: Any) -> list[Any]:
    """Progress report and profiler (process 0); made afresh after a rollback, as their steps go back."""
    if jax.process_index() != 0:
        return []
    hooks: list[Any] = [periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer)]
    if config.profile.start_step >= 0:
        hooks.append(
            periodic_actions.Profile(
                logdir=str(workdir), first_profile=config.profile.start_step, num_profile_steps=config.profile.num_steps
            )
        )
    return hooks


class Throughput:
    """Where a logging interval's time went. Reports images/s per device, milliseconds per step, the time the
    loop waited for the next input batch, and MFU where the device's peak is known (``vgg_jax.hardware``).

    Batches are prefetched in the background and the device runs the previous step while the loop waits,
    so the input share stays near 0 while the accelerator is the bottleneck and rises towards 1 when the
    input cannot keep up (the accelerator then idles for part of the wait): above ``max_input_share`` it
    warns that the run is input-bound.
    """

    def __init__(self, config: ml_collections.ConfigDict, model: models.VGG, mesh: jax.sharding.Mesh):
        self.batch, self.devices = config.global_batch_size, mesh.devices.size
        self.flops = models.train_flops_per_image(model) * self.batch
        # MFU against the bfloat16 peak, so for bfloat16 (or float16) computation only.
        low_precision = jnp.dtype(model.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        self.peak = hardware.peak_tflops(mesh.devices.flat[0].device_kind) if low_precision else None
        self.max_input_share, self.intervals = 0.1, 0
        self.reset()

    def reset(self) -> None:
        self.started, self.input_s, self.steps = time.perf_counter(), 0.0, 0

    def next_batch(self, iterator: Any) -> Any:
        started = time.perf_counter()
        batch = next(iterator)
        self.input_s += time.perf_counter() - started
        self.steps += 1
        return batch

    def report(self, step: int, writer: Any) -> None:
        seconds = time.perf_counter() - self.started
        if not self.steps or seconds <= 0:
            return
        share = self.input_s / seconds
        scalars = {
            "perf/images_per_second_per_device": self.steps * self.batch / seconds / self.devices,
            "perf/step_ms": 1e3 * seconds / self.steps,
            "perf/input_ms": 1e3 * self.input_s / self.steps,
            "perf/input_share": share,
        }
        if self.peak:
            scalars["perf/mfu"] = self.steps * self.flops / seconds / (self.peak * 1e12 * self.devices)
        writer.write_scalars(step, scalars)
        self.intervals += 1
        if share > self.max_input_share and self.intervals > 1:  # the first interval includes compiling
            logging.warning(
                "Step %d: %.0f%% of the time waited for input batches: the run is input-bound. Raise "
                "--config.data.num_parallel_calls (default: tf.data AUTOTUNE) or use more host CPU cores per "
                "accelerator (docs/benchmarks.md: the training transform's images/s per core).",
                step,
                100 * share,
            )
        self.reset()


def _diverged_message(trouble: rollback.Trouble, guard: rollback.Guard, aside: list[epath.Path], target: int) -> str:
    """One line: what went wrong, what was tried, which checkpoints were set aside, where a rerun resumes."""
    what = str(trouble)
    tried = f" after {len(guard.rollbacks)} rollback(s) ({'; '.join(map(rollback.describe, guard.rollbacks))})"
    moved = f" Set aside as written after the trouble began: {', '.join(str(p) for p in aside)}." if aside else ""
    where = (
        f"A rerun resumes from step {target}, the newest intact checkpoint from before the trouble."
        if target
        else "No checkpoint from before the trouble remains: a rerun starts afresh."
    )
    return (
        f"{what[:1].upper()}{what[1:]}{tried if guard.rollbacks else ''}.{moved} {where} Lower the learning rate "
        "(--config.optimizer.learning_rate=...; it applies on resume), check the data, or allow more rollbacks "
        "(--config.rollback.max_rollbacks), then rerun."
    )


def _flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat |= _flat_config(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
