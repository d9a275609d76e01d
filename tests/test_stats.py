"""The stats command (vgg_jax.data.stats): mean RGB and RGB PCA of a training split, checked
against numpy float64 on images with a known colour distribution, end to end through a real
TFDS builder (an image folder), and read back by TransformConfig.from_config."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vgg_jax.data import stats
from vgg_jax.data.config import IMAGENET_PCA_EIGVEC, TransformConfig, default_data_config

# A known colour distribution (0..1 scale): ImageNet's eigen-vectors, chosen eigen-values.
EIGVEC = np.asarray(IMAGENET_PCA_EIGVEC)
EIGVAL = np.array([0.02, 0.004, 0.001])
MEAN = np.array([130.0, 120.0, 110.0])


def coloured_images(n: int, seed: int = 0) -> list[np.ndarray]:
    """uint8 images of assorted sizes whose pixels are i.i.d. N(MEAN, EIGVEC diag(EIGVAL) EIGVEC^T * 255^2)."""
    rng = np.random.default_rng(seed)
    root = EIGVEC * np.sqrt(EIGVAL) * 255.0
    images = []
    for _ in range(n):
        h, w = rng.integers(12, 30, 2)
        pixels = MEAN + rng.standard_normal((h, w, 3)) @ root.T
        images.append(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return images


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def numpy_stats(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float64)
    return pixels.mean(0), np.cov(pixels.T, bias=True)


def check_against_numpy(result: dict, images: list[np.ndarray]) -> None:
    mean, cov = numpy_stats(images)
    np.testing.assert_allclose(result["mean_rgb"], mean, rtol=1e-10)
    eigval, eigvec = np.asarray(result["pca_eigval"]), np.asarray(result["pca_eigvec"])
    # eigvec diag(eigval) eigvec^T is the covariance on the 0..1 scale; columns are orthonormal.
    np.testing.assert_allclose(eigvec @ np.diag(eigval) @ eigvec.T * 255.0**2, cov, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-12)
    assert np.all(np.diff(eigval) <= 0)  # descending
    assert result["num_pixels"] == sum(im.shape[0] * im.shape[1] for im in images)


def test_stats_match_numpy_and_recover_the_distribution():
    images = coloured_images(40)
    moments = [stats.pixel_moments(tf.constant(png(im))) for im in images]
    result = stats.stats_from_moments({k: v.numpy() for k, v in m.items()} for m in moments)
    check_against_numpy(result, images)
    # The sample (~16k pixels) recovers the distribution: eigen-values within 5 sampling sigmas,
    # eigen-vectors up to sign, the mean within 5 standard errors.
    n = result["num_pixels"]
    eigval, eigvec = np.asarray(result["pca_eigval"]), np.asarray(result["pca_eigvec"])
    assert np.all(np.abs(eigval / EIGVAL - 1) < 5 * np.sqrt(2 / n)), eigval / EIGVAL
    assert np.all(np.abs(np.sum(eigvec * EIGVEC, 0)) > 0.99)
    assert np.all(np.abs(np.asarray(result["mean_rgb"]) - MEAN) < 5 * 255 * np.sqrt(EIGVAL.max() / n))
    # Sign convention: each eigen-vector's largest-magnitude entry is positive.
    assert np.all(eigvec[np.abs(eigvec).argmax(0), range(3)] > 0)


def test_stats_of_a_jpeg_and_grayscale_mix():
    """A grayscale JPEG counts as R = G = B: the reference pixels are Pillow's decode (libjpeg's accurate IDCT,
    as the pipeline's), replicated to three channels."""
    grey = np.repeat(coloured_images(1, seed=3)[0][..., :1], 3, -1)
    buf = io.BytesIO()
    Image.fromarray(grey[..., 0]).save(buf, "JPEG", quality=95)
    with Image.open(io.BytesIO(buf.getvalue())) as image:
        assert image.mode == "L"
        decoded = np.repeat(np.asarray(image)[..., None], 3, -1)
    m = {k: v.numpy() for k, v in stats.pixel_moments(tf.constant(buf.getvalue())).items()}
    check_against_numpy(stats.stats_from_moments([m]), [decoded])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stats_folder")
    images = coloured_images(12, seed=1)
    for k, image in enumerate(images):
        split, cls = ("train", f"c{k % 2}") if k < 10 else ("val", f"c{k % 2}")
        os.makedirs(root / split / cls, exist_ok=True)
        (root / split / cls / f"im{k}.png").write_bytes(png(image))
    return dict(root=str(root), data_dir=str(tmp_path_factory.mktemp("stats_tfds")), train=images[:10])


def test_cli_end_to_end_and_stats_path(folder, tmp_path):
    out = str(tmp_path / "sub" / "stats.json")
    stats.main(
        [
            "--data.dataset=folder",
            f"--data.folder={folder['root']}",
            f"--data.data_dir={folder['data_dir']}",
            f"--out={out}",
        ]
    )
    with open(out) as f:
        result = json.load(f)
    assert result["num_images"] == 10 and result["split"] == "train" and result["dataset"] == "folder"
    check_against_numpy(result, folder["train"])
    # A data config pointing at the file uses its mean and PCA.
    cfg = default_data_config()
    cfg.stats_path = out
    tcfg = TransformConfig.from_config(cfg)
    np.testing.assert_allclose(tcfg.mean_rgb, result["mean_rgb"])
    np.testing.assert_allclose(tcfg.pca_eigval, result["pca_eigval"])
    np.testing.assert_allclose(tcfg.pca_eigvec, result["pca_eigvec"])
    assert tcfg.crop_size == cfg.crop_size and tcfg.std_rgb == (1.0, 1.0, 1.0)


def test_cli_samples_num_images(folder, tmp_path):
    out = str(tmp_path / "stats.json")
    stats.main(
        [
            "--data.dataset=folder",
            f"--data.folder={folder['root']}",
            f"--data.data_dir={folder['data_dir']}",
            "--num_images=4",
            f"--out={out}",
        ]
    )
    with open(out) as f:
        assert json.load(f)["num_images"] == 4


def test_errors_name_the_fix(folder, tmp_path):
    cfg = default_data_config()
    cfg.stats_path = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="python -m vgg_jax.data.stats"):
        TransformConfig.from_config(cfg)
    (tmp_path / "partial.json").write_text(json.dumps({"mean_rgb": [1, 2, 3]}))
    cfg.stats_path = str(tmp_path / "partial.json")
    with pytest.raises(ValueError, match="pca_eigval"):
        TransformConfig.from_config(cfg)
    with pytest.raises(ValueError, match="split 'nope'"):
        stats.main(
            [
                "--data.dataset=folder",
                f"--data.folder={folder['root']}",
                f"--data.data_dir={folder['data_dir']}",
                "--split=nope",
                f"--out={tmp_path / 'x.json'}",
            ]
        )
    with pytest.raises(SystemExit):
        stats.main(["--data.dataset=folder", "--num_images=0", f"--out={tmp_path / 'x.json'}"])
