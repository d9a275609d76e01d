"""Model zoo tests. Configurations: the paper's Table 1; parameter counts and GMACs: torchvision's published
weights metadata (https://pytorch.org/vision/stable/models/vgg.html, ``num_params`` and ``_ops``)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import models

# torchvision's published num_params (e.g. VGG16_Weights.IMAGENET1K_V1.meta): trainable parameters, 1000 classes.
PUBLISHED_PARAMS = {
    "vgg11": 132_863_336,
    "vgg11_lrn": 132_863_336,
    "vgg13": 133_047_848,
    "vgg16_c": 133_638_952,
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840,
    "vgg13_bn": 133_053_736,
    "vgg16_bn": 138_365_992,
    "vgg19_bn": 143_678_248,
}
# torchvision's published `_ops` (GMACs at 224).
PUBLISHED_GMACS = {"vgg11": 7.609, "vgg13": 11.308, "vgg16": 15.47, "vgg19": 19.632}

TINY = dict(width=4, fc_width=16, crop_size=64, num_classes=7)


def tiny(name: str = "vgg11", **overrides):
    return models.get_model(name, **(TINY | overrides))


def random_images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_exact_parameter_counts(name):
    shapes = models.variable_shapes(models.get_model(name))
    assert models.count_params(shapes["params"]) == PUBLISHED_PARAMS[name]


def test_community_layer_names_and_fc_as_conv_shapes():
    params = models.variable_shapes(models.get_model("vgg19_bn"))
    p, stats = params["params"], params["batch_stats"]
    convs = [f"conv{b}_{i}" for b, n in zip(range(1, 6), (2, 2, 4, 4, 4)) for i in range(1, n + 1)]
    assert set(p) == set(convs) | {f"bn{c[4:]}" for c in convs} | {"fc6", "fc7", "fc8"}
    assert set(stats) == {f"bn{c[4:]}" for c in convs}
    assert p["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
    assert p["conv5_4"]["kernel"].shape == (3, 3, 512, 512)
    assert p["fc6"]["kernel"].shape == (7, 7, 512, 4096)
    assert p["fc7"]["kernel"].shape == (1, 1, 4096, 4096)
    assert p["fc8"]["kernel"].shape == (1, 1, 4096, 1000)
    # fc6 of VGG-16 alone: 7 x 7 x 512 x 4096 weights + 4096 biases = 102,764,544 parameters.
    vgg16 = models.variable_shapes(models.get_model("vgg16"))["params"]
    assert models.count_params(vgg16["fc6"]) == 102_764_544
    # Configuration C: the last conv of blocks 3-5 is 1x1.
    c = models.variable_shapes(models.get_model("C"))["params"]
    assert [c[f"conv{b}_3"]["kernel"].shape[:2] for b in (3, 4, 5)] == [(1, 1)] * 3
    # fc6's window follows the crop size.
    assert models.variable_shapes(tiny(crop_size=96))["params"]["fc6"]["kernel"].shape == (3, 3, 32, 16)


def test_paper_letters_alias_names():
    for letter, name in models.PAPER_NAMES.items():
        assert models.get_model(letter) == models.get_model(name)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown model 'vgg17'.*vgg16_c.*A-LRN"):
        models.get_model("vgg17")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match=r"Unknown model option\(s\) \['widht'\].*width"):
        models.get_model("vgg11", widht=8)
    with pytest.raises(ValueError, match="Unknown init scheme"):
        models.init_variables(tiny(init_scheme="xavier"), jax.random.key(0))


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_forward_macs_match_torchvision(name):
    macs = models.forward_macs(models.get_model(name)) / 1e9
    assert macs == pytest.approx(PUBLISHED_GMACS[name], rel=0.01)


def _unpadded_taps(n: int, k: int) -> int:
    """Kernel taps that land inside an n-long axis for a SAME k-tap convolution, summed over outputs."""
    return sum(min(i + k // 2, n - 1) - max(i - k // 2, 0) + 1 for i in range(n))


@pytest.mark.parametrize("name,size", [("vgg16_c", 64), ("vgg13", 96)])
def test_forward_macs_match_xla_cost_analysis(name, size):
    """Independent check of the layer walk: XLA's own FLOP count of the compiled forward pass.

    XLA counts 2 FLOP per MAC but skips the taps that fall on SAME zero padding, which the
    published (torchvision) convention counts; the expectation below removes them per layer.
    """
    model = tiny(name, width=8, fc_width=32)
    variables = models.init_variables(model, jax.random.key(0))
    x = jnp.zeros((1, size, size, 3))
    compiled = jax.jit(lambda v, x: model.apply(v, x, dense=True)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    padding_macs, side, channels = 0, size, 3
    for block, kernel_sizes in enumerate(model.stages):
        features = 8 * 2 ** min(block, 3)
        for k in kernel_sizes:
            padding_macs += (side * side * k * k - _unpadded_taps(side, k) ** 2) * channels * features
            channels = features
        side //= 2
    expected_flops = 2 * (models.forward_macs(model, size) - padding_macs)
    # XLA also counts bias adds, ReLUs and pools: a few percent on top of the MACs.
    assert expected_flops <= cost["flops"] <= expected_flops * 1.03


def test_logits_shape_dtype_and_dropout_only_in_training():
    model = tiny("vgg13", init_scheme="glorot")
    variables = models.init_variables(model, jax.random.key(0))
    x = random_images((2, 64, 64, 3))
    logits = model.apply(variables, x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, model.apply(variables, x, train=False))
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    no_dropout = tiny("vgg13", init_scheme="glorot", dropout_rate=0.0)
    np.testing.assert_allclose(
        no_dropout.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}), logits, rtol=1e-6
    )


def test_dropout_follows_fc6_and_fc7_with_inverted_scaling():
    """Paper Sect. 3.1: dropout 0.5 on the first two FC layers. In training, the inputs of fc7 and fc8 are
    relu6 and relu7 with about half of the units zeroed and the rest scaled by 1 / (1 - rate)."""
    import flax.linen as nn

    model = models.get_model("vgg11", num_classes=5, width=4, fc_width=256, crop_size=32, init_scheme="glorot")
    variables = models.init_variables(model, jax.random.key(0))
    x = random_images((4, 32, 32, 3))
    inputs = {}

    def grab(next_fn, args, kwargs, context):
        if context.method_name == "__call__" and context.module.name in ("fc7", "fc8"):
            inputs[context.module.name] = np.asarray(args[0])
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(grab):
        _, taps = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)}, mutable=["intermediates"])
    features = taps["intermediates"]["features"]
    for layer, before in (("fc7", "relu6"), ("fc8", "relu7")):
        relu, seen = np.asarray(features[before]), inputs[layer]
        active = relu != 0
        kept = seen[active] != 0
        assert 0.35 < 1 - kept.mean() < 0.65, (layer, kept.mean())
        np.testing.assert_allclose(seen[active][kept], 2 * relu[active][kept], rtol=1e-6, err_msg=layer)
        assert np.all(seen[~active] == 0)
    with nn.intercept_methods(grab):
        _, taps = model.apply(variables, x, train=False, mutable=["intermediates"])
    np.testing.assert_array_equal(inputs["fc8"], taps["intermediates"]["features"]["relu7"])  # none at test time


def test_wrong_input_size_is_a_clear_error():
    model = tiny()
    variables = models.init_variables(model, jax.random.key(0))
    with pytest.raises(ValueError, match="pass dense=True"):
        model.apply(variables, jnp.zeros((1, 96, 96, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(variables, jnp.zeros((1, 3, 64, 64)))


def test_paper_init_statistics():
    for std in (0.01, 0.1):  # the paper's "10^-2 variance" read either way: init_std is what is drawn
        model = models.get_model("vgg11", width=16, fc_width=64, init_std=std)
        params = models.init_variables(model, jax.random.key(0))["params"]
        kernel = np.asarray(params["conv3_1"]["kernel"], np.float64)
        assert kernel.std() == pytest.approx(std, rel=0.05) and abs(kernel.mean()) < 0.1 * std
    assert not np.any(params["conv3_1"]["bias"]) and not np.any(params["fc7"]["bias"])
    glorot = models.init_variables(
        models.get_model("vgg11", width=16, fc_width=64, init_scheme="glorot"), jax.random.key(0)
    )
    k = np.asarray(glorot["params"]["conv3_1"]["kernel"], np.float64)
    fan_in, fan_out = 9 * 32, 9 * 64
    assert k.std() == pytest.approx(np.sqrt(2 / (fan_in + fan_out)), rel=0.05)


def _tf_import():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def test_lrn_equals_tensorflow():
    tf = _tf_import()
    x = np.random.default_rng(0).normal(scale=20.0, size=(2, 5, 5, 11)).astype(np.float32)
    expected = tf.nn.local_response_normalization(x, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75).numpy()
    np.testing.assert_allclose(models.local_response_norm(jnp.asarray(x)), expected, rtol=2e-6, atol=1e-6)


def test_lrn_sits_after_relu1_1_in_a_lrn():
    model = tiny("A-LRN")
    variables = models.init_variables(model, jax.random.key(0))
    feats = models.extract_features(model, variables, random_images((1, 64, 64, 3)), ["relu1_1", "lrn1", "pool1"])
    np.testing.assert_allclose(feats["lrn1"], models.local_response_norm(feats["relu1_1"]), rtol=1e-6)
    pooled = np.asarray(feats["lrn1"]).reshape(1, 32, 2, 32, 2, 4).max(axis=(2, 4))
    np.testing.assert_allclose(feats["pool1"], pooled, rtol=1e-6)
    with pytest.raises(ValueError, match=r"Unknown layer\(s\) \['lrn1'\]"):
        models.extract_features(tiny("A"), variables, random_images((1, 64, 64, 3)), ["lrn1"])


def _fc_head_numpy(params, window_pool5):
    """The classifier as flatten + dense in float64 numpy (no convolution involved)."""
    flat = window_pool5.reshape(-1)
    k6 = np.asarray(params["fc6"]["kernel"], np.float64)
    h = np.maximum(flat @ k6.reshape(-1, k6.shape[-1]) + np.asarray(params["fc6"]["bias"]), 0)
    h = np.maximum(h @ np.asarray(params["fc7"]["kernel"], np.float64)[0, 0] + np.asarray(params["fc7"]["bias"]), 0)
    return h @ np.asarray(params["fc8"]["kernel"], np.float64)[0, 0] + np.asarray(params["fc8"]["bias"])


def test_dense_map_equals_fc_head_on_each_pool5_window():
    model = tiny("vgg16", init_scheme="glorot")
    variables = models.init_variables(model, jax.random.key(3))
    x = random_images((1, 96, 128, 3))
    feats = models.extract_features(model, variables, x, ["pool5", "fc8"])
    pool5, score_map = np.asarray(feats["pool5"], np.float64)[0], np.asarray(feats["fc8"])[0]
    window = model.fc6_window  # 64 / 32 = 2
    assert pool5.shape == (3, 4, 32) and score_map.shape == (3 - window + 1, 4 - window + 1, 7)
    for i in range(score_map.shape[0]):
        for j in range(score_map.shape[1]):
            expected = _fc_head_numpy(variables["params"], pool5[i : i + window, j : j + window])
            np.testing.assert_allclose(score_map[i, j], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(score_map, model.apply(variables, x, dense=True)[0])


def test_dense_on_crop_size_image_is_the_plain_logits():
    model = tiny("vgg19", init_scheme="glorot")
    variables = models.init_variables(model, jax.random.key(0))
    x = random_images((3, 64, 64, 3))
    dense = model.apply(variables, x, dense=True)
    assert dense.shape == (3, 1, 1, 7)
    np.testing.assert_allclose(dense[:, 0, 0], model.apply(variables, x), rtol=1e-6)


def test_batch_norm_variant_updates_statistics_only_in_training():
    model = tiny("vgg11_bn", init_scheme="he")
    variables = models.init_variables(model, jax.random.key(0))
    x = random_images((4, 64, 64, 3)) * 3 + 1
    _, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
    conv = models.extract_features(model, variables, x, ["conv1_1"])["conv1_1"]
    batch_mean = np.asarray(conv, np.float64).mean(axis=(0, 1, 2))
    # momentum 0.9 as torchvision's BatchNorm (its momentum=0.1 is 1 - ours).
    np.testing.assert_allclose(updates["batch_stats"]["bn1_1"]["mean"], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)
    assert model.apply(variables, x).shape == (4, 7)


def test_bfloat16_forward_close_to_float32():
    f32 = tiny("vgg16", init_scheme="glorot")
    bf16 = tiny("vgg16", init_scheme="glorot", dtype="bfloat16")
    variables = models.init_variables(f32, jax.random.key(0))
    assert all(
        x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(models.init_variables(bf16, jax.random.key(0)))
    )
    x = random_images((4, 64, 64, 3))
    a, b = f32.apply(variables, x), bf16.apply(variables, x)
    assert b.dtype == jnp.float32
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.03


def test_extract_features_names_and_shapes():
    model = tiny("vgg16")
    variables = models.init_variables(model, jax.random.key(0))
    x = random_images((2, 64, 64, 3))
    feats = models.extract_features(model, variables, x, ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "pool5", "fc7"])
    assert feats["relu1_2"].shape == (2, 64, 64, 4)
    assert feats["relu3_3"].shape == (2, 16, 16, 16)
    assert feats["relu4_3"].shape == (2, 8, 8, 32)
    assert feats["pool5"].shape == (2, 2, 2, 32)
    assert feats["fc7"].shape == (2, 1, 1, 16)
    assert float(feats["relu2_2"].min()) >= 0
    larger = models.extract_features(model, variables, random_images((1, 96, 64, 3)), ["relu1_2"])
    assert larger["relu1_2"].shape == (1, 96, 64, 4)
    with pytest.raises(ValueError, match="Available: conv1_1"):
        models.extract_features(model, variables, x, ["relu9_9"])


def _stage_pair():
    a = tiny("A", init_scheme="glorot")
    d = tiny("D", init_scheme="glorot")
    return models.init_variables(a, jax.random.key(1))["params"], models.init_variables(d, jax.random.key(2))["params"]


def test_staged_init_copies_the_papers_layers_only():
    a_params, d_params = _stage_pair()
    new, copied = models.staged_init(a_params, d_params)
    assert copied == ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"]
    for name in d_params:
        source = a_params if name in copied else d_params
        for leaf in d_params[name]:
            np.testing.assert_array_equal(new[name][leaf], source[name][leaf])
    # conv1_2 exists only in D: left as freshly initialised.
    assert "conv1_2" not in a_params and "conv1_2" in new


def test_staged_init_shape_mismatch_names_the_layer():
    a_params, _ = _stage_pair()
    wider = models.init_variables(tiny("D", width=8), jax.random.key(0))["params"]
    with pytest.raises(ValueError, match=r"conv1_1/kernel has shape \(3, 3, 3, 4\) in trained A but \(3, 3, 3, 8\)"):
        models.staged_init(a_params, wider)
    with pytest.raises(ValueError, match="'conv3_2' is missing from the trained A"):
        models.staged_init({k: v for k, v in a_params.items() if k != "conv3_2"}, _stage_pair()[1])
