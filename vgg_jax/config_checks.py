"""Checks of a training config before anything runs, and the rules for changing it when a run resumes.

docs/training.md#resuming
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import ml_collections

from vgg_jax import models, preprocessing
from vgg_jax.data.config import BAD_IMAGE_POLICIES, VIEWS, TransformConfig
from vgg_jax.errors import ConfigError

SCHEDULES = ("plateau", "step", "cosine", "constant")
DTYPES = ("float32", "bfloat16")
INIT_SCHEMES = ("paper", "glorot", "he")
GRAD_REDUCE_DTYPES = ("compute", "float32")

# Fields (or sections, ending in '.') that may change when a run resumes: how long and how fast it
# trains, how it is evaluated, checkpointed and logged, where the data lives and how it runs. Every
# other field changes what is being trained and is refused unless named in allow_resume_changes.
RESUMABLE = (
    "num_train_steps",
    "optimizer.learning_rate",
    "optimizer.schedule",
    "optimizer.decay_factor",
    "optimizer.patience",
    "optimizer.min_delta",
    "optimizer.max_decreases",
    "optimizer.step_boundaries",
    "optimizer.warmup_steps",
    "optimizer.lr_base_batch",
    "grad_accum_steps",
    "eval_protocol",
    "eval_batch_size",
    "eval_every_steps",
    "checkpoint.",
    "resume_from_step",
    "rollback.",
    "inject_spike.",
    "log_every_steps",
    "profile.",
    "diagnostics.",
    "mesh.",
    "distributed.",
    "init_from",
    "staged_init_from",
    "reset_head",
    "allow_resume_changes",
    "data.eval_scales",
    "data.eval_split",
    "data.dense_aspect_buckets",
    "data.cache_eval",
    "data.num_parallel_calls",
    "data.on_bad_image",
    "data.data_dir",
    "data.manual_dir",
    "data.folder",
    "data.download",
)


def _fail(field: str, value: Any, rule: str) -> None:
    flag = field if field.startswith("--") else f"--config.{field}"
    raise ConfigError(f"{flag}={value!r}: {rule}.")


def _check(ok: bool, field: str, value: Any, rule: str) -> None:
    if not ok:
        _fail(field, value, rule)


def _enum(field: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, field, value, f"must be one of {', '.join(choices)}")


def parse_protocol(protocol: str) -> tuple[str, ...]:
    """'dense+multicrop' -> ('dense', 'multicrop'); ConfigError for unknown or repeated methods."""
    methods = tuple(protocol.split("+"))
    unknown = [m for m in methods if m not in VIEWS]
    if unknown or len(set(methods)) != len(methods):
        raise ConfigError(
            f"Unknown or repeated evaluation method(s) in protocol {protocol!r}: use one of {', '.join(VIEWS)} "
            "or several joined by '+', e.g. 'dense+multicrop'."
        )
    return methods


def check_scales(scales: Any, crop_size: int, field: str = "data.eval_scales") -> tuple[int, ...]:
    """Test scales Q as ints, each at least the crop size (a crop, and fc6's window on the pool5 map of a
    dense pass, both need Q >= crop)."""
    try:
        values = tuple(int(q) for q in scales)
    except (TypeError, ValueError):
        _fail(field, scales, "give test scales as integers, e.g. (256,) or (256, 384, 512)")
    _check(len(values) > 0, field, scales, "give at least one test scale")
    small = [q for q in values if q < crop_size]
    _check(
        not small,
        field,
        scales,
        f"test scales {small} are below crop_size={crop_size}: a {crop_size} crop (and the "
        f"dense net's fc6 window, {crop_size // models.STRIDE} pool5 cells of {models.STRIDE} pixels) needs Q >= "
        f"{crop_size}",
    )
    return values


def _floats(value: Any) -> list[float]:
    if isinstance(value, list):
        return [f for v in value for f in _floats(v)]
    return [value] if isinstance(value, float) else []


def validate(config: ml_collections.ConfigDict) -> None:
    """Range, type and consistency checks of every field a run reads; ConfigError naming the field and the fix."""
    model, data, opt = config.model, config.data, config.optimizer
    for field, value in flatten(config.to_dict()).items():
        _check(all(map(math.isfinite, _floats(value))), field, value, "must be finite")
    try:
        models.canonical_name(model.name)
    except ValueError as e:
        raise ConfigError(f"--config.model.name={model.name!r}: {e}") from None
    for field in ("width", "fc_width"):
        _check(
            isinstance(model[field], int) and model[field] > 0,
            f"model.{field}",
            model[field],
            "must be a positive integer",
        )
    _check(0.0 <= model.dropout_rate < 1.0, "model.dropout_rate", model.dropout_rate, "must be in [0, 1)")
    _enum("model.dtype", model.dtype, DTYPES)
    _enum("model.init_scheme", model.init_scheme, INIT_SCHEMES)
    _check(model.init_std > 0, "model.init_std", model.init_std, "must be positive")
    _enum("model.remat", model.remat, tuple(models.REMAT_POLICIES))

    _check(isinstance(data.dataset, str) and bool(data.dataset), "data.dataset", data.dataset, "name a dataset")
    if data.dataset == "folder":
        _check(bool(data.folder), "data.folder", data.folder, "dataset='folder' needs the image folder's root")
    try:
        transform = TransformConfig(**{f.name: data[f.name] for f in dataclasses.fields(TransformConfig)})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data config: {e}") from None
    _check(
        transform.crop_size % models.STRIDE == 0,
        "data.crop_size",
        data.crop_size,
        f"must be a multiple of {models.STRIDE} (five 2x2 pools)",
    )
    check_scales(data.eval_scales, data.crop_size)
    buckets = tuple(data.dense_aspect_buckets)
    _check(len(buckets) > 0 and min(buckets) >= 1, "data.dense_aspect_buckets", buckets, "give ratios >= 1")
    _enum("data.on_bad_image", data.on_bad_image, BAD_IMAGE_POLICIES)
    chunk, window = data.shuffle_chunk, data.shuffle_buffer
    _check(
        chunk > 0 and window >= chunk and window % chunk == 0,
        "data.shuffle_buffer",
        window,
        f"must be a positive multiple of data.shuffle_chunk={chunk}",
    )
    _check(
        data.num_parallel_calls is None or data.num_parallel_calls > 0,
        "data.num_parallel_calls",
        data.num_parallel_calls,
        "must be positive (or None: tf.data AUTOTUNE)",
    )

    _check(config.num_train_steps > 0, "num_train_steps", config.num_train_steps, "must be positive")
    _check(config.global_batch_size > 0, "global_batch_size", config.global_batch_size, "must be positive")
    _check(config.grad_accum_steps >= 1, "grad_accum_steps", config.grad_accum_steps, "must be >= 1")
    # 0 is allowed: a run that only copies init_from's weights (e.g. to re-evaluate them).
    _check(opt.learning_rate >= 0, "optimizer.learning_rate", opt.learning_rate, "must be positive (0: weights stay)")
    _check(0.0 <= opt.momentum < 1.0, "optimizer.momentum", opt.momentum, "must be in [0, 1)")
    _check(opt.weight_decay >= 0, "optimizer.weight_decay", opt.weight_decay, "must be >= 0")
    _enum("optimizer.schedule", opt.schedule, SCHEDULES)
    _check(0.0 < opt.decay_factor <= 1.0, "optimizer.decay_factor", opt.decay_factor, "must be in (0, 1]")
    _check(opt.patience >= 1, "optimizer.patience", opt.patience, "must be >= 1")
    _check(opt.max_decreases >= 0, "optimizer.max_decreases", opt.max_decreases, "must be >= 0")
    bounds = [int(b) for b in opt.step_boundaries]
    _check(
        all(b > 0 for b in bounds) and bounds == sorted(bounds),
        "optimizer.step_boundaries",
        tuple(opt.step_boundaries),
        "must be increasing positive steps",
    )
    _check(opt.warmup_steps >= 0, "optimizer.warmup_steps", opt.warmup_steps, "must be >= 0")
    _check(
        isinstance(opt.lr_base_batch, int) and opt.lr_base_batch >= 0,
        "optimizer.lr_base_batch",
        opt.lr_base_batch,
        "must be an integer >= 0: the global batch learning_rate was chosen for (0: use learning_rate as given)",
    )
    try:
        re.compile(opt.trainable)
    except re.error as e:
        _fail("optimizer.trainable", opt.trainable, f"is not a regular expression ({e})")

    parse_protocol(config.eval_protocol)
    for field in ("eval_batch_size", "eval_every_steps", "log_every_steps"):
        _check(config[field] > 0, field, config[field], "must be positive")
    _check(
        config.checkpoint.every_steps > 0, "checkpoint.every_steps", config.checkpoint.every_steps, "must be positive"
    )
    _check(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep, "must be >= 1")
    _check(config.checkpoint.keep_best >= 0, "checkpoint.keep_best", config.checkpoint.keep_best, "must be >= 0")
    _check(config.mesh.model >= 1, "mesh.model", config.mesh.model, "must be >= 1")
    _enum("mesh.grad_reduce_dtype", config.mesh.grad_reduce_dtype, GRAD_REDUCE_DTYPES)
    _check(
        not (models.canonical_name(model.name).endswith("_bn") and config.mesh.grad_reduce_dtype == "float32"),
        "mesh.grad_reduce_dtype",
        config.mesh.grad_reduce_dtype,
        f"computes each device's gradient apart, where {model.name}'s batch normalisation would use per-device "
        "statistics: use 'compute' with BN models",
    )
    diag = config.diagnostics
    _check(diag.every_steps >= 0, "diagnostics.every_steps", diag.every_steps, "must be >= 0 (0: off)")
    _check(diag.stall_steps >= 0, "diagnostics.stall_steps", diag.stall_steps, "must be >= 0 (0: no stall warning)")
    _check(0 < diag.stall_margin < 1, "diagnostics.stall_margin", diag.stall_margin, "must be in (0, 1)")
    _check(
        model.fc_width % config.mesh.model == 0,
        "mesh.model",
        config.mesh.model,
        f"must divide model.fc_width={model.fc_width} (fc6 and fc7 are split over it by output channel)",
    )
    _check(config.resume_from_step >= 0, "resume_from_step", config.resume_from_step, "must be >= 0 (0: the newest)")
    _check_rollback(config)
    if config.reset_head and not config.init_from:
        _fail("reset_head", True, "replaces fc8 of the init_from run's parameters: set --config.init_from")
    preprocessing.InputConvention.from_data_config(data)  # mean/std/resize


def _check_rollback(config: ml_collections.ConfigDict) -> None:
    rb, spike = config.rollback, config.inject_spike
    _check(rb.max_rollbacks >= 0, "rollback.max_rollbacks", rb.max_rollbacks, "must be >= 0 (0: stop at once)")
    _check(
        rb.spike_factor == 0 or rb.spike_factor > 1,
        "rollback.spike_factor",
        rb.spike_factor,
        "must be > 1 (0: no spike rule, non-finite losses only)",
    )
    _check(rb.spike_window >= 1, "rollback.spike_window", rb.spike_window, "must be >= 1")
    _check(rb.spike_min_loss >= 0, "rollback.spike_min_loss", rb.spike_min_loss, "must be >= 0")
    _check(
        rb.steps_before >= 1,
        "rollback.steps_before",
        rb.steps_before,
        "must be >= 1 (the parameters of the step before a bad loss are the ones that gave it)",
    )
    _check(0 < rb.lr_factor <= 1, "rollback.lr_factor", rb.lr_factor, "must be in (0, 1]")
    _check(spike.at_batch >= 0, "inject_spike.at_batch", spike.at_batch, "must be >= 0 (0: never)")
    _check(spike.lr_factor > 0, "inject_spike.lr_factor", spike.lr_factor, "must be positive")


# ----------------------------------------------------------------------------------------------
# Resuming


@dataclasses.dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} {_show(self.old)} -> {_show(self.new)}"


_ABSENT = object()


def _show(value: Any) -> str:
    return "(unset)" if value is _ABSENT else json.dumps(value)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted field -> JSON value (tuples as lists, as a checkpoint's meta stores them)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
    return out


def resumable(field: str, allowed: str = "") -> bool:
    """Whether ``field`` may change on resume (``allowed``: the run's allow_resume_changes)."""
    extra = tuple(f.strip() for f in allowed.split(",") if f.strip())
    return any(field == r or (r.endswith(".") and field.startswith(r)) for r in (*RESUMABLE, *extra))


def resume_changes(stored: Mapping[str, Any], config: ml_collections.ConfigDict) -> tuple[list[Change], list[Change]]:
    """(allowed, refused): the differences between the config a checkpoint was written with and ``config``.

    A field the checkpoint lacks (added to the project since) counts as allowed: its default keeps the
    old behaviour.
    """
    old, new = flatten(stored), flatten(json.loads(config.to_json_best_effort()))
    allowed, refused = [], []
    for field in sorted(set(old) | set(new)):
        before, after = old.get(field, _ABSENT), new.get(field, _ABSENT)
        if before == after:
            continue
        change = Change(field, before, after)
        ok = before is _ABSENT or resumable(field, config.get("allow_resume_changes", ""))
        (allowed if ok else refused).append(change)
    return allowed, refused
