"""Notebook loading (vgg_jax.load): restore on another device count, predict, features, the
preprocessing of converted weights, clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image

from vgg_jax import checkpoints, convert, evaluate, sharding
from vgg_jax.classifier import load
from vgg_jax.data import demo
from vgg_jax.errors import UserError

from test_evaluate import jitted, softmax64


def smooth_image(seed: int, h: int, w: int) -> np.ndarray:
    """uint8 [h, w, 3]: smooth random colours (6x6 cells, bicubic) plus pixel noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float64)
    return np.clip(image + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def test_restores_on_one_device_what_two_devices_trained(run, clf):
    assert jax.device_count() == 1
    leaves = jax.tree_util.tree_leaves(clf.variables)
    assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in leaves)
    assert clf.config.model.width == 4 and clf.crop_size == 32 and clf.scale == 36
    assert clf.class_names == list(demo.CLASS_NAMES)
    # The restored parameters are the trained ones: the run's own last evaluation is reproduced.
    trained = json.loads((run / "results.json").read_text())
    results = evaluate.evaluate(
        clf.apply_fn, clf.variables, clf.config.data, sharding.make_mesh(), protocol="center", batch_size=16
    )
    assert results["images"] == trained["images"] == 40
    assert results["top1_error@36"] == pytest.approx(trained["top1_error@36"])
    assert results["top5_error@36"] == pytest.approx(trained["top5_error@36"])


def test_preprocessing_matches_pillow_resize_centre_crop_and_mean(clf):
    """Shorter side -> 36, centre 32x32 crop, minus the mean RGB: against Pillow's bilinear resize
    (antialiased when shrinking) within its uint8 rounding."""
    mean = np.array(clf.config.data.mean_rgb, np.float32)
    for h, w in [(90, 70), (30, 44), (300, 410), (36, 36)]:
        image = smooth_image(h * w, h, w)
        scale = 36 / min(h, w)
        rh, rw = max(round(h * scale), 36), max(round(w * scale), 36)
        resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR), np.float32)
        top, left = (rh - 32) // 2, (rw - 32) // 2
        expected = resized[top : top + 32, left : left + 32] - mean
        got = clf.preprocess([image])
        assert got.shape == (1, 32, 32, 3)
        np.testing.assert_allclose(got[0], expected, atol=1.01, err_msg=str((h, w)))
        # crops: the same pixels before the mean is taken off (what the notebook shows).
        np.testing.assert_allclose(clf.crops([image])[0], expected + mean, atol=1.01, err_msg=str((h, w)))


def test_predict_takes_any_size_list_array_gray_rgba_and_pil(clf):
    images = [smooth_image(i, h, w) for i, (h, w) in enumerate([(50, 80), (120, 40), (36, 36)])]
    out = clf.predict(images, top_k=3)
    assert out.ids.shape == out.probabilities.shape == (3, 3)
    probs = clf.probabilities(images)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out.ids, np.argsort(-probs, 1)[:, :3])
    assert np.all(np.diff(out.probabilities, axis=1) <= 0)
    assert out.names == [[clf.class_names[i] for i in row] for row in out.ids]
    # The same pixels in other containers give the same answer.
    np.testing.assert_allclose(clf.probabilities(images[2]), probs[2:3], rtol=1e-6)
    np.testing.assert_allclose(clf.probabilities(np.stack([images[2]] * 2)), probs[[2, 2]], rtol=1e-6)
    np.testing.assert_allclose(clf.probabilities([Image.fromarray(images[0])]), probs[:1], rtol=1e-6)
    rgba = np.concatenate([images[1], np.full((*images[1].shape[:2], 1), 7, np.uint8)], -1)
    np.testing.assert_allclose(clf.probabilities([rgba]), probs[1:2], rtol=1e-6)
    gray = images[0][..., 0]
    np.testing.assert_allclose(clf.probabilities([gray]), clf.probabilities([np.stack([gray] * 3, -1)]), rtol=1e-6)
    # More images than one forward batch: chunks give the same result.
    many = clf.probabilities([images[0]] * (clf.batch_size + 3))
    np.testing.assert_allclose(many, np.repeat(probs[:1], clf.batch_size + 3, 0), rtol=1e-5, atol=1e-7)


def test_features_by_layer_name(clf):
    images = [smooth_image(i, 60, 90) for i in range(2)]
    feats = clf.features(images, layers=["relu1_1", "pool5", "fc7", "fc8"])
    assert feats["relu1_1"].shape == (2, 32, 32, 4) and feats["relu1_1"].min() >= 0
    assert feats["pool5"].shape == (2, 1, 1, 32) and feats["fc7"].shape == (2, 1, 1, 16)
    np.testing.assert_allclose(softmax64(feats["fc8"]), clf.probabilities(images), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="Unknown layer"):
        clf.features(images, layers=["conv9_9"])


def test_converted_weights_preprocessing(run, clf, tmp_path):
    """Weights converted with [0, 1] inputs and a mean/std: predict (and evaluation) feed
    (x / 255 - mean) / std. A one-colour image makes resizing exact."""
    prep = {"input_scale": 1.0, "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}
    meta = dict(checkpoints.read_meta(run), preprocessing=prep)
    converted = checkpoints.save_variables(tmp_path / "converted", clf.variables, meta)
    loaded = load(str(converted))
    np.testing.assert_allclose(loaded.config.data.mean_rgb, [102.0, 114.75, 127.5])
    np.testing.assert_allclose(loaded.config.data.std_rgb, [51.0, 63.75, 76.5])
    colour = np.array([200, 30, 90], np.uint8)
    image = np.broadcast_to(colour, (50, 70, 3)).copy()
    x = (colour / 255.0 - np.array(prep["mean"])) / np.array(prep["std"])  # what the network sees
    expected = softmax64(jitted(clf.model)(clf.variables, np.broadcast_to(x, (1, 32, 32, 3)).astype(np.float32)))
    np.testing.assert_allclose(loaded.probabilities([image]), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(softmax64(loaded.features([image], ["fc8"])["fc8"]), expected, rtol=1e-5, atol=1e-7)
    # The run's own convention (mean subtraction on 0..255) sees other values: the test can tell them apart.
    assert not np.allclose(clf.probabilities([image]), expected, rtol=1e-3)
    # Checkpoints take RGB: a BGR convention (no converter writes one) is refused, naming the fix.
    bgr = dict(meta, preprocessing=dict(prep, channel_order="BGR"))
    with pytest.raises(ValueError, match="take RGB .* Re-run the conversion"):
        load(str(checkpoints.save_variables(tmp_path / "bgr", clf.variables, bgr)))


def test_checkpoint_written_by_convert(clf, tmp_path):
    """vgg_jax.convert's meta (a partial config: model sizes, crop, mean/std; torchvision's [0, 1]
    RGB preprocessing): the model is rebuilt and fed what torchvision feeds."""
    meta = convert.checkpoint_meta("vgg11", clf.model, "torchvision", clf.class_names)
    loaded = load(str(checkpoints.save_variables(tmp_path / "tv", clf.variables, meta)))
    assert loaded.model.width == 4 and loaded.crop_size == 32
    image = np.broadcast_to(np.array([10, 200, 120], np.uint8), (300, 200, 3)).copy()
    x = (image[:32, :32] / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]  # torchvision's Normalize
    x = np.broadcast_to(x, (1, 32, 32, 3))
    expected = softmax64(jitted(clf.model)(clf.variables, np.asarray(x, np.float32)))
    np.testing.assert_allclose(loaded.probabilities([image]), expected, rtol=1e-5, atol=1e-7)


def test_bad_input_errors_name_the_fix(run, clf, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        clf.predict([np.zeros((40, 40, 3), np.float32)])
    with pytest.raises(ValueError, match="expected \\(H, W\\), \\(H, W, 3\\)"):
        clf.predict([np.zeros((40, 40, 2), np.uint8)])
    with pytest.raises(ValueError, match="top_k must be in \\[1, 10\\]"):
        clf.predict([np.zeros((40, 40, 3), np.uint8)], top_k=11)
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        load(str(tmp_path))
    bare = checkpoints.save_variables(tmp_path / "bare", clf.variables, {"class_names": clf.class_names})
    with pytest.raises(ValueError, match="has no model config"):
        load(str(bare))
    bad = dict(checkpoints.read_meta(run), preprocessing={"input_scale": 1, "mean": [0] * 3})
    with pytest.raises(ValueError, match="lacks \\['std'\\]. Re-run the conversion"):
        load(str(checkpoints.save_variables(tmp_path / "bad", clf.variables, bad)))


def test_torchvision_weights_get_torchvision_geometry(clf, tmp_path):
    """A torchvision conversion is fed Resize(S) + CenterCrop(crop) as torchvision computes them (the long
    side truncated, the crop offset rounded): against Pillow's bilinear resize at those sizes."""
    meta = convert.checkpoint_meta("vgg11", clf.model, "torchvision", clf.class_names)
    meta["config"]["data"]["eval_scales"] = [36]
    loaded = load(str(checkpoints.save_variables(tmp_path / "tv", clf.variables, meta)))
    h, w = 37, 55  # Resize(36): long side int(36 * 55 / 37) = 53 (rounding would give 54)
    image = smooth_image(7, h, w)
    rh, rw = 36, 53
    resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BILINEAR), np.float32)
    top, left = int(round((rh - 32) / 2.0)), int(round((rw - 32) / 2.0))  # torchvision's CenterCrop
    crop = resized[top : top + 32, left : left + 32]
    expected = (crop / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(loaded.preprocess([image])[0], expected, atol=1.01 / 255 / 0.224)


def test_predict_takes_pil_images_of_any_mode_and_image_files(clf, tmp_path):
    """PIL converts any mode to RGB (CMYK's C, M, Y must not be read as R, G, B; a palette image is not its
    indices), 16-bit grayscale keeps its range, EXIF orientation is applied, and paths are read."""
    rgb = Image.fromarray(smooth_image(3, 50, 70))
    for mode in ("CMYK", "P", "LA", "RGBA", "L"):
        image = rgb.convert(mode)
        expected = clf.probabilities([np.asarray(image.convert("RGB"))])
        np.testing.assert_allclose(clf.probabilities([image]), expected, rtol=1e-5, atol=1e-7, err_msg=mode)
    cmyk = rgb.convert("CMYK")
    assert not np.allclose(clf.probabilities([cmyk]), clf.probabilities([np.asarray(cmyk)[..., :3]]), rtol=1e-3)
    gray = smooth_image(4, 50, 70)[..., 0]
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    assert sixteen.mode.startswith("I;16")
    np.testing.assert_allclose(clf.probabilities([sixteen]), clf.probabilities([gray]), rtol=1e-5, atol=1e-7)

    path = tmp_path / "photo.png"
    rgb.save(path)
    reference = clf.probabilities([np.asarray(rgb)])
    np.testing.assert_allclose(clf.probabilities(str(path)), reference, rtol=1e-6)
    np.testing.assert_allclose(clf.probabilities([path, str(path)]), np.repeat(reference, 2, 0), rtol=1e-6)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90 degrees clockwise
    rgb.save(tmp_path / "sideways.png", exif=exif)
    upright = np.asarray(rgb.transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_allclose(clf.probabilities(tmp_path / "sideways.png"), clf.probabilities([upright]), rtol=1e-6)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="Cannot read image 0, .*broken.jpg"):
        clf.predict(str(tmp_path / "broken.jpg"))
