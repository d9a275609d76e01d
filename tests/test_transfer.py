"""configs/transfer.py end to end: a converted-style checkpoint fine-tuned on an image folder with
frozen conv blocks and a new fc8 (``python -m vgg_jax.main`` in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgg_jax import checkpoints

from tiny_runs import save_random_converted

REPO = Path(__file__).resolve().parents[1]

from configs import transfer  # noqa: E402

CLASSES = ("cat", "dog", "emu")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, dict]:
    """A reduced-width vgg11 "pretrained" on 5 classes, saved like a torchvision conversion."""
    path = tmp_path_factory.mktemp("pretrained") / "vgg11_tv"
    _, params = save_random_converted(path, "vgg11", num_classes=5, width=4, fc_width=16, crop_size=32)
    return path, params


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("val", 2)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (40, 44, 3)) + 80 * np.eye(3, dtype=np.int64)[label]
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.jpg")
    return root


def test_config_sets_model_and_the_weights_input_convention():
    config = transfer.get_config("vgg11,torchvision,32")
    assert (config.model.name, config.data.crop_size) == ("vgg11", 32)
    np.testing.assert_allclose(config.data.mean_rgb, [123.675, 116.28, 103.53])  # torchvision's, on 0..255
    np.testing.assert_allclose(config.data.std_rgb, [58.395, 57.12, 57.375])
    assert config.data.resize == "torchvision"
    assert not config.init_from and config.reset_head and config.optimizer.trainable == "fc[678]"
    assert config.data.dataset == "folder" and config.data.scale_min == config.data.scale_max == 36
    with pytest.raises(ValueError, match=r"MODEL,CONVENTION\[,CROP\] with CONVENTION in \['caffe', 'torchvision'\]"):
        transfer.get_config("/some/checkpoint")


def test_fine_tune_freezes_conv_blocks_and_replaces_fc8(pretrained, tmp_path):
    ckpt, before = pretrained
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "vgg_jax.main",
        "--config=configs/transfer.py:vgg11,torchvision,32",
        f"--config.init_from={ckpt}",
        "--config.model.width=4",
        "--config.model.fc_width=16",
        f"--workdir={workdir}",
        f"--config.data.folder={image_folder(tmp_path / 'pets')}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.num_train_steps=3",
        "--config.global_batch_size=6",
        "--config.eval_batch_size=6",
        "--config.optimizer.schedule=constant",
        "--config.optimizer.learning_rate=0.05",
        "--config.eval_every_steps=3",
        "--config.checkpoint.every_steps=3",
        "--config.log_every_steps=1",
        "--config.data.shuffle_buffer=128",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((workdir / "results.json").read_text())["step"] == 3

    after = checkpoints.restore_model(workdir)[1]["params"]
    assert after.keys() == before.keys()
    for layer in before:
        if layer.startswith("conv"):
            for leaf in ("kernel", "bias"):
                np.testing.assert_array_equal(np.asarray(after[layer][leaf]), before[layer][leaf], err_msg=layer)
    assert after["fc8"]["kernel"].shape == (1, 1, 16, len(CLASSES)) and after["fc8"]["bias"].shape == (len(CLASSES),)
    for layer in ("fc6", "fc7"):  # started from the checkpoint and trained
        assert not np.array_equal(np.asarray(after[layer]["kernel"]), before[layer]["kernel"]), layer
        assert np.abs(np.asarray(after[layer]["kernel"]) - before[layer]["kernel"]).max() < 0.5, layer
    assert checkpoints.read_meta(workdir)["class_names"] == list(CLASSES)
