"""Weight import/export (vgg_jax.convert) against independent implementations.

References: PyTorch running torchvision's VGG module layout (``TorchVGG`` below: torchvision's
``cfgs`` lists and ``make_layers``, built in plain ``torch.nn`` because torchvision is not
installed beside torch here) and ``keras.applications.VGG16/VGG19``.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from vgg_jax import checkpoints, convert, models, preprocessing
from vgg_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# torchvision.models.vgg.cfgs and the names built from them.
CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
TORCHVISION = {
    "vgg11": ("A", False),
    "vgg13": ("B", False),
    "vgg16": ("D", False),
    "vgg19": ("E", False),
    "vgg11_bn": ("A", True),
    "vgg13_bn": ("B", True),
    "vgg16_bn": ("D", True),
    "vgg19_bn": ("E", True),
}
SMALL = {"width": 4, "fc_width": 16}  # reduced width; crop 224 keeps fc6's 7x7 window


class TorchVGG(torch.nn.Module):
    """torchvision.models.VGG: the same module indices (features.N, avgpool, classifier.0/3/6)."""

    def __init__(self, name: str, num_classes: int = 1000, width: int = 64, fc_width: int = 4096):
        super().__init__()
        cfg, batch_norm = TORCHVISION[name]
        layers: list[torch.nn.Module] = []
        channels = 3
        for v in CFGS[cfg]:
            if v == "M":
                layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            v = v * width // 64
            layers.append(torch.nn.Conv2d(channels, v, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(torch.nn.BatchNorm2d(v))
            layers.append(torch.nn.ReLU(inplace=True))
            channels = v
        self.features = torch.nn.Sequential(*layers)
        self.avgpool = torch.nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(channels * 7 * 7, fc_width),
            torch.nn.ReLU(True),
            torch.nn.Dropout(),
            torch.nn.Linear(fc_width, fc_width),
            torch.nn.ReLU(True),
            torch.nn.Dropout(),
            torch.nn.Linear(fc_width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def torch_reference(name: str, seed: int = 0, **kwargs) -> TorchVGG:
    """torchvision's initialisation, plus non-zero biases and BN statistics so that every tensor matters."""
    torch.manual_seed(seed)
    net = TorchVGG(name, **kwargs)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                m.bias.uniform_(-0.1, 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0, 0.01)
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def torch_logits(net: TorchVGG, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy().astype(np.float64)


def our_logits(model: models.VGG, variables: dict, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)(variables, x), np.float64)


def relative_error(ours: np.ndarray, expected: np.ndarray) -> float:
    assert np.abs(expected).max() > 1e-4, "degenerate reference logits"
    return float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))


def images(n: int, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def flat(variables: dict) -> dict[str, np.ndarray]:
    return {
        f"{c}/{layer}/{leaf}": np.asarray(v)
        for c in ("params", "batch_stats")
        for layer, leaves in variables.get(c, {}).items()
        for leaf, v in leaves.items()
    }


# --------------------------------------------------------------------------------------------
# torchvision


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_layout_has_torchvision_keys_and_shapes(name):
    """Our index walk names exactly torchvision's tensors, with its shapes (full size, no memory: meta device)."""
    with torch.device("meta"):
        reference = TorchVGG(name)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = models.get_model(name)
    shapes = models.variable_shapes(model)
    ours = {
        t.key: t.foreign_shape(tuple(shapes[t.collection][t.layer][t.leaf].shape))
        for t in convert.torchvision_layout(model)
    }
    assert ours == expected
    assert convert.guess_torchvision_model(reference.state_dict()).startswith(f"{name} ")


@pytest.mark.parametrize("name,suffix,export", [("vgg16", ".pth", False), ("vgg16_bn", ".safetensors", True)])
def test_full_size_logits_match_pytorch(name, suffix, export, tmp_path):
    reference = torch_reference(name)
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        torch_save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    x = images(1)
    expected = torch_logits(reference, x)
    model, variables = convert.convert_file(path, "torchvision", name)
    assert models.count_params(variables["params"]) == sum(p.numel() for p in reference.parameters()), (
        "parameter count differs from torchvision's"
    )
    assert relative_error(our_logits(model, variables, x), expected) < 1e-4
    if not export:
        return
    # Export gives back torchvision's tensors exactly, and torch (strict load) computes the same logits.
    exported = tmp_path / "exported.safetensors"
    convert.save_torchvision_safetensors(exported, variables, model)
    state = torch_load_file(str(exported))
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value), key
    fresh = TorchVGG(name).eval()
    fresh.load_state_dict(state, strict=True)
    np.testing.assert_array_equal(torch_logits(fresh, x), expected)


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_export_import_round_trip_is_identical(name):
    model = models.get_model(name, num_classes=7, **SMALL)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda v: rng.uniform(0.5, 2.0, v.shape).astype(np.float32), models.variable_shapes(model)
    )
    back = convert.from_torchvision(convert.to_torchvision(variables, model), model)
    original = flat(variables)
    assert flat(back).keys() == original.keys()
    for key, value in flat(back).items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


def test_small_model_logits_match_pytorch():
    """Reduced width: the fc6 C,H,W -> H,W,C reshape matters with any channel count."""
    reference = torch_reference("vgg11_bn", num_classes=5, **SMALL)
    model = models.get_model("vgg11_bn", num_classes=5, **SMALL)
    variables = convert.from_torchvision(reference.state_dict(), model)
    x = images(2, seed=1)
    assert relative_error(our_logits(model, variables, x), torch_logits(reference, x)) < 1e-4


# --------------------------------------------------------------------------------------------
# Wrong files


def small_state(name: str) -> dict[str, torch.Tensor]:
    return TorchVGG(name, **SMALL).state_dict()


@pytest.mark.parametrize(
    "file_name,model_name,match",
    [
        (
            "vgg16",
            "vgg19",
            r"no tensor 'features\.16\.weight' \(conv3_4/kernel, expected shape \(16, 16, 3, 3\)\).*"
            r"looks like vgg16 ",
        ),
        ("vgg19", "vgg16", r"no tensor 'features\.17\.weight'.*looks like vgg19 "),
        ("vgg16_bn", "vgg16", r"no tensor 'features\.2\.weight'.*looks like vgg16_bn "),
        ("vgg11", "vgg11_bn", r"no tensor 'features\.1\.weight' \(bn1_1/scale.*looks like vgg11 "),
    ],
)
def test_wrong_architecture_names_the_tensor(file_name, model_name, match):
    with pytest.raises(ValueError, match=match):
        convert.from_torchvision(small_state(file_name), models.get_model(model_name, num_classes=1000, **SMALL))


def test_wrong_shapes_and_extra_tensors_are_named():
    state = small_state("vgg16")
    with pytest.raises(
        ValueError,
        match=r"'features\.0\.weight' \(conv1_1/kernel\) has shape \(4, 3, 3, 3\) in "
        r"the torchvision file but vgg16 \(width 8.* expects \(8, 3, 3, 3\)",
    ):
        convert.from_torchvision(state, models.get_model("vgg16", width=8, fc_width=16))
    with pytest.raises(
        ValueError,
        match=r"'classifier\.6\.weight' \(fc8/kernel\) has shape \(1000, 16\).*"
        r"expects \(10, 16\)",
    ):
        convert.from_torchvision(state, models.get_model("vgg16", num_classes=10, **SMALL))
    with pytest.raises(
        ValueError,
        match=r"'classifier\.0\.weight' \(fc6/kernel\) has shape \(16, 1568\).*"
        r"crop_size 64.*expects \(16, 128\)",
    ):
        convert.from_torchvision(state, models.get_model("vgg16", crop_size=64, **SMALL))
    with pytest.raises(ValueError, match=r"tensor 'classifier\.9\.weight' \(shape \(3, 3\)\) that vgg16"):
        convert.from_torchvision(
            {**state, "classifier.9.weight": torch.zeros(3, 3)}, models.get_model("vgg16", **SMALL)
        )
    with pytest.raises(ValueError, match="no VGG with LRN"):
        convert.from_torchvision(small_state("vgg11"), models.get_model("vgg11_lrn", **SMALL))


class _Payload:
    """Unpickling this object runs ``exec``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "features.0.bias": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"Refused to load .*evil\.pth.*could run code.*not loaded"):
        convert.read_tensors(path, "torchvision")
    assert not marker.exists()
    # The file really is malicious: an unsafe load would have run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_non_state_dict_and_unknown_files_are_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="holds a list, not a state dict of tensors"):
        convert.read_tensors(path, "torchvision")
    with pytest.raises(ValueError, match=r"expected one of \.npz, \.h5"):
        convert.read_tensors(tmp_path / "w.pkl", "caffe")
    with pytest.raises(FileNotFoundError, match="No such weights file"):
        convert.read_tensors(tmp_path / "missing.npz", "caffe")


# --------------------------------------------------------------------------------------------
# Keras and Caffe (BGR input: imports flip conv1_1 to RGB)


def test_keras_h5_logits_match_keras_on_bgr(tmp_path):
    """Keras 3 ``.weights.h5`` and the legacy layout of the released
    ``vgg16_weights_tf_dim_ordering_tf_kernels.h5`` (VGG19 live-model parity: test_keras_parity.py)."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    keras.utils.set_random_seed(0)
    reference = keras.applications.VGG16(weights=None, classifier_activation=None)
    reference.save_weights(tmp_path / "w.weights.h5")
    with h5py.File(tmp_path / "legacy.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    model, variables = convert.convert_file(tmp_path / "w.weights.h5", "keras", "vgg16")
    _, legacy = convert.convert_file(tmp_path / "legacy.h5", "keras", "vgg16")
    assert flat(legacy).keys() == flat(variables).keys()
    for key, value in flat(legacy).items():
        np.testing.assert_array_equal(value, flat(variables)[key], err_msg=key)
    x = images(1)
    expected = np.asarray(reference(x[..., ::-1], training=False), np.float64)  # Keras sees BGR
    assert relative_error(our_logits(model, variables, x), expected) < 1e-4
    # The live-model import keeps Keras' input order.
    params = convert.from_keras(reference, model)
    np.testing.assert_array_equal(params["conv1_1"]["kernel"], variables["params"]["conv1_1"]["kernel"][:, :, ::-1])


def test_keras_file_without_classifier_is_refused(tmp_path):
    import keras

    reference = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = tmp_path / "notop.weights.h5"
    reference.save_weights(path)
    with pytest.raises(ValueError, match=r"keras file has no tensor 'fc1/kernel' \(fc6/kernel"):
        convert.convert_file(path, "keras", "vgg16")


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_caffe_dump_matches_reference_on_bgr(suffix, tmp_path):
    """A Caffe net's blobs are torch's OIHW / (out, in) tensors under Caffe's names; it is fed BGR."""
    import h5py

    reference = torch_reference("vgg16", num_classes=5, seed=2, width=8, fc_width=32)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    model = models.get_model("vgg16", num_classes=5, width=8, fc_width=32)
    blobs = {}
    for t in convert.torchvision_layout(model):
        blobs[f"{t.layer}/{'W' if t.leaf == 'kernel' else 'b'}"] = state[t.key]
    path = tmp_path / f"vgg16{suffix}"
    if suffix == ".npz":
        np.savez(path, **blobs)
    else:
        with h5py.File(path, "w") as f:
            for key, value in blobs.items():
                f[key] = value
    model, variables = convert.convert_file(path, "caffe", "vgg16", width=8, fc_width=32)
    assert model.num_classes == 5
    x = images(2, seed=3)
    expected = torch_logits(reference, np.ascontiguousarray(x[..., ::-1]))
    assert relative_error(our_logits(model, variables, x), expected) < 1e-4


# --------------------------------------------------------------------------------------------
# Presets and the command line


def test_preprocessing_presets():
    # torchvision: (x / 255 - 0.485) / 0.229 == (x - 123.675) / 58.395 on 0..255.
    torchvision, caffe = preprocessing.PRESETS["torchvision"], preprocessing.PRESETS["caffe"]
    np.testing.assert_allclose(torchvision.mean_rgb, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(torchvision.std_rgb, [58.395, 57.12, 57.375])
    assert caffe.mean_rgb == (123.68, 116.779, 103.939) and caffe.std_rgb == (1.0, 1.0, 1.0)
    # Caffe's BGR mean subtracted from BGR pixels is our RGB preset on RGB pixels, reordered.
    x = np.random.default_rng(0).uniform(0, 255, (1, 2, 2, 3)).astype(np.float32)
    np.testing.assert_allclose((x[..., ::-1] - [103.939, 116.779, 123.68])[..., ::-1], caffe.normalize(x), rtol=1e-6)
    np.testing.assert_allclose(
        torchvision.normalize(x), (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-5
    )


def test_cli_converts_and_exports(tmp_path, capsys):
    reference = torch_reference("vgg13_bn", num_classes=3, seed=4, **SMALL)
    pth = tmp_path / "vgg13_bn.pth"
    torch.save(reference.state_dict(), pth)
    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\n")
    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "vgg_jax.convert",
        "--layout=torchvision",
        "--model=vgg13_bn",
        "--width=4",
        "--fc_width=16",
        f"--class_names={tmp_path / 'classes.txt'}",
        str(pth),
        str(ckpt),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    meta = checkpoints.read_meta(ckpt)
    assert meta == {
        "config": {
            "model": {"name": "vgg13_bn", "width": 4, "fc_width": 16, "num_classes": 3},
            "data": {
                "crop_size": 224,
                "mean_rgb": pytest.approx([123.675, 116.28, 103.53]),
                "std_rgb": pytest.approx([58.395, 57.12, 57.375]),
                "resize": "torchvision",
            },
        },
        "class_names": ["cat", "dog", "emu"],
        "preprocessing": preprocessing.PRESETS["torchvision"].to_meta(),
        "layout": "torchvision",
    }
    model, variables, _ = checkpoints.restore_model(ckpt)
    x = images(1, seed=5)
    assert relative_error(our_logits(model, variables, x), torch_logits(reference, x)) < 1e-4

    out = tmp_path / "back.safetensors"
    convert.main(["--to=torchvision-safetensors", str(ckpt), str(out)])
    back = load_file(str(out))
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    with pytest.raises(UserError, match="already exists"):
        convert.main(["--layout=torchvision", str(pth), str(ckpt)])  # exists: refused
    with pytest.raises(UserError, match="looks like vgg13_bn"):
        convert.main(["--layout=torchvision", "--model=vgg16", str(pth), str(tmp_path / "new")])  # wrong model


def test_caffe_cli_stores_rgb_caffe_preset(tmp_path):
    model = models.get_model("vgg11", num_classes=4, **SMALL)
    shapes = models.variable_shapes(model)["params"]
    rng = np.random.default_rng(0)
    blobs = {
        t.key: rng.normal(size=t.foreign_shape(tuple(shapes[t.layer][t.leaf].shape))).astype(np.float32)
        for t in convert.caffe_layout(model)
    }
    np.savez(tmp_path / "vgg11.npz", **blobs)
    convert.main(
        [
            "--layout=caffe",
            "--model=A",
            "--width=4",
            "--fc_width=16",
            str(tmp_path / "vgg11.npz"),
            str(tmp_path / "ckpt"),
        ]
    )
    meta = checkpoints.read_meta(tmp_path / "ckpt")
    assert meta["preprocessing"] == {
        "input_scale": 255.0,
        "mean": [123.68, 116.779, 103.939],
        "std": [1.0, 1.0, 1.0],
        "resize": "round",
    }
    assert meta["config"]["model"]["name"] == "vgg11" and meta["layout"] == "caffe"
    kernel = np.asarray(checkpoints.restore_model(tmp_path / "ckpt")[1]["params"]["conv1_1"]["kernel"])
    np.testing.assert_array_equal(kernel, blobs["conv1_1/W"].transpose(2, 3, 1, 0)[:, :, ::-1, :])
