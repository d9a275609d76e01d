"""The paper's test-time protocols (Sect. 3.2, 4) over a whole evaluation split, and their CLI.

``python -m vgg_jax.evaluate --checkpoint=DIR --protocol=dense --scales=256,384,512``; docs/evaluation.md
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from vgg_jax import cli, data, models, sharding, storage
from vgg_jax.classifier import load
from vgg_jax.config_checks import check_scales, parse_protocol
from vgg_jax.data.config import default_data_config, train_scale
from vgg_jax.errors import ConfigError
from vgg_jax.train_step import topk_correct

_FIELDS = {"center": ("image",), "multicrop": ("image",), "dense": ("image", "height", "width")}

ApplyFn = Callable[..., jax.Array]


# ----------------------------------------------------------------------------------------------
# Posteriors of one batch (pure functions of device arrays)


def center_posteriors(apply_fn: ApplyFn, variables: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Single centre crop: soft-max of the logits. ``batch['image']``: [b, crop, crop, 3]."""
    return jax.nn.softmax(apply_fn(variables, batch["image"], train=False))


def multicrop_posteriors(apply_fn: ApplyFn, variables: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Mean soft-max over the views of each image. ``batch['image']``: [b, views, crop, crop, 3].

    The views are scanned: each step classifies one view of every image of the batch, so the
    device works on the whole (sharded) batch at a time with the memory of a single-crop batch.
    """
    views = jnp.moveaxis(batch["image"], 1, 0)  # [views, b, crop, crop, 3]; the batch stays sharded

    def add(total: jax.Array, crops: jax.Array) -> tuple[jax.Array, None]:
        return total + jax.nn.softmax(apply_fn(variables, crops, train=False)), None

    first = jax.nn.softmax(apply_fn(variables, views[0], train=False))
    total, _ = jax.lax.scan(add, first, views[1:])
    return total / views.shape[0]


def dense_posteriors(apply_fn: ApplyFn, variables: Any, batch: Mapping[str, jax.Array], flip: bool = True) -> jax.Array:
    """Dense evaluation (paper Sect. 3.2) of images on a padded canvas.

    ``batch``: 'image' [b, H, W, 3] with each image at the top-left, 'height' and 'width' [b] its
    size (0 for padding rows). Soft-max of the score map averaged over the image's valid positions,
    averaged with the same for the horizontally flipped image (``flip``).
    """
    image, height, width = batch["image"], batch["height"], batch["width"]
    if flip:  # one pass over [b, 2] views: each image next to its mirror, on the same device
        image = jnp.stack([image, flip_within(image, width)], axis=1).reshape(-1, *image.shape[1:])
        height, width = jnp.repeat(height, 2), jnp.repeat(width, 2)
    posteriors = jax.nn.softmax(dense_scores(apply_fn, variables, image, height, width))
    return posteriors.reshape(batch["image"].shape[0], -1, posteriors.shape[-1]).mean(axis=1)


def dense_scores(apply_fn: ApplyFn, variables: Any, image: jax.Array, height: jax.Array, width: jax.Array) -> jax.Array:
    """Class scores [b, classes]: the score map of each image averaged over its valid positions."""
    with nn.intercept_methods(_zero_outside(height, width, image.shape[1:3])):
        scores = apply_fn(variables, image, train=False, dense=True)  # [b, h', w', classes]
    rows = valid_positions(height, image.shape[1], scores.shape[1])
    cols = valid_positions(width, image.shape[2], scores.shape[2])
    mask = (jnp.arange(scores.shape[1])[None, :, None] < rows[:, None, None]) & (
        jnp.arange(scores.shape[2])[None, None, :] < cols[:, None, None]
    )
    total = jnp.sum(jnp.where(mask[..., None], scores, 0.0), axis=(1, 2))
    return total / jnp.maximum(rows * cols, 1)[:, None].astype(scores.dtype)


def valid_positions(size: jax.Array, canvas: int, map_size: int) -> jax.Array:
    """Score-map positions (along one axis) whose fc6 window lies inside an image of ``size`` pixels.

    pool5 has ``size // 32`` rows of the image and ``canvas // 32`` of the canvas; fc6 (window w)
    gives ``canvas // 32 - w + 1 = map_size`` positions on the canvas, ``size // 32 - w + 1`` on the image.
    """
    return jnp.maximum(map_size - canvas // models.STRIDE + size // models.STRIDE, 0)


def flip_within(image: jax.Array, width: jax.Array) -> jax.Array:
    """Mirrors columns [0, width) of each image of a top-left-aligned canvas; the padding stays."""
    cols = jnp.arange(image.shape[2])[None, :]
    source = jnp.where(cols < width[:, None], width[:, None] - 1 - cols, cols)  # [b, W]
    return jnp.take_along_axis(image, source[:, None, :, None], axis=2)


def _zero_outside(height: jax.Array, width: jax.Array, canvas: tuple[int, int]):
    """A flax method interceptor that zeroes every convolution's input outside the image region.

    At pooling level l (l max-pools applied) the image covers ``size >> l`` rows and columns, as
    the floor of the 2x2 pools gives on the image alone. Max-pool outputs inside that region only
    read image pixels; the partial row/column that follows would be read by the next convolution,
    so the convolution inputs are where the mask goes.
    """
    levels = [(canvas[0] >> level, canvas[1] >> level) for level in range(6)]

    def interceptor(next_fn, args, kwargs, context):
        if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
            x = args[0]
            if tuple(x.shape[1:3]) in levels:
                level = levels.index(tuple(x.shape[1:3]))
                inside = (jnp.arange(x.shape[1])[None, :, None] < (height >> level)[:, None, None]) & (
                    jnp.arange(x.shape[2])[None, None, :] < (width >> level)[:, None, None]
                )
                args = (jnp.where(inside[..., None], x, jnp.zeros((), x.dtype)), *args[1:])
        return next_fn(*args, **kwargs)

    return interceptor


POSTERIORS: dict[str, Callable[..., jax.Array]] = {
    "center": center_posteriors,
    "dense": dense_posteriors,
    "multicrop": multicrop_posteriors,
}


@functools.partial(jax.jit, static_argnames=("apply_fn", "method"))
def posteriors_step(variables: Any, batch: Mapping[str, jax.Array], *, apply_fn: ApplyFn, method: str) -> jax.Array:
    return POSTERIORS[method](apply_fn, variables, batch).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Passes over the split


@dataclasses.dataclass(frozen=True)
class Member:
    """One model of an evaluation: its apply function, variables and data config (crop, mean, ...)."""

    name: str
    apply_fn: ApplyFn
    variables: Any
    data_config: ml_collections.ConfigDict
    class_names: tuple[str, ...] = ()
    label_map: np.ndarray | None = None  # the dataset's label -> the model's class index (None: the same)


@dataclasses.dataclass
class Pass:
    """This process's results of one (model, method, scale) pass, sorted by index in the split."""

    member: str
    method: str
    scale: int
    index: np.ndarray  # int [n]
    label: np.ndarray  # int [n]
    posteriors: np.ndarray  # float32 [n, classes]
    file_name: np.ndarray  # str [n] ('' where the dataset names no files)
    skipped: int  # undecodable images of this process in the pass
    split_size: int


def paper_scales(data_config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """The paper's test scales (Sect. 4.2): {S-32, S, S+32} for fixed S, {S_min, mid, S_max} if jittered."""
    lo, hi = int(data_config.scale_min), int(data_config.scale_max)
    if lo == hi:
        return (max(lo - 32, int(data_config.crop_size)), lo, lo + 32)
    return (lo, (lo + hi) // 2, hi)


def on_mesh(variables: Any, mesh: jax.sharding.Mesh) -> Any:
    """Variables as arrays on ``mesh``: those already there as they are, others replicated (every
    process holds the same values, e.g. restored from one checkpoint)."""
    devices = set(mesh.devices.flat)

    def place(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding.device_set == devices:
            return x
        return jax.make_array_from_process_local_data(sharding.replicated(mesh), np.asarray(x))

    return jax.tree_util.tree_map(place, variables)


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array (each row once), in global order."""
    shards = sorted((s for s in array.addressable_shards if s.replica_id == 0), key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def run_pass(member: Member, method: str, scale: int, mesh: jax.sharding.Mesh, batch_size: int) -> Pass:
    """Posteriors of every valid image of this process at one scale with one method.

    The host fetches a batch's results only after the next batch has been dispatched, so the
    device never waits for the host.
    """
    batches = data.create_eval_iterator(member.data_config, view=method, scale=scale, global_batch_size=batch_size)
    collected: list[tuple[np.ndarray, ...]] = []
    pending = None

    def fetch(posteriors: jax.Array, local: dict[str, np.ndarray]) -> None:
        valid = local["valid"]
        names = np.asarray([n.decode() for n in local["file_name"][valid]], dtype=object)
        labels = local["label"][valid] if member.label_map is None else member.label_map[local["label"][valid]]
        collected.append((local["index"][valid], labels, _local_rows(posteriors)[valid], names))

    from clu import periodic_actions  # noqa: PLC0415  (imports TensorFlow: not at import, for quiet CLIs)

    logging.info(
        "Evaluating %s with %s at Q=%d: %d batches of %d images", member.name, method, scale, len(batches), batch_size
    )
    # clu's progress report (rate, done/total, ETA) every 30 s; a "step" here is a batch.
    progress = periodic_actions.ReportProgress(num_train_steps=len(batches), every_secs=30.0)
    for i, batch in enumerate(batches, start=1):
        if jax.process_index() == 0:
            progress(i)
        inputs = sharding.to_global({k: batch[k] for k in _FIELDS[method]}, mesh)
        compiled, started = posteriors_step._cache_size(), time.perf_counter()
        posteriors = posteriors_step(member.variables, inputs, apply_fn=member.apply_fn, method=method)
        if posteriors_step._cache_size() > compiled:  # a new shape (first batch, a new canvas): it was compiled
            logging.info(
                "compiled the %s step at Q=%d for batches of %s in %.1f s",
                method,
                scale,
                tuple(batch["image"].shape),
                time.perf_counter() - started,
            )
        if pending is not None:
            fetch(*pending)
        pending = (posteriors, {k: batch[k] for k in ("index", "label", "valid", "file_name")})
    if pending is not None:
        fetch(*pending)
    if not collected:
        raise ConfigError(f"The evaluation split {member.data_config.eval_split!r} is empty: choose another split.")
    index, label, posteriors, names = (np.concatenate(parts) for parts in zip(*collected))
    order = np.argsort(index, kind="stable")
    index, label, posteriors, names = index[order], label[order], posteriors[order], names[order]
    twice = index[1:][index[1:] == index[:-1]]
    if len(twice):
        raise RuntimeError(f"{method} at Q={scale}: image {twice[0]} of the split came back twice in one pass.")
    return Pass(member.name, method, scale, index, label, posteriors, names, len(batches.skipped), batches.num_examples)


# ----------------------------------------------------------------------------------------------
# Combining passes: scales, methods, models


@dataclasses.dataclass
class Row:
    """One line of the results table: the average posteriors of a group of passes."""

    key: str  # result-key template, e.g. 'dense/{}@256'; '{}' is top1_error or top5_error
    member: str
    method: str
    scales: tuple[int, ...]
    top1_error: float
    top5_error: float
    images: int


@dataclasses.dataclass
class Report:
    """All rows, the flat result dict and a markdown table in the paper's format."""

    rows: list[Row]
    results: dict[str, float]
    train_scales: dict[str, str]  # per model name: its training scale S, for the table
    final: Pass  # this process's images with the protocol's final posteriors (all passes averaged)

    def markdown(self) -> str:
        lines = [
            "| ConvNet | train (S) | test (Q) | method | top-1 val. error (%) | top-5 val. error (%) | images |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.member} | {self.train_scales.get(r.member, '')} | {','.join(map(str, r.scales))} | {r.method} | "
                f"{r.top1_error:.2f} | {r.top5_error:.2f} | {r.images} |"
            )
        return "\n".join(lines)


def _groups(passes: list[Pass], members: list[str], methods: tuple[str, ...], scales: tuple[int, ...]):
    """(key stem, member, method, scales, passes) for every table row, the final combination last.

    Rows: each pass; per member and method over all scales; per member over all methods; the
    ensemble of all members. Keys omit what has one value only (the model when one model, the
    method when one method), so a single-model single-method run has ``top1_error@Q`` per scale
    and ``top1_error`` for the multi-scale result; each result has one key (the last row is the final one).
    """
    ensemble = len(members) > 1
    several = len(methods) > 1
    protocol = "+".join(methods)

    def stem(member: str | None, method: str | None, scale: int | None) -> str:
        parts = [p for p in (member if ensemble else None, method if several else None) if p]
        return "".join(f"{p}/" for p in parts) + "{}" + (f"@{scale}" if scale is not None else "")

    groups = []
    for member in members:
        for method in methods:
            mine = [p for p in passes if p.member == member and p.method == method]
            for p in mine:
                groups.append((stem(member, method, p.scale), member, method, (p.scale,), [p]))
            if len(scales) > 1:
                groups.append((stem(member, method, None), member, method, scales, mine))
        if several:
            everything = [p for p in passes if p.member == member]
            groups.append((stem(member, None, None), member, protocol, scales, everything))
    if ensemble:
        groups.append(("{}", "ensemble of " + ", ".join(members), protocol, scales, passes))
    return groups


def combine(
    passes: list[Pass], members: list[str], methods: tuple[str, ...], scales: tuple[int, ...]
) -> tuple[list[Row], dict[str, float]]:
    """Rows and results from the passes of every process (the counts are summed over processes)."""
    reference = passes[0]
    for p in passes[1:]:
        if not np.array_equal(p.index, reference.index):
            raise RuntimeError(
                f"{p.member} {p.method}@{p.scale} evaluated other images than {reference.member} "
                f"{reference.method}@{reference.scale} ({len(p.index)} vs {len(reference.index)}): the passes "
                "cannot be averaged per image. Were some images unreadable in one view only?"
            )
        if not np.array_equal(p.label, reference.label):
            raise RuntimeError(f"{p.member} and {reference.member} disagree on labels: not the same evaluation split.")
    groups = _groups(passes, members, methods, scales)
    counts = np.zeros((len(groups) + len(passes), 3), np.int64)
    k5 = min(5, reference.posteriors.shape[1])
    for i, (_, _, _, _, group) in enumerate(groups):
        mean = sum(p.posteriors.astype(np.float64) for p in group) / len(group)
        counts[i] = (
            topk_correct(mean, reference.label, 1).sum(),
            topk_correct(mean, reference.label, k5).sum(),
            len(reference.index),
        )
    for j, p in enumerate(passes):  # per pass: images counted and skipped, for the exactly-once check
        counts[len(groups) + j] = (len(p.index), p.skipped, p.split_size)
    if jax.process_count() > 1:
        counts = multihost_utils.process_allgather(counts).reshape(jax.process_count(), *counts.shape).sum(0)
        counts[len(groups) :, 2] //= jax.process_count()  # the split size is the same number everywhere
    for p, (counted, skipped, size) in zip(passes, counts[len(groups) :]):
        if counted + skipped != size:
            raise RuntimeError(
                f"{p.member} {p.method}@{p.scale}: {counted} images evaluated + {skipped} unreadable != the "
                f"split's {size}: an image was dropped or counted twice."
            )
    rows, results = [], {}
    for (key, member, method, group_scales, _), (top1, top5, images) in zip(groups, counts[: len(groups)]):
        n = max(int(images), 1)
        row = Row(
            key,
            member,
            method,
            tuple(group_scales),
            round(100.0 * (1 - top1 / n), 6),
            round(100.0 * (1 - top5 / n), 6),
            int(images),
        )
        rows.append(row)
        results[key.format("top1_error")] = row.top1_error
        results[key.format("top5_error")] = row.top5_error
    results["images"] = rows[-1].images
    return rows, results


def evaluate_members(
    members: Sequence[Member],
    mesh: jax.sharding.Mesh,
    *,
    protocol: str = "center",
    scales: Iterable[int] | None = None,
    batch_size: int = 64,
) -> Report:
    """Evaluates one model or an ensemble with a protocol at the given test scales."""
    if not members:
        raise ValueError("Nothing to evaluate: pass at least one model.")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"Model names must be unique in an ensemble, got {names}.")
    methods = parse_protocol(protocol)
    scales = tuple(int(s) for s in (scales or members[0].data_config.eval_scales))
    for m in members:
        check_scales(scales, m.data_config.crop_size, "--scales")
    batch_size = sharding.round_up_batch(batch_size, mesh, "evaluation batch")
    members = [dataclasses.replace(m, variables=on_mesh(m.variables, mesh)) for m in members]
    passes = [run_pass(m, method, q, mesh, batch_size) for m in members for method in methods for q in scales]
    rows, results = combine(passes, names, methods, scales)
    scales_s = {m.name: train_scale(m.data_config.scale_min, m.data_config.scale_max) for m in members}
    final = sum(p.posteriors.astype(np.float64) for p in passes) / len(passes)
    return Report(rows, results, scales_s, dataclasses.replace(passes[0], method=protocol, posteriors=final))


def evaluate(
    apply_fn: ApplyFn,
    variables: Any,
    data_config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    *,
    protocol: str = "center",
    scales: Iterable[int] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Top-1/top-5 error (%) of one model: ``top1_error@Q`` per test scale, ``top1_error`` over all
    (and per method with ``/``-prefixed keys for combined protocols), and ``images``."""
    member = Member("model", apply_fn, variables, data_config)
    return evaluate_members([member], mesh, protocol=protocol, scales=scales, batch_size=batch_size).results


# ----------------------------------------------------------------------------------------------
# CLI


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_multi_string(
        "checkpoint",
        [],
        "A training workdir, its checkpoints dir, a step dir or converted weights; repeat for an ensemble.",
        flag_values=values,
    )
    flags.DEFINE_string("protocol", "dense", "center, dense, multicrop, or several joined by '+'.", flag_values=values)
    flags.DEFINE_string(
        "scales",
        None,
        "Comma-separated test scales Q, or 'paper' ({S-32,S,S+32} or "
        "{S_min,mid,S_max}); default: the first model's data.eval_scales.",
        flag_values=values,
    )
    flags.DEFINE_integer("batch_size", 64, "Images per global batch.", flag_values=values)
    flags.DEFINE_string(
        "out", None, "Directory for the JSON and markdown results (default: <workdir>/eval).", flag_values=values
    )
    flags.DEFINE_string(
        "predictions",
        None,
        "Also write one CSV row per evaluated image here: file name, label, the top-5 classes "
        "and their posteriors under the protocol.",
        flag_values=values,
    )
    flags.DEFINE_bool(
        "allow_unverified",
        False,
        "Also load checkpoint steps without checksum files (not written by vgg_jax as they are).",
        flag_values=values,
    )
    config_flags.DEFINE_config_dict(
        "data",
        default_data_config(),
        "Data fields to override in the checkpoint's config, e.g. --data.eval_split=validation[:1000].",
        flag_values=values,
        sys_argv=argv,
    )
    config_flags.DEFINE_config_dict(
        "distributed",
        sharding.default_distributed_config(),
        "jax.distributed, as --config.distributed of training.",
        flag_values=values,
        sys_argv=argv,
    )


_LOCATION = ("dataset", "data_dir", "manual_dir", "folder", "download", "eval_split")


def members_from_paths(
    paths: Sequence[str], overrides: Mapping[str, Any], *, allow_unverified: bool = False
) -> list[Member]:
    """Loads each checkpoint; all read the first one's dataset and split, then ``overrides`` (data fields)."""
    loaded = [load(path, allow_unverified=allow_unverified) for path in paths]
    location = {k: loaded[0].config.data[k] for k in _LOCATION}
    members = []
    for i, model in enumerate(loaded):
        data_config = ml_collections.ConfigDict(model.config.data.to_dict())
        data_config.update(location)
        for path, value in overrides.items():
            data_config[path] = value
        if model.class_names != loaded[0].class_names:
            raise ConfigError(f"{paths[i]} predicts other classes than {paths[0]}: an ensemble needs the same classes.")
        name = f"{model.config.model.name}#{i}" if len(paths) > 1 else model.config.model.name
        mapping = label_map(model.class_names, data_config, paths[i])
        members.append(Member(name, model.apply_fn, model.variables, data_config, tuple(model.class_names), mapping))
    return members


def label_map(model_names: Sequence[str], data_config: ml_collections.ConfigDict, where: str) -> np.ndarray | None:
    """The evaluation dataset's labels as the model's class indices, matched by class name (None: the same
    names in the same order). Every class of the dataset must be one of the model's (a subset is evaluated
    over all the model's classes); a checkpoint that names no classes ("0", "1", ...) is matched by position
    and needs the same count. ConfigError otherwise: scores against mismatched labels mean nothing."""
    names = list(data.class_names(data_config))
    model_names = list(model_names)
    where = f"{where} ({len(model_names)} classes)"
    there = f"{data_config.dataset} {data_config.eval_split} ({len(names)} classes)"
    if model_names == names:
        return None
    if model_names == [str(i) for i in range(len(model_names))]:  # unnamed (converted without --class_names)
        if len(names) != len(model_names):
            raise ConfigError(
                f"{where} names no classes and {there} has another class count, so labels cannot be matched. "
                "Evaluate on data with the checkpoint's classes (or convert it with --class_names)."
            )
        logging.warning("%s names no classes: the labels of %s are taken by position.", where, there)
        return None
    index = {n: i for i, n in enumerate(model_names)}
    missing = [n for n in names if n not in index]
    if missing:
        ours = ", ".join(map(repr, model_names[:3]))
        raise ConfigError(
            f"The class names of {there} are not those of {where}: {', '.join(map(repr, missing[:3]))} "
            f"{'is' if len(missing) == 1 else 'are'} not among the checkpoint's ({ours}, ...), so labels cannot be "
            "matched by name. Evaluate on data whose class folders are named as the checkpoint's classes."
        )
    if len(names) < len(model_names):
        logging.warning("%s has %d of the classes of %s, matched by name.", there, len(names), where)
    else:
        logging.info("The labels of %s are matched to %s by class name (another order).", there, where)
    return np.asarray([index[n] for n in names], np.int64)


def parse_scales(text: str | None) -> tuple[int, ...] | None:
    """'256,384,512' -> (256, 384, 512); None stays None (the config's scales)."""
    if text is None:
        return None
    try:
        return tuple(int(q) for q in text.split(","))
    except ValueError:
        raise ConfigError(f"--scales={text!r}: give comma-separated integers (e.g. 256,384,512) or 'paper'.") from None


def default_out(path: str) -> epath.Path:
    """``<workdir>/eval`` for a workdir, checkpoints dir or step dir; ``<path>/eval`` otherwise."""
    path = storage.path(path)
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent / "eval"
    if path.name == "checkpoints":
        return path.parent / "eval"
    return path / "eval"


def main(argv: Sequence[str] | None = None) -> Report:
    values, rest = cli.parse(argv, define_flags, "python -m vgg_jax.evaluate", __doc__)
    if rest:
        cli.fail(f"unexpected arguments {rest}: name checkpoints with --checkpoint=PATH.")
    paths = values.checkpoint
    if not paths:
        cli.fail(
            "give --checkpoint=PATH (a training workdir, a step dir or converted weights; several for an ensemble)."
        )
    parse_protocol(values.protocol)  # fail before loading anything
    sharding.initialize_distributed(values.distributed)
    from vgg_jax.data import pipeline

    pipeline.setup_tensorflow()
    members = members_from_paths(
        paths, config_flags.get_override_values(values["data"]), allow_unverified=values.allow_unverified
    )
    scales = paper_scales(members[0].data_config) if values.scales == "paper" else parse_scales(values.scales)
    report = evaluate_members(
        members, sharding.make_mesh(), protocol=values.protocol, scales=scales, batch_size=values.batch_size
    )
    if jax.process_index() == 0:
        out = storage.path(values.out) if values.out else default_out(paths[0])
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{values.protocol}_{'-'.join(str(r) for r in report.rows[-1].scales)}"
        record = dict(
            protocol=values.protocol,
            checkpoints=list(paths),
            split=members[0].data_config.eval_split,
            results=report.results,
            rows=[dataclasses.asdict(r) for r in report.rows],
        )
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
        (out / f"{stem}.md").write_text(report.markdown() + "\n")
        print(report.markdown())
        print(json.dumps(report.results))
        print(f"Wrote {out / stem}.json and {out / stem}.md", file=sys.stderr)
    if values.predictions:
        write_predictions(values.predictions, report.final, members[0].data_config, members[0].class_names)
    return report


def _allgather_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's rows, concatenated in process order (strings as fixed-width UTF-8 bytes)."""
    if jax.process_count() == 1:
        return rows
    n = len(next(iter(rows.values())))
    counts = multihost_utils.process_allgather(np.array([n])).reshape(-1)
    out = {}
    for key, column in rows.items():
        text = column.dtype == object
        if text:
            encoded = [str(v).encode() for v in column]
            width = int(multihost_utils.process_allgather(np.array([max(map(len, encoded), default=0)])).max())
            column = np.array([np.frombuffer(e.ljust(width, b"\0"), np.uint8) for e in encoded]).reshape(n, width)
        padded = np.zeros((int(counts.max()), *column.shape[1:]), column.dtype)
        padded[:n] = column
        gathered = multihost_utils.process_allgather(padded)
        parts = np.concatenate([gathered[p, : counts[p]] for p in range(len(counts))])
        if text:
            parts = np.array([bytes(r).rstrip(b"\0").decode() for r in parts], dtype=object)
        out[key] = parts
    return out


def write_predictions(path: str, final: Pass, data_config: ml_collections.ConfigDict, names: Sequence[str]) -> None:
    """One CSV row per evaluated image (all processes'): split index, file name, label, the top-5 classes and
    their posteriors. Process 0 writes it."""
    k = min(5, final.posteriors.shape[1])
    top = np.argsort(-final.posteriors, axis=1, kind="stable")[:, :k]
    rows = _allgather_rows(
        {
            "index": final.index,
            "file_name": final.file_name,
            "label": final.label,
            "top": top,
            "score": np.take_along_axis(final.posteriors, top, axis=1),
        }
    )
    if jax.process_index() != 0:
        return
    order = np.argsort(rows["index"], kind="stable")
    header = ["index", "file_name", "label", "label_name"]
    header += [f"{c}{i}" for i in range(1, k + 1) for c in ("top", "score")]
    text = io.StringIO(newline="")
    out = csv.writer(text)
    out.writerow(header)
    for i in order:
        name = rows["file_name"][i] or f"{data_config.dataset} {data_config.eval_split}[{rows['index'][i]}]"
        cells = [int(rows["index"][i]), name, int(rows["label"][i]), names[int(rows["label"][i])]]
        for c, p in zip(rows["top"][i], rows["score"][i]):
            cells += [int(c), f"{p:.6g}"]
        out.writerow(cells)
    file = storage.path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text.getvalue())
    print(f"Wrote {len(order)} predictions to {file}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, tensorflow=True)
