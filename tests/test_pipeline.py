"""The tf.data pipeline: determinism, exact resume, per-process sharding (in one process and with two
real jax.distributed processes), eval passes that count every example once, bad images.

Data: small image folders prepared through TFDS (``VggJaxFolder``) whose images are solid colours
encoding their class (tests/ilsvrc_fixture.py), so labels can be checked against pixels.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_jax import data
from vgg_jax.data import pipeline, sources, transforms

import ilsvrc_fixture as fx  # tests/ helper
from tiny_runs import free_port

CLASSES = ["c0", "c1", "c2", "c3"]
TRAIN_PER_CLASS = 9  # 36 train examples
VAL_COUNTS = [3, 3, 3, 2]  # 11 validation examples: never a multiple of the batch sizes used


def _sizes(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """Random (h, w) in [40, 80): landscape, portrait and square images."""
    return [tuple(int(v) for v in rng.integers(40, 80, 2)) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_folder")
    rng = np.random.default_rng(0)
    splits = {
        "train": {
            c: [(f"{c}_{i}.jpg", fx.encode(fx.solid(k, s))) for i, s in enumerate(_sizes(rng, TRAIN_PER_CLASS))]
            for k, c in enumerate(CLASSES)
        },
        "val": {
            c: [(f"{c}_{i}.JPEG", fx.encode(fx.solid(k, s))) for i, s in enumerate(_sizes(rng, n))]
            for k, (c, n) in enumerate(zip(CLASSES, VAL_COUNTS))
        },
    }
    fx.write_folder(str(root), splits)
    with open(root / "train" / "c0" / "notes.txt", "w") as f:  # not an image: ignored
        f.write("ignore me")
    return dict(folder=str(root), data_dir=str(tmp_path_factory.mktemp("tiny_tfds")))


def make_cfg(ds: dict, **overrides):
    config = data.default_data_config()
    config.dataset = "folder"
    config.folder = ds["folder"]
    config.data_dir = ds["data_dir"]
    config.crop_size, config.scale_min, config.scale_max, config.eval_scales = 32, 36, 48, [40]
    config.shuffle_chunk, config.shuffle_buffer = 4, 8
    config.update(overrides)
    return config


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def record_file_names(config, split: str) -> list[str]:
    """file_name of each example in split order (index i = record i), read straight through TFDS."""
    builder = sources.get_source(config).builder
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    return [ex["file_name"].decode() for ex in ds.as_numpy_iterator()]


# --------------------------------------------------------------------------------------------
# Train: batches, labels, determinism, resume


def test_train_batches_shapes_dtypes_and_labels_match_pixels(tiny):
    config = make_cfg(tiny, mean_rgb=[0.0, 0.0, 0.0], pca_alpha_std=0.0)
    it = data.create_train_iterator(config, global_batch_size=6, seed=0, process_index=0, process_count=1)
    batches = take(it, 12)  # 72 examples: two epochs
    for b in batches:
        assert b["image"].shape == (6, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
        colours = b["image"].mean(axis=(1, 2))  # solid images: the class colour, whatever the crop/flip
        assert [fx.colour_label(c) for c in colours] == b["label"].tolist()
    indices = np.concatenate([b["index"] for b in batches])
    for epoch in (indices[:36], indices[36:]):  # each epoch: every example once, shuffled
        assert sorted(epoch) == list(range(36))
    assert not np.array_equal(indices[:36], np.arange(36)) and not np.array_equal(indices[:36], indices[36:])
    assert it.epoch == 2.0 and data.num_examples(config, "train") == 36
    assert data.class_names(config) == CLASSES and data.num_classes(config) == 4


def test_same_seed_same_batches_other_seed_other_order(tiny):
    config = make_cfg(tiny)

    def run(seed: int) -> list[dict]:
        return take(
            data.create_train_iterator(config, global_batch_size=5, seed=seed, process_index=0, process_count=1), 9
        )

    a, b, c = run(7), run(7), run(8)
    assert_same_batches(a, b)
    assert not np.array_equal(np.concatenate([x["index"] for x in a]), np.concatenate([x["index"] for x in c]))
    # Augmentation is per (seed, epoch, example): an example seen again in epoch 1 gets another view.
    images = {}
    for x in a:
        for img, i in zip(x["image"], x["index"]):
            images.setdefault(int(i), []).append(img)
    twice = [v for v in images.values() if len(v) == 2]
    assert twice and all(not np.array_equal(v[0], v[1]) for v in twice)


def test_each_epoch_reads_the_chunks_in_another_order(tiny):
    """Shuffling is two-level (chunks of ``shuffle_chunk`` examples, then within windows of
    ``shuffle_buffer``): the chunk order must change per epoch, or each window would hold the same
    examples every epoch and the within-window shuffle could never mix them with the others."""
    config = make_cfg(tiny)  # chunks of 4, windows of 8: 36 examples = 9 chunks in 5 windows
    it = data.create_train_iterator(config, global_batch_size=4, seed=3, process_index=0, process_count=1)
    indices = np.concatenate([b["index"] for b in take(it, 36)]).reshape(4, 36)  # four epochs
    assert all(sorted(epoch) == list(range(36)) for epoch in indices)
    first_windows = {frozenset(epoch[:8].tolist()) for epoch in indices}
    assert len(first_windows) > 1, "the first window held the same 8 examples in every epoch"


@pytest.mark.parametrize("consumed", [5, 7])  # mid-window in epoch 0 (25 examples); epoch 0 end (35 of 36)
def test_restore_continues_exactly(tiny, consumed):
    config = make_cfg(tiny)

    def make() -> pipeline.TrainIterator:
        return data.create_train_iterator(config, global_batch_size=5, seed=1, process_index=0, process_count=1)

    straight = make()
    take(straight, consumed)
    state = json.loads(json.dumps(straight.get_state()))  # JSON-able, as a checkpoint stores it
    expected = take(straight, 9)  # crosses into the next epoch(s)
    resumed = make()
    resumed.set_state(state)
    assert_same_batches(take(resumed, 9), expected)
    assert resumed.get_state() == straight.get_state()


def test_restore_rejects_other_layout(tiny):
    config = make_cfg(tiny)
    it = data.create_train_iterator(config, global_batch_size=4, seed=1, process_index=0, process_count=1)
    next(it)
    other = data.create_train_iterator(config, global_batch_size=4, seed=2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(it.get_state())


def test_batch_not_divisible_by_processes(tiny):
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        data.create_train_iterator(make_cfg(tiny), global_batch_size=8, seed=0, process_index=0, process_count=3)


def test_processes_read_disjoint_parts_in_process(tiny):
    config = make_cfg(tiny)
    seen = []
    for p in range(3):
        it = data.create_train_iterator(config, global_batch_size=6, seed=0, process_index=p, process_count=3)
        n = it.get_state()["layout"]["examples"]
        seen.append(np.concatenate([b["index"] for b in take(it, 6)])[:n])  # 12 examples: one epoch
    assert [len(s) for s in seen] == [12, 12, 12]
    assert sorted(np.concatenate(seen).tolist()) == list(range(36))


def test_two_jax_processes_see_disjoint_examples(tiny, tmp_path):
    """Two real processes (jax.distributed, gloo, 127.0.0.1): train and eval split between them."""
    config = make_cfg(tiny)
    data.num_examples(config, "train")  # prepare once, before the workers start
    cfg_json = json.dumps(
        {
            k: config[k]
            for k in (
                "dataset",
                "folder",
                "data_dir",
                "crop_size",
                "scale_min",
                "scale_max",
                "eval_scales",
                "shuffle_chunk",
                "shuffle_buffer",
            )
        }
    )
    port = free_port()
    worker = os.path.join(os.path.dirname(__file__), "data_worker.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outs = [str(tmp_path / f"out{i}.json") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(i), str(port), cfg_json, outs[i]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    r = [json.load(open(o)) for o in outs]
    assert [x["process_index"] for x in r] == [0, 1] and all(x["process_count"] == 2 for x in r)
    train = [set(x["first_epoch"]) for x in r]
    assert len(r[0]["first_epoch"]) == len(train[0]) == 18 and not train[0] & train[1]
    assert train[0] | train[1] == set(range(36))
    assert r[0]["global_labels_shape"] == [8]
    assert r[0]["gathered_labels"] == [r[0]["local_labels"], r[1]["local_labels"]]
    evaluated = r[0]["eval_indices"] + r[1]["eval_indices"]
    assert sorted(evaluated) == list(range(11))  # every example once; padding masked out
    assert r[0]["eval_batches"] == r[1]["eval_batches"] == 2


# --------------------------------------------------------------------------------------------
# Eval passes


@pytest.mark.parametrize("batch", [2, 4, 8, 12])  # 8: both shards (6 and 5 examples) end in a partial batch of 4
def test_center_eval_every_example_once_over_processes(tiny, batch):
    config = make_cfg(tiny, mean_rgb=[0.0, 0.0, 0.0])
    valid, counts = [], []
    for p in range(2):
        ev = data.create_eval_iterator(
            config, view="center", scale=40, global_batch_size=batch, process_index=p, process_count=2
        )
        batches = list(ev)
        counts.append(len(batches))
        assert len(batches) == len(ev) and ev.num_examples == 11
        for b in batches:
            assert b["image"].shape == (batch // 2, 32, 32, 3)
            assert (b["index"] >= 0).tolist() == b["valid"].tolist()  # only padding is invalid here
            v = b["valid"]
            assert [fx.colour_label(c) for c in b["image"][v].mean(axis=(1, 2))] == b["label"][v].tolist()
            valid += b["index"][v].tolist()
    assert counts[0] == counts[1] == -(-6 // (batch // 2))  # same count everywhere: 6 and 5 examples
    assert sorted(valid) == list(range(11))


def test_eval_with_more_processes_than_examples(tiny):
    config = make_cfg(tiny, eval_split="validation[:3]")
    valid = []
    for p in range(5):  # processes 3 and 4 own no example: they still yield one all-padding batch
        batches = list(
            data.create_eval_iterator(
                config, view="center", scale=40, global_batch_size=10, process_index=p, process_count=5
            )
        )
        assert [b["image"].shape for b in batches] == [(2, 32, 32, 3)]
        valid += batches[0]["index"][batches[0]["valid"]].tolist()
    assert sorted(valid) == [0, 1, 2]


def test_multicrop_eval_layout(tiny):
    config = make_cfg(tiny)
    ev = data.create_eval_iterator(
        config, view="multicrop", scale=40, global_batch_size=4, process_index=0, process_count=1
    )
    batches = list(ev)
    assert [b["image"].shape for b in batches] == [(4, 50, 32, 32, 3)] * 3
    assert sum(int(b["valid"].sum()) for b in batches) == 11


def test_dense_eval_buckets_pad_and_carry_sizes(tiny):
    config = make_cfg(tiny, dense_aspect_buckets=[1.25, 2.0])
    scale = 40
    canvases = pipeline.dense_canvases(scale, [1.25, 2.0])
    assert canvases == [(40, 64), (40, 96), (64, 40), (96, 40)]  # ceil32(1.25 * 40) = 64, ceil32(80) = 96
    transform_config = transforms.TransformConfig.from_config(config)
    raw = {}  # index -> encoded bytes, read straight through TFDS in record order
    builder = sources.get_source(config).builder
    for i, ex in enumerate(
        builder.as_dataset(
            split="validation", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        ).as_numpy_iterator()
    ):
        raw[i] = ex["image"]
    runs = []
    for p in range(2):
        ev = data.create_eval_iterator(
            config, view="dense", scale=scale, global_batch_size=4, process_index=p, process_count=2
        )
        runs.append(list(ev))
    assert [b["image"].shape for b in runs[0]] == [b["image"].shape for b in runs[1]]  # same shapes, same order
    seen = []
    for b in runs[0] + runs[1]:
        assert b["image"].shape[1:3] in canvases
        for img, h, w, i, v in zip(b["image"], b["height"], b["width"], b["index"], b["valid"]):
            if not v:
                assert i == -1 and h == w == 0 and not img.any()
                continue
            seen.append(int(i))
            full = transforms.eval_full_view(tf.constant(raw[int(i)]), scale, transform_config).numpy()
            assert (h, w) == full.shape[:2] and min(h, w) == scale
            np.testing.assert_array_equal(img[:h, :w], full)
            assert not img[h:].any() and not img[:, w:].any()
    assert sorted(seen) == list(range(11))


def test_dense_buckets_choose_smallest_canvas_of_the_orientation():
    canvases = pipeline.dense_canvases(256, [1.34, 1.5, 2.0])
    assert canvases == [(256, 352), (256, 384), (256, 512), (352, 256), (384, 256), (512, 256)]
    sizes = np.array([[375, 500], [500, 375], [333, 500], [300, 300], [100, 400], [0, 0]])
    # 500x375 at Q=256 is 256x341 (fits 352); 3:2 is 256x384; 4:1 is cropped into the largest.
    assert pipeline.dense_buckets(sizes, 256, canvases).tolist() == [0, 3, 1, 0, 2, -1]


# --------------------------------------------------------------------------------------------
# Bad images


@pytest.fixture(scope="session")
def bad(tmp_path_factory) -> dict:
    """Good JPEGs plus, per split: a truncated JPEG, garbage named .JPEG, a CMYK JPEG, a grayscale
    JPEG and a PNG named .JPEG (all of which occur in real ImageNet)."""
    root = tmp_path_factory.mktemp("bad_folder")
    size = (48, 56)

    def split_files() -> dict:
        return {
            "c0": [
                ("good_0.JPEG", fx.encode(fx.solid(0, size))),
                ("good_1.JPEG", fx.encode(fx.solid(0, size))),
                ("truncated.JPEG", fx.truncated_jpeg()),
                ("garbage.JPEG", b"this is not an image"),
            ],
            "c1": [(f"{kind}.JPEG", fx.encode(fx.solid(1, size), kind)) for kind in ("cmyk", "gray", "png")],
        }

    fx.write_folder(str(root), {"train": split_files(), "val": split_files()})
    return dict(folder=str(root), data_dir=str(tmp_path_factory.mktemp("bad_tfds")))


GOOD_FILES = {"c0/good_0.JPEG", "c0/good_1.JPEG", "c1/cmyk.JPEG", "c1/gray.JPEG", "c1/png.JPEG"}
BAD_FILES = {"c0/truncated.JPEG", "c0/garbage.JPEG"}  # file_name: <split>/<class>/<file>


def test_bad_images_skipped_counted_and_warned_in_train(bad, caplog):
    config = make_cfg(bad, mean_rgb=[0.0, 0.0, 0.0], pca_alpha_std=0.0)
    names = record_file_names(config, "train")
    it = data.create_train_iterator(config, global_batch_size=5, seed=0, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="vgg_jax.data.pipeline"):
        batches = take(it, 6)  # 30 examples: 6 epochs of the 5 good ones
    indices = np.concatenate([b["index"] for b in batches])
    assert {names[i] for i in indices} == {f"train/{f}" for f in GOOD_FILES}
    for b in batches:  # CMYK, PNG and grayscale decode to the right colours / labels
        for img, label, i in zip(b["image"], b["label"], b["index"]):
            colour = img.mean(axis=(0, 1))
            if names[i].endswith("gray.JPEG"):
                expected = np.dot(fx.label_colour(1), [0.299, 0.587, 0.114])  # luma, on all channels
                np.testing.assert_allclose(colour, [expected] * 3, atol=3)
            else:
                np.testing.assert_allclose(colour, fx.label_colour(label), atol=4)
            assert label == (0 if names[i].startswith("train/c0") else 1)
    assert it.num_skipped in (10, 12)  # 2 per epoch; the last epoch's pair may not be reached yet
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(f in warned for f in BAD_FILES) and "skipped undecodable image" in warned
    assert it.get_state()["skipped"] == it.num_skipped


def test_bad_images_in_eval_are_invalid_and_listed(bad):
    config = make_cfg(bad)
    names = record_file_names(config, "validation")
    for view in ("center", "dense"):
        ev = data.create_eval_iterator(
            config, view=view, scale=40, global_batch_size=4, process_index=0, process_count=1
        )
        valid = [int(i) for b in ev for i, v in zip(b["index"], b["valid"]) if v]
        assert sorted(names[i] for i in valid) == sorted(f"val/{f}" for f in GOOD_FILES)
        assert len(ev.skipped) == 2 and all(any(f in k for k in ev.skipped) for f in BAD_FILES)


def test_bad_image_fail_mode_raises_with_the_key(bad):
    config = make_cfg(bad, on_bad_image="fail")
    it = data.create_train_iterator(config, global_batch_size=5, seed=0, process_index=0, process_count=1)
    with pytest.raises(data.BadImageError, match=r"folder train\[\d+\] \(train/c0/(truncated|garbage)\.JPEG\)"):
        take(it, 3)
    ev = data.create_eval_iterator(
        config, view="center", scale=40, global_batch_size=4, process_index=0, process_count=1
    )
    with pytest.raises(data.BadImageError, match="on_bad_image=skip"):
        list(ev)


def test_unreadable_split_stops_with_an_error_not_a_hang(tmp_path):
    fx.write_folder(str(tmp_path / "junk"), {"train": {"a": [("x.jpg", b"junk"), ("y.jpg", fx.truncated_jpeg())]}})
    config = make_cfg(dict(folder=str(tmp_path / "junk"), data_dir=str(tmp_path / "tfds")))
    it = data.create_train_iterator(config, global_batch_size=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="no decodable image in 2 consecutive examples"):
        next(it)
