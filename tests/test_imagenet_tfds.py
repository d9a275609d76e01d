"""ImageNet through the real TFDS ``imagenet2012`` builder: a tiny archive in the ILSVRC2012 tar
layout is prepared via ``manual_dir`` on first use and read through the pipeline.

The builder labels training images by the synset tar they sit in, and validation images by
zipping the sorted ``ILSVRC2012_val_*`` names present with TFDS's ``validation_labels.txt`` (the
labels of val images 1, 2, 3, ... in order). So the archive holds val images 1..N, whose true labels
are the first N lines of that file. It needs no other synset tar than those it holds.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vgg_jax import data
from vgg_jax.data import sources

import ilsvrc_fixture as fx  # tests/ helper

SIZE = (40, 56)
NUM_VAL = 10
KNOWN_CMYK = "n01739381_1309.JPEG"  # in the builder's CMYK list: re-encoded to RGB while preparing
KNOWN_PNG = "n02105855_2933.JPEG"  # the builder's one PNG: re-encoded to JPEG while preparing


def _train_files() -> dict[str, list[tuple[str, bytes]]]:
    syn = fx.imagenet_synsets()
    img = lambda s, kind="jpeg": fx.encode(fx.solid(syn.index(s), SIZE), kind)  # noqa: E731
    return {
        "n01440764": [(f"n01440764_{k}.JPEG", img("n01440764")) for k in (10, 11, 12)],
        "n01443537": [("n01443537_1.JPEG", img("n01443537")), ("n01443537_2.JPEG", img("n01443537", "gray"))],
        "n01739381": [(KNOWN_CMYK, img("n01739381", "cmyk")), ("n01739381_7.JPEG", img("n01739381"))],
        "n02105855": [(KNOWN_PNG, img("n02105855", "png"))],
        # Files the builder does not know about: a CMYK JPEG, a PNG named .JPEG, a truncated JPEG.
        "n04592741": [
            ("n04592741_1.JPEG", img("n04592741", "cmyk")),
            ("n04592741_2.JPEG", img("n04592741", "png")),
            ("n04592741_3.JPEG", fx.truncated_jpeg()),
        ],
        "n15075141": [(f"n15075141_{k}.JPEG", img("n15075141")) for k in (1, 2)],
    }


@pytest.fixture(scope="session")
def imagenet(tmp_path_factory) -> dict:
    manual = tmp_path_factory.mktemp("ilsvrc_manual")
    syn, val_labels = fx.imagenet_synsets(), fx.imagenet_validation_labels()
    val = [fx.encode(fx.solid(syn.index(val_labels[i]), SIZE[::-1])) for i in range(NUM_VAL)]
    fx.write_ilsvrc(str(manual), _train_files(), val)
    return dict(manual_dir=str(manual), data_dir=str(tmp_path_factory.mktemp("ilsvrc_tfds")))


def make_cfg(imagenet: dict, **overrides):
    config = data.default_data_config()
    config.dataset = "imagenet2012"
    config.manual_dir, config.data_dir = imagenet["manual_dir"], imagenet["data_dir"]
    config.crop_size, config.scale_min, config.scale_max, config.eval_scales = 32, 36, 48, [40]
    config.mean_rgb, config.pca_alpha_std = [0.0, 0.0, 0.0], 0.0  # pixels keep the class colour
    config.update(overrides)
    return config


def records(config, split: str) -> list[dict]:
    """The prepared records in split order, image bytes undecoded."""
    builder = sources.get_source(config).builder
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    return list(ds.as_numpy_iterator())


def test_prepared_by_the_real_builder_from_manual_dir(imagenet):
    config = make_cfg(imagenet)
    assert data.num_examples(config, "train") == sum(len(v) for v in _train_files().values()) == 13
    assert data.num_examples(config, "validation") == NUM_VAL
    assert data.num_classes(config) == 1000
    assert data.class_names(config) == fx.imagenet_synsets()
    builder = sources.get_source(config).builder
    assert builder.name == "imagenet2012" and builder.is_prepared()
    # The builder re-encoded the files it knows about; unknown CMYK / PNG files stay as they were.
    mode = {r["file_name"].decode(): Image.open(io.BytesIO(r["image"])) for r in records(config, "train")}
    assert mode[KNOWN_CMYK].format == "JPEG" and mode[KNOWN_CMYK].mode == "RGB"
    assert mode[KNOWN_PNG].format == "JPEG"
    assert mode["n04592741_1.JPEG"].mode == "CMYK" and mode["n04592741_2.JPEG"].format == "PNG"


def test_train_batches_shapes_dtypes_labels(imagenet, caplog):
    config = make_cfg(imagenet)
    syn = fx.imagenet_synsets()
    names = [r["file_name"].decode() for r in records(config, "train")]
    it = data.create_train_iterator(config, global_batch_size=4, seed=0, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="vgg_jax.data.pipeline"):
        batches = [next(it) for _ in range(3)]  # 12 examples: the 12 decodable ones, one epoch
    seen = []
    for b in batches:
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        for img, label, i in zip(b["image"], b["label"], b["index"]):
            name = names[i]
            assert label == syn.index(name.split("_")[0])  # the synset tar it came from
            colour = img.mean(axis=(0, 1))
            if name == "n01443537_2.JPEG":  # grayscale: the luma of the class colour on all channels
                np.testing.assert_allclose(colour, [np.dot(fx.label_colour(label), [0.299, 0.587, 0.114])] * 3, atol=3)
            else:
                assert fx.colour_label(colour) == label, name
            seen.append(name)
    assert sorted(seen) == sorted(n for n in names if n != "n04592741_3.JPEG")
    assert it.num_skipped == 1
    assert "imagenet2012 train[" in caplog.text and "(n04592741_3.JPEG)" in caplog.text


def test_validation_labels_follow_tfds_validation_labels(imagenet):
    config = make_cfg(imagenet)
    syn, truth = fx.imagenet_synsets(), fx.imagenet_validation_labels()
    names = [r["file_name"].decode() for r in records(config, "validation")]
    ev = data.create_eval_iterator(
        config, view="center", scale=40, global_batch_size=4, process_index=0, process_count=1
    )
    seen = []
    for b in ev:
        assert b["image"].shape == (4, 32, 32, 3) and b["valid"].dtype == bool
        for img, label, i in zip(b["image"][b["valid"]], b["label"][b["valid"]], b["index"][b["valid"]]):
            number = int(names[i][len("ILSVRC2012_val_") : -len(".JPEG")])
            assert label == syn.index(truth[number - 1])  # the published label of that val image
            assert fx.colour_label(img.mean(axis=(0, 1))) == label
            seen.append(number)
    assert sorted(seen) == list(range(1, NUM_VAL + 1)) and len(ev) == 3


def _val_archive(tmp_path, names: dict[str, int]) -> dict:
    """A manual_dir whose val tar holds the given files (name -> the number whose published label it shows)."""
    syn, truth = fx.imagenet_synsets(), fx.imagenet_validation_labels()
    val = {name: fx.encode(fx.solid(syn.index(truth[number - 1]), SIZE)) for name, number in names.items()}
    manual = tmp_path / "manual"
    fx.write_ilsvrc(str(manual), {"n01440764": [("n01440764_1.JPEG", fx.encode(fx.solid(0, SIZE)))]}, val)
    return dict(manual_dir=str(manual), data_dir=str(tmp_path / "tfds"))


def test_partial_or_renamed_validation_archive_is_labelled_by_file_number(tmp_path):
    """Files 101..150 only, one of them renamed to lower case: TFDS's own builder would give them the labels
    of files 1..50 (it zips the sorted names with the label list); each gets line NNNNNNNN instead."""
    names = {f"ILSVRC2012_val_{n:08d}.JPEG": n for n in range(101, 151)}
    del names["ILSVRC2012_val_00000107.JPEG"]
    names["ilsvrc2012_val_00000107.jpeg"] = 107
    config = make_cfg(_val_archive(tmp_path, names), eval_split="validation")
    syn, truth = fx.imagenet_synsets(), fx.imagenet_validation_labels()
    got = {r["file_name"].decode(): int(r["label"]) for r in records(config, "validation")}
    assert set(got) == set(names)
    wrong = [n for n, number in names.items() if got[n] != syn.index(truth[number - 1])]
    assert not wrong, wrong
    # The stock zip would have been wrong for most of them: the test can tell.
    assert sum(syn.index(truth[i]) != got[n] for i, n in enumerate(sorted(names))) > 25


def test_a_validation_file_without_a_number_stops_preparation(tmp_path):
    names = {"ILSVRC2012_val_00000001.JPEG": 1, "ILSVRC2012_val_extra.JPEG": 2}
    config = make_cfg(_val_archive(tmp_path, names))
    with pytest.raises(
        sources.DatasetError, match="holds 'ILSVRC2012_val_extra.JPEG', which is not ILSVRC2012_val_NNNNNNNN"
    ):
        data.num_examples(config, "validation")
