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


@dataclasses.dataclass(frozen=True)
class Bound:
    """A number's valid range: ``low`` to ``high`` (None: unbounded), each end included unless open; ``also``:
    values outside it that switch something off, explained by ``note``."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    integer: bool = False
    also: tuple[Any, ...] = ()
    note: str = ""

    def accepts(self, value: Any) -> bool:
        if value in self.also and not isinstance(value, bool):
            return True
        number = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def rule(self) -> str:
        kind = "an integer " if self.integer else ""
        if self.high is not None:
            span = f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        elif self.low == 0 and self.open_low:
            span = "a positive integer" if self.integer else "positive"
            kind = ""
        else:
            span = f"{'>' if self.open_low else '>='} {self.low:g}"
        span += "".join(f" or {v}" for v in self.also)
        return f"must be {kind}{span}" + (f" ({self.note})" if self.note else "")


POSITIVE, AT_LEAST_1, AT_LEAST_0 = Bound(0, open_low=True), Bound(1), Bound(0)
BOOL = (False, True)


# Every config field (configs/default.py) and its valid values: a Bound, a tuple of choices, or (a string) the
# rule that validate() checks by code below. tests/test_config_checks.py tries each boundary and choice.
RULES: dict[str, Bound | tuple[Any, ...] | str] = {
    "model.name": "a model name or paper letter (models.canonical_name)",
    "model.width": Bound(0, open_low=True, integer=True),
    "model.fc_width": Bound(0, open_low=True, integer=True),
    "model.dropout_rate": Bound(0, 1, open_high=True),
    "model.dtype": DTYPES,
    "model.init_scheme": INIT_SCHEMES,
    "model.init_std": POSITIVE,
    "model.remat": tuple(models.REMAT_POLICIES),
    "data.dataset": "a non-empty dataset name; 'folder' needs data.folder",
    "data.data_dir": "a path or None",
    "data.manual_dir": "a path or None",
    "data.folder": "a path or None",
    "data.download": BOOL,
    "data.train_split": "a TFDS split",
    "data.eval_split": "a TFDS split",
    "data.crop_size": f"a multiple of {models.STRIDE}, at most data.scale_min (TransformConfig)",
    "data.scale_min": "crop_size <= scale_min <= scale_max (TransformConfig)",
    "data.scale_max": "crop_size <= scale_min <= scale_max (TransformConfig)",
    "data.flip": BOOL,
    "data.pca_alpha_std": Bound(0, note="0: no colour shift"),
    "data.pca_eigval": "3 values (TransformConfig)",
    "data.pca_eigvec": "a 3x3 matrix (TransformConfig)",
    "data.mean_rgb": "3 values (preprocessing.InputConvention)",
    "data.std_rgb": "3 positive values (preprocessing.InputConvention)",
    "data.resize": preprocessing.RESIZE_RULES,
    "data.stats_path": "a path or None",
    "data.eval_scales": "integers >= data.crop_size (check_scales)",
    "data.dense_aspect_buckets": "ratios >= 1",
    "data.cache_eval": BOOL,
    "data.shuffle_buffer": "a positive multiple of data.shuffle_chunk",
    "data.shuffle_chunk": Bound(0, open_low=True, integer=True),
    "data.on_bad_image": BAD_IMAGE_POLICIES,
    "data.num_parallel_calls": Bound(0, open_low=True, integer=True, also=(None,), note="None: tf.data AUTOTUNE"),
    "seed": "an integer",
    "global_batch_size": POSITIVE,
    "grad_accum_steps": AT_LEAST_1,
    "num_train_steps": POSITIVE,
    # 0 is allowed: a run that only copies init_from's weights (e.g. to re-evaluate them).
    "optimizer.learning_rate": Bound(0, note="0: the weights stay"),
    "optimizer.momentum": Bound(0, 1, open_high=True),
    "optimizer.nesterov": BOOL,
    "optimizer.weight_decay": AT_LEAST_0,
    "optimizer.decay_biases": BOOL,
    "optimizer.schedule": SCHEDULES,
    "optimizer.decay_factor": Bound(0, 1, open_low=True),
    "optimizer.patience": AT_LEAST_1,
    "optimizer.min_delta": AT_LEAST_0,
    "optimizer.max_decreases": AT_LEAST_0,
    "optimizer.step_boundaries": "increasing positive steps",
    "optimizer.warmup_steps": AT_LEAST_0,
    "optimizer.lr_base_batch": Bound(0, integer=True, note="N: learning_rate is for a global batch of N; 0: as given"),
    "optimizer.trainable": "a regular expression",
    "init_from": "a run's path or ''",
    "staged_init_from": "a run's path or ''",
    "reset_head": "a bool; True needs init_from",
    "allow_resume_changes": "comma-separated field names",
    "eval_protocol": "methods joined by '+' (parse_protocol)",
    "eval_batch_size": POSITIVE,
    "eval_every_steps": POSITIVE,
    "checkpoint.every_steps": POSITIVE,
    "checkpoint.keep": AT_LEAST_1,
    "checkpoint.keep_best": AT_LEAST_0,
    "checkpoint.async_save": BOOL,
    "checkpoint.allow_unverified": BOOL,
    "checkpoint.fresh_start_if_damaged": BOOL,
    "resume_from_step": Bound(0, note="0: the newest"),
    "rollback.max_rollbacks": Bound(0, note="0: stop at once"),
    "rollback.spike_factor": Bound(1, open_low=True, also=(0,), note="0: no spike rule, non-finite losses only"),
    "rollback.spike_window": AT_LEAST_1,
    "rollback.spike_min_loss": AT_LEAST_0,
    "rollback.steps_before": Bound(1, note="the parameters of the step before a bad loss are the ones that gave it"),
    "rollback.lr_factor": Bound(0, 1, open_low=True),
    "inject_spike.at_batch": Bound(0, note="0: never"),
    "inject_spike.lr_factor": POSITIVE,
    "log_every_steps": POSITIVE,
    "diagnostics.every_steps": Bound(0, note="0: off"),
    "diagnostics.stall_steps": Bound(0, note="0: no stall warning"),
    "diagnostics.stall_margin": Bound(0, 1, open_low=True, open_high=True),
    "profile.start_step": Bound(-1, integer=True, note="-1: never"),
    "profile.num_steps": Bound(1, integer=True),
    "mesh.model": AT_LEAST_1,  # and divides model.fc_width
    "mesh.grad_reduce_dtype": GRAD_REDUCE_DTYPES,
    "distributed.enabled": BOOL,
    "distributed.coordinator_address": "host:port or ''",
    "distributed.num_processes": Bound(0, integer=True, note="0: auto-detected"),
    "distributed.process_id": Bound(-1, integer=True, note="-1: auto-detected"),
}


def describe(rule: Bound | tuple[Any, ...] | str) -> str:
    """A RULES entry in words, as docs/training.md#validation-before-step-1 lists it."""
    if isinstance(rule, Bound):
        return rule.rule().removeprefix("must be ")
    if isinstance(rule, tuple):
        return "one of " + ", ".join(map(str, rule))
    return rule


def _fail(field: str, value: Any, rule: str) -> None:
    flag = field if field.startswith("--") else f"--config.{field}"
    raise ConfigError(f"{flag}={value!r}: {rule}.")


def _check(ok: bool, field: str, value: Any, rule: str) -> None:
    if not ok:
        _fail(field, value, rule)


def _enum(field: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, field, value, f"must be one of {', '.join(map(str, choices))}")


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
    flat = flatten(config.to_dict())
    for field, value in flat.items():
        _check(all(map(math.isfinite, _floats(value))), field, value, "must be finite")
    for field, rule in RULES.items():  # the table's ranges and choices; the string rules are checked below
        if field not in flat:  # a config built without it (the code reads its default)
            continue
        if isinstance(rule, Bound):
            _check(rule.accepts(flat[field]), field, flat[field], rule.rule())
        elif isinstance(rule, tuple):
            _enum(field, flat[field], rule)
    try:
        models.canonical_name(model.name)
    except ValueError as e:
        raise ConfigError(f"--config.model.name={model.name!r}: {e}") from None

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
    chunk, window = data.shuffle_chunk, data.shuffle_buffer
    _check(
        window >= chunk and window % chunk == 0,
        "data.shuffle_buffer",
        window,
        f"must be a positive multiple of data.shuffle_chunk={chunk}",
    )
    bounds = [int(b) for b in opt.step_boundaries]
    _check(
        all(b > 0 for b in bounds) and bounds == sorted(bounds),
        "optimizer.step_boundaries",
        tuple(opt.step_boundaries),
        "must be increasing positive steps",
    )
    try:
        re.compile(opt.trainable)
    except re.error as e:
        _fail("optimizer.trainable", opt.trainable, f"is not a regular expression ({e})")

    parse_protocol(config.eval_protocol)
    _check(
        not (models.canonical_name(model.name).endswith("_bn") and config.mesh.grad_reduce_dtype == "float32"),
        "mesh.grad_reduce_dtype",
        config.mesh.grad_reduce_dtype,
        f"computes each device's gradient apart, where {model.name}'s batch normalisation would use per-device "
        "statistics: use 'compute' with BN models",
    )
    _check(
        model.fc_width % config.mesh.model == 0,
        "mesh.model",
        config.mesh.model,
        f"must divide model.fc_width={model.fc_width} (fc6 and fc7 are split over it by output channel)",
    )
    if config.reset_head and not config.init_from:
        _fail("reset_head", True, "replaces fc8 of the init_from run's parameters: set --config.init_from")
    preprocessing.InputConvention.from_data_config(data)  # mean/std/resize


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
