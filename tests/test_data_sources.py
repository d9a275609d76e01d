"""Dataset resolution: the built-in demo set, image folders, the data config, and the errors for
missing or unprepared datasets."""

from __future__ import annotations

import io
import itertools
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vgg_jax import data
from vgg_jax.data import config as config_module
from vgg_jax.data import demo, pipeline, sources

import ilsvrc_fixture as fx  # tests/ helper


@pytest.fixture(scope="session")
def demo_cfg(data_dir):
    cfg = data.default_data_config()  # dataset='vgg_jax_demo' by default
    cfg.data_dir = data_dir  # prepared once per session (conftest.py)
    return cfg


# --------------------------------------------------------------------------------------------
# The demo dataset


def test_demo_is_a_registered_tfds_dataset_with_its_classes_and_sizes(demo_cfg):
    builder = tfds.builder("vgg_jax_demo", data_dir=demo_cfg.data_dir)  # by name, through TFDS's registry
    assert builder.is_prepared() and isinstance(builder, demo.VggJaxDemo)
    assert data.class_names(demo_cfg) == list(demo.CLASS_NAMES) and data.num_classes(demo_cfg) == 10
    for split, per_class in (("train", 200), ("validation", 30)):
        assert data.num_examples(demo_cfg, split) == 10 * per_class
        labels = [
            ex["label"]
            for ex in builder.as_dataset(
                split=split, decoders={"image": tfds.decode.SkipDecoding()}
            ).as_numpy_iterator()
        ]
        assert np.bincount(labels).tolist() == [per_class] * 10
    sizes, unreadable = pipeline.image_sizes(sources.get_source(demo_cfg), "validation", 2)
    short, long = sizes.min(1), sizes.max(1)
    assert not unreadable and short.min() >= 256 and short.max() <= 400 and (long / short).max() <= 1.6
    assert (sizes[:, 0] > sizes[:, 1]).any() and (sizes[:, 0] < sizes[:, 1]).any()  # both orientations
    first = next(builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator())
    assert Image.open(io.BytesIO(first["image"])).format == "JPEG"


def test_demo_generation_is_deterministic():
    a = [ex["image"] for _, ex in itertools.islice(demo.generate("validation"), 3)]
    b = [ex["image"] for _, ex in itertools.islice(demo.generate("validation"), 3)]
    assert a == b and len(set(a)) == 3


def _spectrum_features(images: np.ndarray) -> np.ndarray:
    """Log power of the 2-D spectrum in 6 radial x 8 orientation bins (a classic texture feature)."""
    gray = images.mean(-1)
    gray -= gray.mean((1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(gray), axes=(1, 2)))
    c = gray.shape[1] // 2
    yy, xx = np.mgrid[-c:c, -c:c]
    radial = np.digitize(np.hypot(yy, xx), [2, 4, 8, 12, 18, 26, 34])
    angular = (np.mod(np.arctan2(yy, xx), np.pi) / (np.pi / 8)).astype(int) % 8
    return np.stack(
        [np.log1p(power[:, (radial == r) & (angular == a)].mean(1)) for r in range(1, 7) for a in range(8)], 1
    )


def test_demo_classes_are_distinguishable_after_augmentation(demo_cfg):
    """Nearest class centroid on spectrum features of augmented train views (random S, crop, flip,
    PCA shift) classifies held-out centre views far above chance (10%)."""
    cfg = demo_cfg.copy_and_resolve_references()
    cfg.crop_size, cfg.scale_min, cfg.scale_max = 64, 72, 96
    it = data.create_train_iterator(cfg, global_batch_size=100, seed=0, process_index=0, process_count=1)
    train = [next(it) for _ in range(6)]
    x_train = _spectrum_features(np.concatenate([b["image"] for b in train]))
    y_train = np.concatenate([b["label"] for b in train])
    val = list(
        data.create_eval_iterator(cfg, view="center", scale=72, global_batch_size=100, process_index=0, process_count=1)
    )
    x_val = _spectrum_features(np.concatenate([b["image"] for b in val]))
    y_val = np.concatenate([b["label"] for b in val])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    centroids = np.stack([((x_train - mu) / sd)[y_train == k].mean(0) for k in range(10)])
    distance = ((((x_val - mu) / sd)[:, None] - centroids[None]) ** 2).sum(-1)
    assert (distance.argmin(1) == y_val).mean() > 0.5


# --------------------------------------------------------------------------------------------
# The data config


def test_every_config_field_is_documented():
    """Each ``config.<field> = ...`` in config.py has a comment above it (or above the run of
    assignments it belongs to), and every field of the config is assigned there."""
    lines = open(config_module.__file__).read().splitlines()
    assignment = re.compile(r"\s+config\.(\w+)(?:, config\.(\w+))*(?:, config\.(\w+))* = ")
    documented = set()
    for i, line in enumerate(lines):
        if m := assignment.match(line):
            j = i - 1
            while assignment.match(lines[j]):
                j -= 1
            assert lines[j].strip().startswith("#"), f"config field {m.group(1)} has no comment"
            documented.update(g for g in m.groups() if g)
    assert documented == set(data.default_data_config().keys())


# --------------------------------------------------------------------------------------------
# Image folders


def _folder(root, classes: dict[str, int], val: dict[str, int] | None = None) -> str:
    def files(counts: dict[str, int]) -> dict[str, list]:
        return {
            c: [(f"{c}_{i}.jpg", fx.encode(fx.solid(k, (40, 48)))) for i in range(n)]
            for k, (c, n) in enumerate(counts.items())
        }

    splits = {"train": files(classes)}
    if val is not None:
        splits["val"] = files(val)
    fx.write_folder(str(root), splits)
    return str(root)


def test_folder_dataset_classes_splits_and_refresh(tmp_path, capfd, caplog):
    root = _folder(tmp_path / "pets", {"cat": 3, "dog": 2}, {"cat": 1, "dog": 1})
    cfg = data.default_data_config()
    cfg.dataset, cfg.folder, cfg.data_dir = "folder", root, str(tmp_path / "tfds")
    capfd.readouterr()
    caplog.set_level("INFO", logger="absl")
    assert data.class_names(cfg) == ["cat", "dog"]
    # Prepared once, saying so in two log lines; TFDS's progress bars stay off where stderr is no terminal (a
    # log file would get their escape codes).
    err = capfd.readouterr().err
    assert "examples/s" not in err and "\x1b[A" not in err and "%|" not in err, err[-2000:]
    logged = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Preparing vgg_jax_folder in ") for m in logged), logged
    assert any(m.startswith("Prepared vgg_jax_folder in ") for m in logged), logged
    assert data.num_examples(cfg, "train") == 5 and data.num_examples(cfg, "validation") == 2
    builder = sources.get_source(cfg).builder
    assert builder.name == "vgg_jax_folder" and builder.builder_config.name.startswith("pets_")
    labels = {
        ex["file_name"].decode(): ex["label"]
        for ex in builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()}).as_numpy_iterator()
    }
    assert labels == {
        "train/cat/cat_0.jpg": 0,
        "train/cat/cat_1.jpg": 0,
        "train/cat/cat_2.jpg": 0,
        "train/dog/dog_0.jpg": 1,
        "train/dog/dog_1.jpg": 1,
    }
    # A changed file list is a new fingerprint: prepared afresh, never read stale.
    with open(os.path.join(root, "train", "dog", "dog_9.png"), "wb") as f:
        f.write(fx.encode(fx.solid(1, (40, 48)), "png"))
    sources._get_source.cache_clear()
    assert data.num_examples(cfg, "train") == 6
    assert sources.get_source(cfg).builder.builder_config.name != builder.builder_config.name


def test_folder_errors_say_what_layout_is_expected(tmp_path):
    cfg = data.default_data_config()
    cfg.dataset, cfg.data_dir = "folder", str(tmp_path / "tfds")
    with pytest.raises(data.DatasetError, match="needs --config.data.folder"):
        data.num_classes(cfg)
    cfg.folder = str(tmp_path / "nowhere")
    with pytest.raises(data.DatasetError, match="does not exist.*<root>/train/<class>"):
        data.num_classes(cfg)
    cfg.folder = _folder(tmp_path / "noval", {"a": 1})
    os.rename(os.path.join(cfg.folder, "train"), os.path.join(cfg.folder, "training"))
    with pytest.raises(data.DatasetError, match="no train/ sub-folder"):
        data.num_classes(cfg)
    cfg.folder = _folder(tmp_path / "extra", {"a": 1}, {"a": 1})
    os.makedirs(os.path.join(cfg.folder, "val", "zebra"))
    with pytest.raises(data.DatasetError, match="zebra is a class that .*train lacks"):
        data.num_classes(cfg)
    # An empty class folder would silently become a class that no image shows.
    cfg.folder = _folder(tmp_path / "empty", {"a": 2, "b": 2})
    os.makedirs(os.path.join(cfg.folder, "train", "c", "nested"))
    with pytest.raises(data.DatasetError, match="class folder .*train/c holds no .jpg/.jpeg/.png image"):
        data.num_classes(cfg)


# --------------------------------------------------------------------------------------------
# Missing or unprepared datasets


def test_imagenet_missing_tars_say_what_to_download_and_where(tmp_path):
    cfg = data.default_data_config()
    cfg.dataset, cfg.data_dir = "imagenet2012", str(tmp_path / "tfds")
    with pytest.raises(data.DatasetError) as e:
        data.num_classes(cfg)
    msg = str(e.value)
    assert "manual_dir is not set" in msg and "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
    assert "image-net.org" in msg and "--config.data.manual_dir" in msg and "tfds build imagenet2012" in msg
    cfg.manual_dir = str(tmp_path)
    (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"")
    with pytest.raises(data.DatasetError, match=r"lacks \['ILSVRC2012_img_val.tar'\]"):
        data.num_classes(cfg)


def test_unknown_and_unprepared_tfds_datasets(tmp_path):
    cfg = data.default_data_config()
    cfg.data_dir = str(tmp_path)
    cfg.dataset = "no_such_dataset_xyz"
    with pytest.raises(data.DatasetError, match="unknown dataset 'no_such_dataset_xyz'.*vgg_jax_demo"):
        data.num_classes(cfg)
    cfg.dataset = "imagenet2013"  # the project's message with a suggestion, not TFDS's list of every dataset
    with pytest.raises(data.DatasetError, match="unknown dataset 'imagenet2013' \\(did you mean 'imagenet2012'") as e:
        data.num_classes(cfg)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    cfg.dataset = "mnist"
    expected = f"not prepared in .*download=True.*tfds build mnist --data_dir={tmp_path}"
    with pytest.raises(data.DatasetError, match=expected):
        data.num_classes(cfg)


def test_unknown_split_lists_the_splits(demo_cfg):
    cfg = demo_cfg.copy_and_resolve_references()
    cfg.eval_split = "test"
    with pytest.raises(data.DatasetError, match=r"split 'test' is not in vgg_jax_demo .*train.*validation"):
        data.create_eval_iterator(cfg, view="center", scale=256, global_batch_size=4, process_index=0, process_count=1)
