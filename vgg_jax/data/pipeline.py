"""Per-process tf.data input pipelines: an infinite, resumable train iterator and finite eval passes.

docs/data.md
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import models, sharding
from vgg_jax.data import sources, transforms
from vgg_jax.data.config import BAD_IMAGE_POLICIES, MULTICROP_GRID, VIEWS, TransformConfig
from vgg_jax.data.sources import DatasetError, Source
from vgg_jax.errors import CheckpointError, UserError


def setup_tensorflow() -> None:
    """Hides the accelerators from TensorFlow: JAX owns them, tf.data needs only the CPU (a GPU build of
    TF would otherwise reserve their memory). Entry points call this once, before the first pipeline."""
    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # TF already initialised its devices, or has no such type
        pass


log = logging.getLogger(__name__)

STATE_VERSION = 1
_SEED_TAGS = {"chunks": 1, "window": 2, "augment": 3}
_GUARD_GROUP = 8  # examples decoded per error-guarded group (see _guarded)


class BadImageError(UserError):
    """An image could not be decoded and ``on_bad_image='fail'``."""


# ----------------------------------------------------------------------------------------------
# Public API


def num_classes(data_config: Any) -> int:
    return len(sources.get_source(data_config).class_names)


def class_names(data_config: Any) -> list[str]:
    return sources.get_source(data_config).class_names


def num_examples(data_config: Any, split: str) -> int:
    source = sources.get_source(data_config)
    sources.check_split(source, split)
    return source.num_examples(split)


def create_train_iterator(
    data_config: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """Infinite per-process batches {'image' f32 [b, crop, crop, 3], 'label' i32 [b], 'index' i32 [b]}.

    b = global_batch_size / process_count; 'index' is each example's position in the split.
    """
    process_index, process_count = _process(process_index, process_count)
    batch = sharding.split_batch(global_batch_size, num_processes=process_count)
    source = _source(data_config, data_config.train_split)
    chunk, window = _shuffle_sizes(data_config)
    shard = _Shard.build(source, data_config.train_split, process_index, process_count, chunk)
    if shard.num_examples == 0:
        raise DatasetError(
            f"{source.name} {data_config.train_split} has {source.num_examples(data_config.train_split)} examples, "
            f"fewer than the {process_count} processes: process {process_index} would get none."
        )
    layout = dict(
        dataset=source.name,
        split=data_config.train_split,
        seed=int(seed),
        process_index=process_index,
        process_count=process_count,
        examples=shard.num_examples,
        shuffle_chunk=chunk,
        shuffle_buffer=window,
    )
    transform_config = TransformConfig.from_config(data_config)
    make = functools.partial(
        _train_dataset, source, shard, data_config, transform_config, int(seed), batch, chunk, window
    )
    return TrainIterator(make, layout, _Reporter(source, data_config))


def create_eval_iterator(
    data_config: Any,
    *,
    view: str,
    scale: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> EvalIterable:
    """Finite, re-iterable eval passes over ``data_config.eval_split`` at test scale ``scale`` (Q).

    Batches hold 'image', 'label', 'index' (-1 on padding), 'valid' (False on padding and on
    undecodable images) and 'file_name' (bytes; empty where the dataset names no files); every
    process yields the same number of batches. Views:
    'center': image [b, crop, crop, 3], the centre crop at shorter side Q;
    'multicrop': image [b, 50, crop, crop, 3], the 5x5 grid then the same crops flipped;
    'dense': image [b, H, W, 3], the whole image at shorter side Q at the top-left of a canvas
    (a few static (H, W) buckets, batches never mix them), with its 'height' and 'width'.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown eval view {view!r}; use one of {VIEWS}.")
    process_index, process_count = _process(process_index, process_count)
    batch = sharding.split_batch(global_batch_size, num_processes=process_count)
    split = data_config.eval_split
    source = _source(data_config, split)
    transform_config = TransformConfig.from_config(data_config)
    transforms.check_scale(scale, transform_config)
    shards = [_Shard.build(source, split, p, process_count) for p in range(process_count)]
    build = _dense_passes if view == "dense" else _single_pass
    passes = build(source, shards, process_index, data_config, transform_config, view, scale, batch)
    dataset = functools.reduce(lambda a, b: a.concatenate(b), [p.dataset for p in passes])
    pre_skipped = [k for p in passes for k in p.pre_skipped]
    total = source.num_examples(split)
    num_batches = sum(p.num_batches for p in passes)
    return EvalIterable(dataset.prefetch(2), num_batches, total, pre_skipped, _Reporter(source, data_config))


# ----------------------------------------------------------------------------------------------
# Iterators


class _Reporter:
    """Turns flagged (undecodable) examples into warnings or a ``BadImageError``."""

    def __init__(self, source: Source, data_config: Any):
        if data_config.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {data_config.on_bad_image!r}.")
        self.fail = data_config.on_bad_image == "fail"
        self.source = source
        self.count = 0

    def __call__(self, keys: list[str]) -> None:
        if not keys:
            return
        if self.fail:
            raise BadImageError(
                f"cannot decode {keys[0]} of {self.source.name} (corrupt, truncated or not an image); "
                "fix or remove the file, or set --config.data.on_bad_image=skip to skip and count such images."
            )
        for key in keys:
            self.count += 1
            log.warning("skipped undecodable image %s (%d skipped so far)", key, self.count)


class TrainIterator:
    """Infinite iterator of per-process numpy batches, with a JSON-able, exact position.

    ``get_state()`` is the position after the last batch returned (not after what tf.data has
    prefetched); ``set_state(state)`` continues right after it. The state holds the layout it was
    made with (dataset, split, seed, process index/count, shard size, shuffle sizes): restoring it
    into a different layout is an error, since positions would then mean other examples.
    """

    def __init__(self, make: Callable[[int, int], tf.data.Dataset], layout: dict, reporter: _Reporter):
        self._make = make
        self._layout = layout
        self._reporter = reporter
        self._epoch, self._position = 0, 0
        self._it: Iterator[dict] | None = None

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._make(self._epoch, self._position).as_numpy_iterator()
        b = next(self._it)
        self._reporter([k for keys in b["bad_keys"] if keys for k in keys.decode().split("\n") if k])
        self._epoch, self._position = int(b["epoch"][-1]), int(b["position"][-1]) + 1
        if self._position == self._layout["examples"]:
            self._epoch, self._position = self._epoch + 1, 0
        return {"image": b["image"], "label": b["label"], "index": b["index"]}

    @property
    def epoch(self) -> float:
        """Epochs of this process's examples consumed so far (fractional)."""
        return self._epoch + self._position / self._layout["examples"]

    @property
    def num_skipped(self) -> int:
        """Undecodable images skipped by this iterator (and the runs it was restored from)."""
        return self._reporter.count

    def get_state(self) -> dict[str, Any]:
        return dict(
            version=STATE_VERSION,
            epoch=self._epoch,
            position=self._position,
            skipped=self._reporter.count,
            layout=dict(self._layout),
        )

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"train iterator state version {state.get('version')} != {STATE_VERSION}: {state}")
        saved = state["layout"]
        diff = {k: (saved.get(k), v) for k, v in self._layout.items() if saved.get(k) != v}
        if diff:
            raise CheckpointError(
                "the saved data-iterator state belongs to another input layout, so its position would name "
                f"other examples; differing fields (saved, now): {diff}. Resume with the same dataset, split, "
                "seed, process count and shuffle sizes, or start the data order afresh (no set_state)."
            )
        if not 0 <= int(state["position"]) < self._layout["examples"]:
            raise CheckpointError(f"state position {state['position']} outside [0, {self._layout['examples']}).")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
        self._reporter.count = int(state["skipped"])
        self._it = None

    def resume(self, states: Mapping[int, dict[str, Any]]) -> str | None:
        """Continues after a checkpoint's iterator states (every process's, by process index).

        The same layout: exactly after the last batch this process returned. Another process count:
        the number of examples consumed over all processes is what is kept. Each process continues the
        same epoch at the same fraction of its new shard, so until that epoch ends some examples may be
        seen twice or not at all; later epochs are whole. Returns a message saying so (None: exact).
        """
        mine = states.get(self._layout["process_index"])
        if mine is not None and mine.get("layout") == self._layout:
            self.set_state(mine)
            return None
        saved = [states[i] for i in sorted(states)]
        old = saved[0]["layout"]
        fixed = ("dataset", "split", "seed", "shuffle_chunk", "shuffle_buffer")
        diff = {k: (old.get(k), self._layout[k]) for k in fixed if old.get(k) != self._layout[k]}
        if diff or any(s.get("version") != STATE_VERSION for s in saved):
            raise CheckpointError(
                "the saved data-iterator states belong to another input (differing fields, saved and now: "
                f"{diff}); resume with the same dataset, split, seed and shuffle sizes."
            )
        if sorted(states) != list(range(old["process_count"])):
            raise CheckpointError(
                f"the checkpoint holds iterator states of processes {sorted(states)} but was written by "
                f"{old['process_count']}: it is incomplete."
            )
        total = sum(s["layout"]["examples"] for s in saved)
        consumed = sum(s["epoch"] * s["layout"]["examples"] + s["position"] for s in saved)
        epoch, within = divmod(consumed, total)
        position = min(round(within / total * self._layout["examples"]), self._layout["examples"] - 1)
        self._epoch, self._position, self._it = epoch, position, None
        self._reporter.count = sum(int(s["skipped"]) for s in saved) if self._layout["process_index"] == 0 else 0
        return (
            f"input layout changed ({old['process_count']} -> {self._layout['process_count']} processes): "
            f"{consumed} examples were consumed ({within} of {total} in epoch {epoch}); this process continues "
            f"epoch {epoch} at example {position} of its {self._layout['examples']}, in the new layout's order, so "
            "until this epoch ends some examples may be seen twice or not at all; later epochs are whole."
        )


class EvalIterable:
    """One pass per ``iter()``: numpy batches; ``skipped`` lists the undecodable examples of the last pass."""

    def __init__(
        self, dataset: tf.data.Dataset, num_batches: int, num_examples: int, pre_skipped: list[str], reporter: _Reporter
    ):
        self._dataset = dataset
        self.num_batches = num_batches
        self.num_examples = num_examples  # in the whole split, over all processes
        self._pre_skipped = pre_skipped  # unreadable even in the header scan (dense view)
        self._reporter = reporter
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.skipped = []
        self._reporter(list(self._pre_skipped))
        self.skipped += self._pre_skipped
        for b in self._dataset.as_numpy_iterator():
            bad = [k.decode() for k, v, i in zip(b.pop("key"), b["valid"], b["index"]) if i >= 0 and not v]
            self._reporter(bad)
            self.skipped += bad
            yield b


# ----------------------------------------------------------------------------------------------
# Reading records


@dataclasses.dataclass(frozen=True)
class _Shard:
    """One process's part of a split as record pieces (file, skip, take) in split order.

    Pieces never cross a chunk boundary (chunks: ``chunk`` consecutive examples of the shard, the
    last one possibly shorter); ``chunk_splits`` are the row splits from chunks to pieces.
    """

    files: tuple[str, ...]
    piece_file: np.ndarray
    piece_skip: np.ndarray
    piece_take: np.ndarray
    piece_start: np.ndarray  # index in the split of each piece's first example
    chunk_splits: np.ndarray
    start: int  # index in the split of the shard's first example
    num_examples: int

    @classmethod
    def build(cls, source: Source, split: str, process_index: int, process_count: int, chunk: int = 1 << 40) -> _Shard:
        infos = [source.builder.info.splits[s] for s in tfds.even_splits(split, process_count)]
        start = sum(i.num_examples for i in infos[:process_index])
        files: dict[str, int] = {}
        pieces, splits, pos = [], [0], 0
        for fi in infos[process_index].file_instructions:
            skip, left = fi.skip, fi.take
            file_id = files.setdefault(fi.filename, len(files))
            while left > 0:
                n = min(left, chunk - pos % chunk)
                pieces.append((file_id, skip, n, start + pos))
                skip, left, pos = skip + n, left - n, pos + n
                if pos % chunk == 0:
                    splits.append(len(pieces))
        if pos % chunk:
            splits.append(len(pieces))
        p = np.array(pieces, np.int64).reshape(-1, 4)
        return cls(tuple(files), p[:, 0], p[:, 1], p[:, 2], p[:, 3], np.array(splits, np.int64), start, pos)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_splits) - 1

    def read(self, pieces: tf.Tensor | np.ndarray, parallel: int) -> tf.data.Dataset:
        """dict(serialized record, int64 index in the split) of the given pieces, deterministic order."""
        files = tf.constant(list(self.files), tf.string)  # typed: a process may have no examples
        pf, ps, pt, p0 = (
            tf.constant(x, tf.int64) for x in (self.piece_file, self.piece_skip, self.piece_take, self.piece_start)
        )

        def read_piece(i: tf.Tensor) -> tf.data.Dataset:
            records = tf.data.TFRecordDataset(files[pf[i]]).skip(ps[i]).take(pt[i])
            index = tf.data.Dataset.range(p0[i], p0[i] + pt[i])
            return tf.data.Dataset.zip(dict(serialized=records, index=index))

        return tf.data.Dataset.from_tensor_slices(pieces).interleave(
            read_piece, cycle_length=parallel, num_parallel_calls=parallel, deterministic=True
        )


def _parser(source: Source) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    spec = {
        source.image_key: tf.io.FixedLenFeature([], tf.string),
        source.label_key: tf.io.FixedLenFeature([], tf.int64),
    }
    if source.file_name_key:
        spec[source.file_name_key] = tf.io.FixedLenFeature([], tf.string)

    def parse(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = tf.io.parse_single_example(serialized, spec)
        return dict(
            image=ex[source.image_key],
            label=tf.cast(ex[source.label_key], tf.int32),
            file_name=ex[source.file_name_key] if source.file_name_key else tf.constant(""),
        )

    return parse


def _key(source: Source, split: str, index: tf.Tensor, file_name: tf.Tensor) -> tf.Tensor:
    """'<dataset> <split>[<index>]' plus ' (<file_name>)' where the dataset names its files."""
    key = tf.strings.join([f"{source.name} {split}[", tf.strings.as_string(index), "]"])
    return tf.cond(tf.strings.length(file_name) > 0, lambda: tf.strings.join([key, " (", file_name, ")"]), lambda: key)


def _guarded(
    fn: Callable[[dict], dict], fallback: Callable[[dict], dict], parallel: int, group: int = _GUARD_GROUP
) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
    """Map ``fn`` over a dataset in parallel; where it raises, emit ``fallback(element)`` instead.

    Groups of ``group`` consecutive elements run in their own small dataset whose errors
    ``ignore_errors`` drops: a group that comes out whole is used as is; otherwise each of its
    elements is redone alone the same way, and the failing ones are replaced by ``fallback``. A bad
    image thus costs one flagged element, never the iterator, and the common case pays for one
    small dataset per group rather than per element. Order is deterministic.
    """

    def one(el: dict) -> tf.data.Dataset:
        ok = tf.data.Dataset.from_tensors(el).map(fn).ignore_errors()
        return ok.concatenate(tf.data.Dataset.from_tensors(el).map(fallback)).take(1)

    def many(els: dict) -> tf.data.Dataset:
        n = tf.shape(tf.nest.flatten(els)[0])[0]
        items = tf.data.Dataset.from_tensor_slices(els)
        whole = items.map(fn).batch(group).ignore_errors()  # an error drops a batch; later ones are partial
        whole = whole.filter(lambda b: tf.shape(tf.nest.flatten(b)[0])[0] == n)
        one_by_one = items.interleave(one, cycle_length=1).batch(group)
        return whole.concatenate(one_by_one).take(1).unbatch()

    return lambda ds: ds.batch(group).interleave(
        many, cycle_length=parallel, block_length=group, num_parallel_calls=parallel, deterministic=True
    )


# ----------------------------------------------------------------------------------------------
# Train


def _fold(seed: tf.Tensor, *data: tf.Tensor | int) -> tf.Tensor:
    for d in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64))
    return seed


def _train_dataset(
    source: Source,
    shard: _Shard,
    data_config: Any,
    transform_config: TransformConfig,
    seed: int,
    batch: int,
    chunk: int,
    window: int,
    start_epoch: int,
    start_position: int,
) -> tf.data.Dataset:
    """Batches from (start_epoch, start_position) on, with bookkeeping fields for the iterator."""
    parallel = _parallel(data_config)
    parse = _parser(source)
    split = data_config.train_split
    base = _fold(tf.constant([seed, 0], tf.int64), shard.start)  # shards differ per process
    window_chunks = window // chunk
    n_chunks = shard.num_chunks
    full = shard.num_examples // chunk  # a short last chunk stays last: all windows but the last are full
    n_windows = -(-n_chunks // window_chunks)
    pieces_of = tf.RaggedTensor.from_row_splits(tf.range(len(shard.piece_file), dtype=tf.int64), shard.chunk_splits)

    def epoch_elements(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(full, dtype=tf.int64), _fold(base, _SEED_TAGS["chunks"], epoch)
        )
        order = tf.concat([order, tf.range(full, n_chunks, dtype=tf.int64)], 0)
        resumed = epoch == start_epoch  # the first epoch starts at the saved position
        first = tf.where(resumed, tf.constant(start_position // window, tf.int64), 0)
        drop = tf.where(resumed, tf.constant(start_position % window, tf.int64), 0)

        def load_window(w: tf.Tensor) -> dict[str, tf.Tensor]:
            pieces = tf.gather(pieces_of, order[w * window_chunks : (w + 1) * window_chunks]).flat_values
            records = shard.read(pieces, parallel).batch(window).get_single_element()
            serialized, index = records["serialized"], records["index"]
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(tf.size(index)), _fold(base, _SEED_TAGS["window"], epoch, w)
            )
            n = tf.size(index, out_type=tf.int64)
            return dict(
                serialized=tf.gather(serialized, perm),
                index=tf.gather(index, perm),
                epoch=tf.fill([n], epoch),
                position=w * window + tf.range(n),
            )

        windows = tf.data.Dataset.range(first, n_windows).map(load_window).prefetch(1)
        return windows.flat_map(tf.data.Dataset.from_tensor_slices).skip(drop)

    def process(el: dict) -> dict:
        ex = parse(el["serialized"])
        seed = _fold(base, _SEED_TAGS["augment"], el["epoch"], el["index"])
        image = transforms.train_view(ex["image"], seed, transform_config)
        return dict(
            image=image,
            label=ex["label"],
            index=el["index"],
            epoch=el["epoch"],
            position=el["position"],
            ok=tf.constant(True),
            key=tf.constant(""),
        )

    def fallback(el: dict) -> dict:
        ex = parse(el["serialized"])
        return dict(
            image=tf.zeros([transform_config.crop_size, transform_config.crop_size, 3]),
            label=ex["label"],
            index=el["index"],
            epoch=el["epoch"],
            position=el["position"],
            ok=tf.constant(False),
            key=_key(source, split, el["index"], ex["file_name"]),
        )

    def carry_bad(state: tuple, el: dict) -> tuple:
        """Attach the keys of the flagged examples since the last good one to the next good one;
        a whole epoch's worth of flagged examples in a row stops the run instead of spinning."""
        keys, run = state
        check = tf.debugging.Assert(
            run < shard.num_examples,
            [
                f"no decodable image in {shard.num_examples} consecutive examples of {source.name} {split} "
                "(this process's whole part of the split): the files are unreadable. Last ones:",
                keys,
            ],
            summarize=1,
        )
        with tf.control_dependencies([check]):
            ok = tf.identity(el["ok"])
        out = dict(el, bad_keys=tf.where(ok, keys, ""))
        keys = tf.where(ok, "", tf.strings.join([keys, el["key"], "\n"]))
        return (keys, tf.where(ok, tf.constant(0, tf.int64), run + 1)), out

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_elements)
    ds = ds.apply(_guarded(process, fallback, parallel))
    ds = ds.scan((tf.constant(""), tf.constant(0, tf.int64)), carry_bad).filter(lambda el: el["ok"])
    ds = ds.batch(batch, drop_remainder=True).map(
        lambda b: dict({k: v for k, v in b.items() if k not in ("ok", "key")}, index=tf.cast(b["index"], tf.int32))
    )
    return ds.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# Eval

DummyFn = Callable[[], dict]  # the view fields of a placeholder row (zeros), built inside tf.data


@dataclasses.dataclass
class _Pass:
    dataset: tf.data.Dataset
    num_batches: int
    pre_skipped: list[str]


def _eval_elements(
    source: Source,
    shard: _Shard,
    data_config: Any,
    fn: Callable[[tf.Tensor], dict],
    dummy: DummyFn,
    keep: np.ndarray | None = None,
) -> tf.data.Dataset:
    """The shard's examples (those with ``keep[index - shard.start]``), each through ``fn`` guarded:
    dict(view fields, label, index, valid, key)."""
    parallel = _parallel(data_config)
    parse = _parser(source)
    split = data_config.eval_split
    ds = shard.read(np.arange(len(shard.piece_file)), parallel)
    if keep is not None:
        table = tf.constant(keep)
        ds = ds.filter(lambda el: table[el["index"] - shard.start])

    def process(el: dict) -> dict:
        ex = parse(el["serialized"])
        return dict(
            fn(ex["image"]),
            label=ex["label"],
            index=tf.cast(el["index"], tf.int32),
            valid=tf.constant(True),
            key=tf.constant(""),
            file_name=ex["file_name"],
        )

    def fallback(el: dict) -> dict:
        ex = parse(el["serialized"])
        return dict(
            dummy(),
            label=ex["label"],
            index=tf.cast(el["index"], tf.int32),
            valid=tf.constant(False),
            key=_key(source, split, el["index"], ex["file_name"]),
            file_name=ex["file_name"],
        )

    ds = ds.apply(_guarded(process, fallback, parallel))
    return ds.cache() if data_config.cache_eval else ds


def _padded(ds: tf.data.Dataset, count: int, num_batches: int, batch: int, dummy: DummyFn) -> tf.data.Dataset:
    """Append invalid rows after ``count`` examples up to ``num_batches`` full batches."""
    pad = tf.data.Dataset.range(num_batches * batch - count).map(
        lambda _: dict(
            dummy(),
            label=tf.constant(0),
            index=tf.constant(-1),
            valid=tf.constant(False),
            key=tf.constant(""),
            file_name=tf.constant(""),
        )
    )
    return ds.concatenate(pad).batch(batch)


def _single_pass(source, shards, process_index, data_config, transform_config, view, scale, batch) -> list[_Pass]:
    c = transform_config.crop_size
    if view == "center":
        fn = lambda img: dict(image=transforms.eval_center_view(img, scale, transform_config))  # noqa: E731
        dummy = lambda: dict(image=tf.zeros([c, c, 3]))  # noqa: E731
    else:
        fn = lambda img: dict(image=transforms.multicrop_views(img, scale, transform_config, MULTICROP_GRID))  # noqa: E731
        dummy = lambda: dict(image=tf.zeros([2 * MULTICROP_GRID**2, c, c, 3]))  # noqa: E731
    num_batches = -(-max(s.num_examples for s in shards) // batch)
    shard = shards[process_index]
    ds = _eval_elements(source, shard, data_config, fn, dummy)
    return [_Pass(_padded(ds, shard.num_examples, num_batches, batch, dummy), num_batches, [])]


def dense_canvases(scale: int, aspect_buckets: list[float]) -> list[tuple[int, int]]:
    """(height, width) of the dense canvases: landscape ones, then portrait ones, small to large.

    The shorter side is Q; the longer one ceil32(ratio * Q) for each ratio (>= 1) of the config.
    """
    if not aspect_buckets or min(aspect_buckets) < 1:
        raise ValueError(f"dense_aspect_buckets must be ratios >= 1 (long / short side), got {aspect_buckets}.")
    longs = sorted({max(scale, math.ceil(r * scale / models.STRIDE) * models.STRIDE) for r in aspect_buckets})
    return [(scale, L) for L in longs] + [(L, scale) for L in longs if L > scale]


def dense_buckets(sizes: np.ndarray, scale: int, canvases: list[tuple[int, int]]) -> np.ndarray:
    """Canvas index for images of source (height, width) ``sizes``; -1 where a size is 0 (unreadable).

    The image at shorter side Q (as ``transforms.shorter_side_size`` computes it) goes to the
    smallest canvas of its orientation (square: landscape) that holds it, else the largest one.
    """
    hw = sizes.astype(np.float32)
    ratio = np.float32(scale) / np.maximum(hw.min(1, keepdims=True), 1)
    out = np.maximum(np.round(hw * ratio), scale)
    portrait = out[:, 0] > out[:, 1]
    bucket = np.full(len(sizes), -1, np.int64)
    for k in reversed(range(len(canvases))):
        H, W = canvases[k]
        bucket = np.where((out[:, 0] <= H) & (out[:, 1] <= W) & (portrait == (H > W)), k, bucket)
    for orientation in (False, True):
        ks = [k for k, (H, W) in enumerate(canvases) if (H > W) == orientation]
        if ks:
            bucket = np.where((bucket < 0) & (portrait == orientation), max(ks), bucket)
    return np.where(sizes.min(1) > 0, bucket, -1)


def _dense_passes(source, shards, process_index, data_config, transform_config, view, scale, batch) -> list[_Pass]:
    """One padded pass per canvas (same canvases and batch counts on every process)."""
    split = data_config.eval_split
    canvases = dense_canvases(scale, list(data_config.dense_aspect_buckets))
    sizes, unreadable_keys = image_sizes(source, split, _parallel(data_config))
    bucket = dense_buckets(sizes, scale, canvases)
    shard = shards[process_index]
    mine = bucket[shard.start : shard.start + shard.num_examples]
    unreadable = [unreadable_keys[i] for i in np.flatnonzero(mine < 0) + shard.start]
    passes = []
    for k, (H, W) in enumerate(canvases):
        counts = [int((bucket[s.start : s.start + s.num_examples] == k).sum()) for s in shards]
        num_batches = -(-max(counts) // batch)
        if num_batches == 0:
            continue

        def fn(img: tf.Tensor, H: int = H, W: int = W) -> dict:
            image = transforms.eval_full_view(img, scale, transform_config)
            full = tf.shape(image)
            h, w = tf.minimum(full[0], H), tf.minimum(full[1], W)
            image = tf.image.crop_to_bounding_box(image, (full[0] - h) // 2, (full[1] - w) // 2, h, w)
            image = tf.pad(image, [[0, H - h], [0, W - w], [0, 0]])
            image.set_shape([H, W, 3])
            return dict(image=image, height=h, width=w)

        def dummy(H: int = H, W: int = W) -> dict:
            return dict(image=tf.zeros([H, W, 3]), height=tf.constant(0), width=tf.constant(0))

        ds = _eval_elements(source, shard, data_config, fn, dummy, keep=mine == k)
        passes.append(_Pass(_padded(ds, counts[process_index], num_batches, batch, dummy), num_batches, []))
    passes[0].pre_skipped = unreadable
    return passes


_IMAGE_SIZES: dict[tuple[str, str], tuple[np.ndarray, dict[int, str]]] = {}


def image_sizes(source: Source, split: str, parallel: int) -> tuple[np.ndarray, dict[int, str]]:
    """(height, width) of every image of the split from its header, and the keys of the unreadable
    ones (size (0, 0)), by index; cached per dataset and split.

    Every process scans the whole split, so all agree on the dense canvases' batch counts without
    communicating; a header scan reads the bytes but decodes no pixels (PNG: IHDR; JPEG: SOF).
    """
    cache_key = (str(source.builder.data_path), split)
    if cache_key in _IMAGE_SIZES:
        return _IMAGE_SIZES[cache_key]
    shard = _Shard.build(source, split, 0, 1)
    parse = _parser(source)
    png_magic = b"\x89PNG\r\n\x1a\n"

    def header_hw(el: dict) -> dict:
        img = parse(el["serialized"])["image"]

        def png() -> tf.Tensor:  # IHDR: big-endian uint32 width, height at bytes 16..23
            b = tf.cast(tf.io.decode_raw(tf.strings.substr(img, 16, 8), tf.uint8), tf.int32)
            wh = ((b[0::4] * 256 + b[1::4]) * 256 + b[2::4]) * 256 + b[3::4]
            return tf.stack([wh[1], wh[0]])

        hw = tf.case(
            [
                (tf.io.is_jpeg(img), lambda: tf.image.extract_jpeg_shape(img)[:2]),
                (tf.strings.substr(img, 0, 8) == png_magic, png),
            ],
            default=lambda: tf.shape(transforms.decode_rgb(img))[:2],
        )
        return dict(hw=hw, index=el["index"], key=tf.constant(""))

    def unreadable(el: dict) -> dict:
        return dict(
            hw=tf.constant([0, 0]),
            index=el["index"],
            key=_key(source, split, el["index"], parse(el["serialized"])["file_name"]),
        )

    ds = shard.read(np.arange(len(shard.piece_file)), parallel)
    ds = ds.apply(_guarded(header_hw, unreadable, parallel)).batch(4096)
    sizes, keys = np.zeros([shard.num_examples, 2], np.int64), {}
    for b in ds.as_numpy_iterator():
        sizes[b["index"]] = b["hw"]
        keys.update((int(i), k.decode()) for i, k in zip(b["index"], b["key"]) if k)
    _IMAGE_SIZES[cache_key] = sizes, keys
    return sizes, keys


# ----------------------------------------------------------------------------------------------
# Small helpers


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    return process_index, process_count


def _source(data_config: Any, split: str) -> Source:
    source = sources.get_source(data_config)
    sources.check_split(source, split)
    if source.builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        raise DatasetError(
            f"{source.name} in {source.builder.data_dir} is stored as {source.builder.info.file_format}; the "
            "pipeline reads TFRecord files: prepare it with the default file_format (tfrecord)."
        )
    return source


def _shuffle_sizes(data_config: Any) -> tuple[int, int]:
    chunk, window = int(data_config.shuffle_chunk), int(data_config.shuffle_buffer)
    if chunk <= 0 or window < chunk or window % chunk:
        raise ValueError(
            f"shuffle_buffer={window} must be a positive multiple of shuffle_chunk={chunk} "
            "(a window holds whole chunks)."
        )
    return chunk, window


def _parallel(data_config: Any) -> int:
    return data_config.num_parallel_calls or tf.data.AUTOTUNE
