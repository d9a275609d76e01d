"""Per-image transforms (vgg_jax.data.transforms): exactness of the decode-a-window path against
resize-then-crop (TF and a numpy float64 reference), the statistics of the paper's augmentation,
determinism, decoding of the odd files real ImageNet holds, and the evaluation views.

Tolerance for float comparisons of resampled pixels (0..255 scale): TOL = 0.02. Both sides
evaluate the same bilinear interpolation; they differ only in float32 rounding of the sampling
positions (~1e-5 px for images this small), times at most 255 levels per pixel of gradient,
i.e. <= ~0.003, with headroom. Any real mistake (half-pixel offset, wrong window, clamping) moves
pixels by whole levels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

from vgg_jax.data import transforms as T

TOL = 0.02
PLAIN = dict(pca_alpha_std=0.0, mean_rgb=(0.0, 0.0, 0.0))  # no colour shift, no mean: raw pixels


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: smooth colour blobs plus noise (sharp and smooth structure)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((h // 6 + 2, w // 6 + 2, 3)) * 255).astype(np.uint8))
    image = np.asarray(coarse.resize((w, h), Image.BICUBIC), np.float64) + rng.normal(0, 25, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, fmt, **kw)
    return buf.getvalue()


def np_resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """float64 bilinear resize, half-pixel centres, clamped at the borders (tf.image.resize's rule)."""

    def taps(n_in: int, n_out: int):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(pos).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), pos - i0

    y0, y1, wy = taps(image.shape[0], out_h)
    x0, x1, wx = taps(image.shape[1], out_w)
    x = image.astype(np.float64)
    rows = x[y0] * (1 - wy)[:, None, None] + x[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def seeds(n: int, base: int = 7) -> tf.data.Dataset:
    return tf.data.Dataset.range(n).map(lambda i: tf.stack([tf.constant(base, tf.int64), i]))


def sample_params(n: int, hw: tuple[int, int], config: T.TransformConfig) -> dict[str, np.ndarray]:
    ds = seeds(n).map(lambda s: T.sample_train_params(s, tf.constant(hw), config))
    return next(iter(ds.batch(n).as_numpy_iterator()))


def train_views(encoded: bytes, n: int, config: T.TransformConfig, base: int = 7) -> np.ndarray:
    ds = seeds(n, base).map(lambda s: T.train_view(tf.constant(encoded), s, config), num_parallel_calls=2)
    return next(iter(ds.batch(n).as_numpy_iterator()))


# ----------------------------------------------------------------------------------------------
# The decode-a-window path equals resize-then-crop


@pytest.mark.parametrize("fmt,options", [("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}), ("PNG", {})])
def test_train_view_equals_resize_then_crop(fmt, options):
    """Down- and up-scaling (S from 12 to 150 on a 60x80 image), crops at every position incl. the
    borders, flips: the window path equals resizing the whole image (tf.image.resize and a numpy
    float64 bilinear resize), then cropping."""
    config = T.TransformConfig(crop_size=12, scale_min=12, scale_max=150, **PLAIN)
    encoded = encode(textured(60, 80), fmt, **options)
    n = 100
    views = train_views(encoded, n, config)
    params = sample_params(n, (60, 80), config)
    full = T.decode_rgb(encoded).numpy()
    for k in range(n):
        (h, w), (oy, ox) = params["size"][k], params["offset"][k]
        tf_ref = tf.image.resize(full, (h, w), "bilinear").numpy()[oy : oy + 12, ox : ox + 12]
        np_ref = np_resize_bilinear(full, h, w)[oy : oy + 12, ox : ox + 12]
        if params["flip"][k]:
            tf_ref, np_ref = tf_ref[:, ::-1], np_ref[:, ::-1]
        np.testing.assert_allclose(views[k], tf_ref, atol=TOL, rtol=0)
        np.testing.assert_allclose(views[k], np_ref, atol=TOL, rtol=0)
    # The draws covered flips, border crops, down- and up-scaling.
    assert params["flip"].any() and not params["flip"].all()
    assert (params["offset"] == 0).any() and (params["offset"] == params["size"] - 12).any()
    assert (params["scale"] < 60).any() and (params["scale"] > 60).any()


def test_jpeg_window_is_decoded_not_the_image():
    """A 224 crop at S=256 of a 375x500 JPEG decodes a window of about 224 * 375/256 px squared."""
    hw, crop = tf.constant([375, 500]), tf.constant([224, 224])
    start, extent, pad, _ = T._window_and_box(hw, T.shorter_side_size(hw, 256), tf.constant([10, 50]), crop, False)
    assert not pad
    assert (extent.numpy() <= int(np.ceil(224 * 375 / 256)) + 4).all(), extent
    window = tf.image.decode_and_crop_jpeg(encode(textured(375, 500)), tf.concat([start, extent], 0), channels=3)
    assert window.shape[:2] == tuple(extent.numpy())


# ----------------------------------------------------------------------------------------------
# Statistics of the augmentation


def test_scale_jitter_is_uniform_over_the_integers():
    config = T.TransformConfig(crop_size=224, scale_min=256, scale_max=512)
    n = 20000
    p = sample_params(n, (375, 500), config)
    s = p["scale"]
    assert s.min() == 256 and s.max() == 512 and np.issubdtype(s.dtype, np.integer)
    # Discrete uniform on {256..512} <=> S + U[0, 1) uniform on [256, 513): a KS test.
    u = np.random.default_rng(0).random(n)
    assert stats.kstest(s + u, "uniform", args=(256, 257)).pvalue > 1e-3
    # The rescaled size: shorter side exactly S, the longer one round(500 * S / 375).
    np.testing.assert_array_equal(p["size"][:, 0], s)
    np.testing.assert_array_equal(p["size"][:, 1], np.floor(500 * s / 375 + 0.5).astype(int))


def test_fixed_scale():
    p = sample_params(500, (375, 500), T.TransformConfig(crop_size=224, scale_min=384, scale_max=384))
    assert (p["scale"] == 384).all() and (p["size"] == [384, 512]).all()


def test_flips_about_half():
    n = 20000
    flips = sample_params(n, (60, 80), T.TransformConfig(crop_size=16, scale_min=16, scale_max=32))["flip"]
    assert stats.binomtest(int(flips.sum()), n, 0.5).pvalue > 1e-3
    off = sample_params(200, (60, 80), T.TransformConfig(crop_size=16, scale_min=16, scale_max=32, flip=False))
    assert not off["flip"].any()


def test_pca_shift_covariance():
    """On a flat grey image the output is grey + shift - mean everywhere: the shift's covariance
    over many images matches eigvec diag((alpha_std * eigval * 255)^2) eigvec^T (numpy float64)."""
    config = T.TransformConfig(crop_size=4, scale_min=6, scale_max=9, flip=True)
    grey = 100.0
    views = train_views(encode(np.full((6, 8, 3), 100, np.uint8), "PNG"), 4000, config)
    assert np.abs(views - views[:, :1, :1]).max() < 1e-3  # one shift per image, the same on every pixel
    shifts = views[:, 0, 0].astype(np.float64) - grey + np.asarray(config.mean_rgb)
    eigvec, eigval = np.asarray(config.pca_eigvec, np.float64), np.asarray(config.pca_eigval, np.float64)
    var = (config.pca_alpha_std * eigval * 255.0) ** 2
    expected = eigvec @ np.diag(var) @ eigvec.T
    measured = np.cov(shifts.T)
    # Compare in the eigen-basis, where the expected matrix is diag(var): 5-sigma sampling bounds.
    n = len(shifts)
    in_basis = eigvec.T @ measured @ eigvec
    assert np.all(np.abs(np.diag(in_basis) / var - 1) < 5 * np.sqrt(2 / n)), np.diag(in_basis) / var
    off = in_basis / np.sqrt(np.outer(var, var))
    assert np.all(np.abs(off[~np.eye(3, dtype=bool)]) < 5 / np.sqrt(n)), off
    assert np.all(np.abs(shifts.mean(0)) < 5 * np.sqrt(np.diag(expected) / n))
    np.testing.assert_allclose(measured, expected, rtol=0.15, atol=0.15 * var.max())


def test_crops_cover_the_image_uniformly():
    """At S = the shorter side the resize is the identity, so each view is an exact slice of the
    image; over many draws the corners are uniform over all positions and cover every pixel."""
    h, w, c = 12, 16, 5
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([yy * 20, xx * 15, np.full_like(yy, 7)], -1).astype(np.uint8)  # pixel = its position
    config = T.TransformConfig(crop_size=c, scale_min=h, scale_max=h, flip=False, **PLAIN)
    n = 2000
    views = train_views(encode(image, "PNG"), n, config)
    oy, ox = (views[:, 0, 0, 0] / 20).astype(int), (views[:, 0, 0, 1] / 15).astype(int)
    covered = np.zeros((h, w), bool)
    for k in range(n):
        np.testing.assert_array_equal(views[k], image[oy[k] : oy[k] + c, ox[k] : ox[k] + c])
        covered[oy[k] : oy[k] + c, ox[k] : ox[k] + c] = True
    assert covered.all()
    counts = np.zeros((h - c + 1, w - c + 1))
    np.add.at(counts, (oy, ox), 1)
    assert counts.min() > 0 and stats.chisquare(counts.ravel()).pvalue > 1e-3


def test_jittered_crops_cover_every_rescaled_image():
    config = T.TransformConfig(crop_size=5, scale_min=6, scale_max=9)
    p = sample_params(4000, (12, 16), config)
    for s in range(6, 10):
        pick = p["scale"] == s
        rh, rw = p["size"][pick][0]
        covered = np.zeros((rh, rw), bool)
        for oy, ox in p["offset"][pick]:
            assert 0 <= oy <= rh - 5 and 0 <= ox <= rw - 5
            covered[oy : oy + 5, ox : ox + 5] = True
        assert covered.all(), s


# ----------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_view_different_seed_different():
    config = T.TransformConfig(crop_size=16, scale_min=20, scale_max=40)
    encoded = encode(textured(30, 40))
    a = train_views(encoded, 8, config, base=3)
    b = train_views(encoded, 8, config, base=3)
    np.testing.assert_array_equal(a, b)
    eager = T.train_view(tf.constant(encoded), tf.constant([3, 5], tf.int64), config).numpy()
    np.testing.assert_array_equal(eager, a[5])
    c = train_views(encoded, 8, config, base=4)
    assert all(np.abs(a[k] - c[k]).max() > 1 for k in range(8))
    assert all(np.abs(a[k] - a[k + 1]).max() > 1 for k in range(7))


# ----------------------------------------------------------------------------------------------
# Decoding the odd files of real ImageNet


def test_grayscale_jpeg_decodes_to_rgb():
    grey = textured(20, 24)[..., 0]
    encoded = encode(grey)
    pillow = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), np.int32)
    ours = T.decode_rgb(encoded).numpy().astype(np.int32)
    assert ours.shape == (20, 24, 3)
    assert np.abs(ours - pillow).max() <= 1  # same libjpeg IDCT up to rounding
    assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 1] == ours[..., 2]).all()


def test_cmyk_jpeg_decodes_to_pillows_rgb():
    """Pillow writes Adobe (inverted) CMYK JPEGs, as Photoshop does; TF must undo the inversion
    and convert with R = (255 - C)(255 - K)/255 like Pillow (a wrong convention errs by ~100s)."""
    rng = np.random.default_rng(1)
    cmyk = np.concatenate([textured(24, 32, 2), (rng.random((24, 32, 1)) * 150).astype(np.uint8)], -1)
    encoded = encode(Image.fromarray(cmyk, "CMYK"), quality=95)
    pillow = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"), np.int32)
    ours = T.decode_rgb(encoded).numpy().astype(np.int32)
    assert ours.shape == (24, 32, 3)
    assert np.abs(ours - pillow).max() <= 2 and np.abs(ours - pillow).mean() < 0.6
    # And the window path (decode_and_crop_jpeg) decodes CMYK the same way.
    config = T.TransformConfig(crop_size=8, scale_min=24, scale_max=24, flip=False, **PLAIN)
    view = train_views(encoded, 2, config)[1]
    oy, ox = sample_params(2, (24, 32), config)["offset"][1]
    np.testing.assert_allclose(view, ours[oy : oy + 8, ox : ox + 8], atol=TOL)


def test_png_named_jpeg_and_rgba_decode():
    image = textured(18, 22)
    np.testing.assert_array_equal(T.decode_rgb(encode(image, "PNG")).numpy(), image)
    rgba = np.concatenate([image, np.full((18, 22, 1), 9, np.uint8)], -1)
    np.testing.assert_array_equal(T.decode_rgb(encode(rgba, "PNG")).numpy(), image)  # alpha dropped
    config = T.TransformConfig(crop_size=10, scale_min=18, scale_max=18, flip=False, **PLAIN)
    view = train_views(encode(image, "PNG"), 3, config)[2]
    oy, ox = sample_params(3, (18, 22), config)["offset"][2]
    np.testing.assert_allclose(view, image[oy : oy + 10, ox : ox + 10], atol=TOL)


def test_corrupt_bytes_raise_invalid_argument():
    """The pipeline skips or fails on bad images by catching this error."""
    config = T.TransformConfig(crop_size=8, scale_min=8, scale_max=8)
    for bad in [b"not an image at all", encode(textured(30, 40))[:300]]:
        with pytest.raises(tf.errors.InvalidArgumentError):
            T.train_view(tf.constant(bad), tf.constant([0, 0], tf.int64), config)
        with pytest.raises(tf.errors.InvalidArgumentError):
            T.eval_full_view(tf.constant(bad), 8, config)


# ----------------------------------------------------------------------------------------------
# Evaluation views


@pytest.mark.parametrize("fmt,scale", [("JPEG", 24), ("PNG", 24), ("JPEG", 70)])
def test_full_and_centre_views(fmt, scale):
    """Full view: shorter side Q, equal to the float64 bilinear resize; the centre view (window
    path) equals the middle of the full view."""
    config = T.TransformConfig(crop_size=20, scale_min=20, scale_max=20, mean_rgb=(10, 20, 30), std_rgb=(2, 4, 5))
    encoded = encode(textured(45, 60), fmt)
    full = T.eval_full_view(encoded, scale, config).numpy()
    h, w = T.shorter_side_size([45, 60], scale).numpy()
    assert full.shape == (h, w, 3) and min(h, w) == scale
    ref = (np_resize_bilinear(T.decode_rgb(encoded).numpy(), h, w) - [10, 20, 30]) / [2, 4, 5]
    np.testing.assert_allclose(full, ref, atol=TOL / 2)
    centre = T.eval_center_view(encoded, scale, config).numpy()
    oy, ox = (h - 20) // 2, (w - 20) // 2
    np.testing.assert_allclose(centre, full[oy : oy + 20, ox : ox + 20], atol=TOL / 2)


def test_multicrop_views_are_the_grid_crops_and_their_flips():
    config = T.TransformConfig(crop_size=16, scale_min=16, scale_max=16, mean_rgb=(1.0, 2.0, 3.0))
    encoded = encode(textured(30, 47), "PNG")
    views = T.multicrop_views(encoded, 30, config).numpy()
    full = T.eval_full_view(encoded, 30, config).numpy()
    h, w = full.shape[:2]
    assert views.shape == (50, 16, 16, 3) and (h, w) == (30, 47)
    ys = np.floor(np.linspace(0, h - 16, 5)).astype(int)
    xs = np.floor(np.linspace(0, w - 16, 5)).astype(int)
    assert ys[0] == xs[0] == 0 and ys[-1] == h - 16 and xs[-1] == w - 16  # both borders
    for k in range(25):
        y, x = ys[k // 5], xs[k % 5]
        np.testing.assert_array_equal(views[k], full[y : y + 16, x : x + 16])
        np.testing.assert_array_equal(views[25 + k], full[y : y + 16, x : x + 16][:, ::-1])


# ----------------------------------------------------------------------------------------------
# Helpers and configuration


def test_shorter_side_size():
    for hw in [(375, 500), (500, 375), (333, 500), (100, 100), (1, 7), (4000, 3)]:
        for s in [224, 256, 257, 384, 512]:
            h, w = T.shorter_side_size(tf.constant(hw), s).numpy()
            short, long = min(hw), max(hw)
            expect_long = int(np.floor(long * s / short + 0.5))
            assert (min(h, w), max(h, w)) == (s, expect_long)
            assert (h <= w) == (hw[0] <= hw[1])


def test_normalize_and_pca_offset_against_numpy():
    config = T.TransformConfig(mean_rgb=(120.0, 110.0, 100.0), std_rgb=(50.0, 60.0, 70.0))
    image = np.random.default_rng(0).random((5, 7, 3)) * 255
    alpha = np.array([0.3, -1.2, 0.7])
    offset = np.asarray(config.pca_eigvec) @ (alpha * np.asarray(config.pca_eigval) * 255)
    np.testing.assert_allclose(T.pca_offset(tf.constant(alpha, tf.float32), config).numpy(), offset, rtol=1e-5)
    out = T.normalize(tf.constant(image, tf.float32), config, tf.constant(offset, tf.float32)).numpy()
    np.testing.assert_allclose(out, (image + offset - [120, 110, 100]) / [50, 60, 70], rtol=1e-5, atol=1e-5)


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="scale_min >= crop_size"):
        T.TransformConfig(crop_size=224, scale_min=200, scale_max=300)
    with pytest.raises(ValueError, match="scale_max"):
        T.TransformConfig(crop_size=224, scale_min=300, scale_max=256)
    with pytest.raises(ValueError, match="3x3"):
        T.TransformConfig(pca_eigvec=((1.0, 0.0), (0.0, 1.0)))
    with pytest.raises(ValueError, match="std > 0"):
        T.TransformConfig(std_rgb=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="Q >= crop_size"):
        T.eval_center_view(tf.constant(b""), 200, T.TransformConfig())
