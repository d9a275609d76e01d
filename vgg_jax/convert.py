"""Weight import and export between vgg_jax and the torchvision, Keras and Caffe layouts.

docs/backbone.md#converting-weights
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import flags

from vgg_jax import checkpoints, cli, models, preprocessing, storage
from vgg_jax.errors import UserError
from vgg_jax.models import VGG

# The input convention (vgg_jax.preprocessing.PRESETS) of each layout's published weights.
LAYOUT_CONVENTION = {"torchvision": "torchvision", "keras": "caffe", "caffe": "caffe"}
BGR_LAYOUTS = ("keras", "caffe")  # networks fed BGR: conv1_1 is flipped to take RGB
FC8_BIAS = {"torchvision": "classifier.6.bias", "keras": "predictions/bias", "caffe": "fc8/b"}
IGNORED = re.compile(r".*\.num_batches_tracked")  # torchvision BN bookkeeping, not a weight

OIHW, HWIO = "oihw", "hwio"


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a foreign layout and the variable of ours it holds.

    ``kernel`` is the foreign axis order of a kernel: ``oihw`` (torch, Caffe: conv OIHW, FC
    ``(out, C*H*W)``), ``hwio`` (Keras: conv HWIO, FC ``(H*W*C, out)``) or None for vectors.
    """

    key: str
    layer: str
    leaf: str
    collection: str = "params"
    kernel: str | None = None

    def foreign_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        if self.kernel is None:
            return ours
        h, w, i, o = ours
        if self.layer.startswith("fc"):
            return (o, i * h * w) if self.kernel == OIHW else (h * w * i, o)
        return (o, i, h, w) if self.kernel == OIHW else ours

    def to_ours(self, array: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
        if self.kernel == OIHW:
            h, w, i, o = ours
            return array.reshape(o, i, h, w).transpose(2, 3, 1, 0)
        return array.reshape(ours)

    def to_foreign(self, array: np.ndarray) -> np.ndarray:
        shape = self.foreign_shape(array.shape)
        return (array.transpose(3, 2, 0, 1) if self.kernel == OIHW else array).reshape(shape)


def _conv_names(model: VGG) -> list[str]:
    return [f"{b}_{i}" for b, block in enumerate(model.stages, start=1) for i in range(1, len(block) + 1)]


def torchvision_layout(model: VGG) -> list[Tensor]:
    """torchvision's state-dict keys for ``model``, by walking its conv, [bn], relu, pool sequence."""
    tensors, index = [], 0
    for block, kernels in enumerate(model.stages, start=1):
        for i in range(1, len(kernels) + 1):
            tensors += [
                Tensor(f"features.{index}.weight", f"conv{block}_{i}", "kernel", kernel=OIHW),
                Tensor(f"features.{index}.bias", f"conv{block}_{i}", "bias"),
            ]
            index += 1
            if model.batch_norm:
                tensors += [
                    Tensor(f"features.{index}.{theirs}", f"bn{block}_{i}", ours, collection)
                    for theirs, ours, collection in (
                        ("weight", "scale", "params"),
                        ("bias", "bias", "params"),
                        ("running_mean", "mean", "batch_stats"),
                        ("running_var", "var", "batch_stats"),
                    )
                ]
                index += 1
            index += 1  # ReLU
        index += 1  # MaxPool2d
    for index, layer in ((0, "fc6"), (3, "fc7"), (6, "fc8")):  # Linear, ReLU, Dropout, ...
        tensors += [
            Tensor(f"classifier.{index}.weight", layer, "kernel", kernel=OIHW),
            Tensor(f"classifier.{index}.bias", layer, "bias"),
        ]
    return tensors


def keras_layer_names(model: VGG) -> dict[str, str]:
    """Maps our layer names to ``keras.applications.VGG16/VGG19`` names (block{b}_conv{i}, fc1, fc2, predictions)."""
    names = {f"conv{n}": "block{}_conv{}".format(*n.split("_")) for n in _conv_names(model)}
    return names | {"fc6": "fc1", "fc7": "fc2", "fc8": "predictions"}


def keras_layout(model: VGG) -> list[Tensor]:
    return [
        Tensor(f"{theirs}/{leaf}", ours, leaf, kernel=HWIO if leaf == "kernel" else None)
        for ours, theirs in keras_layer_names(model).items()
        for leaf in ("kernel", "bias")
    ]


def caffe_layout(model: VGG) -> list[Tensor]:
    layers = [f"conv{n}" for n in _conv_names(model)] + ["fc6", "fc7", "fc8"]
    return [
        Tensor(f"{layer}/{blob}", layer, leaf, kernel=OIHW if leaf == "kernel" else None)
        for layer in layers
        for blob, leaf in (("W", "kernel"), ("b", "bias"))
    ]


LAYOUTS: dict[str, Callable[[VGG], list[Tensor]]] = {
    "torchvision": torchvision_layout,
    "keras": keras_layout,
    "caffe": caffe_layout,
}


def registry_name(stages: models.Stages, batch_norm: bool, lrn: bool = False) -> str | None:
    """The ``models.MODELS`` name with these stages, BN and LRN, if any."""
    for name, factory in models.MODELS.items():
        m = factory()
        if (m.stages, m.batch_norm, m.lrn) == (tuple(map(tuple, stages)), batch_norm, lrn):
            return name
    return None


def describe_model(model: VGG) -> str:
    name = registry_name(model.stages, model.batch_norm, model.lrn) or "this VGG"
    return (
        f"{name} (width {model.width}, fc_width {model.fc_width}, crop_size {model.crop_size}, "
        f"{model.num_classes} classes)"
    )


def layout_tensors(model: VGG, layout: str) -> list[Tensor]:
    """The tensors of ``model`` in ``layout``; UserError for a layout or model it does not have."""
    if layout not in LAYOUTS:
        raise UserError(f"Unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}.")
    if model.lrn:
        raise UserError(f"{layout} has no VGG with LRN (A-LRN): use vgg11 for its weights.")
    if model.batch_norm and layout != "torchvision":
        raise UserError(f"{layout} VGGs have no batch norm: use a model without '_bn'.")
    return LAYOUTS[layout](model)


def guess_torchvision_model(tensors: Mapping[str, Any]) -> str:
    """Names the torchvision architecture of a state dict from its conv indices and kernel sizes."""
    convs = sorted(
        (int(k.split(".")[1]), np.shape(v)[-1])
        for k, v in tensors.items()
        if re.fullmatch(r"features\.\d+\.weight", k) and np.ndim(v) == 4
    )
    batch_norm = any(k.endswith(".running_mean") for k in tensors)
    stages: list[list[int]] = []
    previous = None
    for index, kernel in convs:
        if previous is None or index - previous > (3 if batch_norm else 2):  # a MaxPool in between
            stages.append([])
        stages[-1].append(kernel)
        previous = index
    described = "kernel sizes per block " + str([tuple(s) for s in stages]) + (" with batch norm" if batch_norm else "")
    name = registry_name(stages, batch_norm)
    return f"{name} ({described})" if name else f"a VGG with {described}"


def import_tensors(tensors: Mapping[str, Any], model: VGG, layout: str) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` for ``model`` from a flat dict of tensors in ``layout``.

    Raises UserError naming the first tensor that is missing, has another shape than ``model``
    needs, or is not used by ``model``.
    """
    spec = layout_tensors(model, layout)
    shapes = models.variable_shapes(model)
    hint = f" The file looks like {guess_torchvision_model(tensors)}." if layout == "torchvision" else ""
    fix = " Convert with the file's architecture (--model, --width, --fc_width, --crop_size)."
    for t in spec:
        expected = t.foreign_shape(tuple(shapes[t.collection][t.layer][t.leaf].shape))
        if t.key not in tensors:
            raise UserError(
                f"The {layout} file has no tensor {t.key!r} ({t.layer}/{t.leaf}, expected shape "
                f"{expected}) that {describe_model(model)} needs.{hint}{fix}"
            )
        found = tuple(np.shape(tensors[t.key]))
        if found != expected:
            raise UserError(
                f"Tensor {t.key!r} ({t.layer}/{t.leaf}) has shape {found} in the {layout} file but "
                f"{describe_model(model)} expects {expected}.{hint}{fix}"
            )
    used = {t.key for t in spec}
    extra = sorted(k for k in tensors if k not in used and not IGNORED.fullmatch(k))
    if extra:
        raise UserError(
            f"The {layout} file has tensor {extra[0]!r} (shape {tuple(np.shape(tensors[extra[0]]))}) "
            f"that {describe_model(model)} does not use.{hint}{fix}"
        )
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for t in spec:
        ours = tuple(shapes[t.collection][t.layer][t.leaf].shape)
        value = t.to_ours(np.asarray(tensors[t.key], np.float32), ours)
        variables[t.collection].setdefault(t.layer, {})[t.leaf] = np.ascontiguousarray(value)
    return variables


def bgr_to_rgb(params: Mapping[str, Any]) -> dict[str, Any]:
    """Params of a BGR-input network made to take RGB: conv1_1's input-channel axis reversed."""
    conv = params["conv1_1"]
    return {**params, "conv1_1": {**conv, "kernel": np.ascontiguousarray(np.asarray(conv["kernel"])[:, :, ::-1, :])}}


def from_torchvision(state_dict: Mapping[str, Any], model: VGG) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` from a torchvision VGG state dict (arrays or torch tensors)."""
    return import_tensors({k: _numpy(v) for k, v in state_dict.items()}, model, "torchvision")


def keras_tensors(keras_model: Any) -> dict[str, np.ndarray]:
    """A live Keras model's weights as ``{'<layer>/kernel', '<layer>/bias'}``."""
    return {
        f"{layer.name}/{leaf}": np.asarray(w)
        for layer in keras_model.layers
        for leaf, w in zip(("kernel", "bias"), layer.get_weights())
    }


def from_keras(keras_model: Any, model: VGG) -> dict[str, Any]:
    """Params for ``model`` from a live Keras VGG16/VGG19 (``include_top=True``), input order kept (BGR for
    the ImageNet weights). Raises UserError naming the first tensor that does not fit."""
    return import_tensors(keras_tensors(keras_model), model, "keras")["params"]


# ---------------------------------------------------------------------------------------------
# Reading files


def _numpy(value: Any) -> np.ndarray:
    """A torch tensor or array as numpy (floating point as float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def _file(path: str | os.PathLike) -> io.BytesIO:
    """A weights file's bytes (local or gs://), for readers that take a file object."""
    return io.BytesIO(storage.path(path).read_bytes())


def read_torch(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch state dict from ``.pth`` (``torch.load(weights_only=True)``: code in the pickle is refused)."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"Reading {path} needs torch (pip install torch), or convert it to .safetensors.") from err
    try:
        state = torch.load(_file(path), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        found = re.search(r"WeightsUnpickler error: (.*?\.)(?:\s|$)", str(err))
        reason = found.group(1) if found else str(err).strip().splitlines()[-1]
        raise UserError(
            f"Refused to load {path}: it is not a plain tensor state dict, and unpickling it could run code, "
            f"so it was not loaded (torch.load(weights_only=True): {reason}). If you trust the file, save its "
            "model.state_dict() (or a safetensors file) where you can vet it, and convert that."
        ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors: save model.state_dict().")
    return {k: _numpy(v) for k, v in state.items()}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(storage.path(path).read_bytes())


def read_keras_h5(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Keras weights from HDF5: Keras 3 ``.weights.h5``, or the legacy layout of the released
    ``vgg16_weights_tf_dim_ordering_tf_kernels.h5`` and of ``model.save('x.h5')``."""
    import h5py

    def text(s: Any) -> str:
        return s.decode() if isinstance(s, bytes) else str(s)

    layers: dict[str, list[np.ndarray]] = {}
    with h5py.File(_file(path), "r") as f:
        if "layers" in f:  # Keras 3: layers/<key>/vars/<i>, the layer name in vars' attrs
            for group in f["layers"].values():
                if "vars" in group and len(group["vars"]):
                    layers[text(group["vars"].attrs["name"])] = [
                        group["vars"][str(i)][()] for i in range(len(group["vars"]))
                    ]
        else:
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise UserError(f"{path} is not a Keras weights file (no 'layers' group or 'layer_names' attribute).")
            for name in map(text, root.attrs["layer_names"]):
                layers[name] = [root[name][text(w)][()] for w in root[name].attrs["weight_names"]]
    return {f"{layer}/{leaf}": w for layer, ws in layers.items() for leaf, w in zip(("kernel", "bias"), ws)}


def read_h5_datasets(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every dataset of an HDF5 file by its path (``conv1_1/W``)."""
    import h5py

    out: dict[str, np.ndarray] = {}
    with h5py.File(_file(path), "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    with np.load(_file(path), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def read_tensors(path: str | os.PathLike, layout: str) -> dict[str, np.ndarray]:
    """The flat tensor dict of a weights file in ``layout`` (local or gs://), by its suffix."""
    suffix = storage.path(path).suffix.lower()
    readers: dict[str, dict[str, Callable[[Any], dict[str, np.ndarray]]]] = {
        "torchvision": {".pth": read_torch, ".pt": read_torch, ".bin": read_torch, ".safetensors": read_safetensors},
        "keras": {".h5": read_keras_h5, ".hdf5": read_keras_h5},
        "caffe": {".npz": read_npz, ".h5": read_h5_datasets, ".hdf5": read_h5_datasets},
    }
    if layout not in readers:
        raise UserError(f"Unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}.")
    if suffix not in readers[layout]:
        raise UserError(f"Cannot read {path} as {layout} weights: expected one of {', '.join(readers[layout])}.")
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"No such weights file: {path}")
    return readers[layout][suffix](path)


# ---------------------------------------------------------------------------------------------
# Export and preprocessing


def to_torchvision(variables: Mapping[str, Any], model: VGG) -> dict[str, np.ndarray]:
    """A torchvision-layout state dict (float32 numpy) of ``variables`` (``load_state_dict``-ready)."""
    expected = models.variable_shapes(model)
    stored = {k: variables.get(k) or {} for k in expected}
    checkpoints.check_compatible(expected, stored, "to export")
    return {
        t.key: np.ascontiguousarray(t.to_foreign(np.asarray(stored[t.collection][t.layer][t.leaf], np.float32)))
        for t in layout_tensors(model, "torchvision")
    }


def save_torchvision_safetensors(path: str | os.PathLike, variables: Mapping[str, Any], model: VGG) -> None:
    """Writes ``to_torchvision(variables, model)`` as safetensors (``safetensors.torch.load_file`` reads it)."""
    from safetensors.numpy import save

    storage.path(path).write_bytes(save(to_torchvision(variables, model)))


def checkpoint_meta(name: str, model: VGG, layout: str, class_names: list[str] | None) -> dict[str, Any]:
    """The ``meta`` of a converted checkpoint: model and data config, class names, input convention, layout."""
    convention = preprocessing.PRESETS[LAYOUT_CONVENTION[layout]]
    return {
        "config": {
            "model": {
                "name": models.canonical_name(name),
                "width": model.width,
                "fc_width": model.fc_width,
                "num_classes": model.num_classes,
            },
            "data": {"crop_size": model.crop_size, **convention.data_fields()},
        },
        "class_names": class_names,
        "preprocessing": convention.to_meta(),
        "layout": layout,
    }


def convert_file(path: str | os.PathLike, layout: str, name: str, **model_options: Any) -> tuple[VGG, dict[str, Any]]:
    """Reads a weights file and returns ``(model, variables)``; BGR networks are flipped to take RGB.

    The class count is the file's (its fc8); ``model_options`` are ``get_model`` options (width, ...).
    """
    tensors = read_tensors(path, layout)
    fc8_bias = FC8_BIAS[layout]
    num_classes = int(np.shape(tensors[fc8_bias])[0]) if fc8_bias in tensors else 1000
    model = models.get_model(name, num_classes=num_classes, **model_options)
    variables = import_tensors(tensors, model, layout)
    if layout in BGR_LAYOUTS:
        variables["params"] = bgr_to_rgb(variables["params"])
    return model, variables


def export(checkpoint: str, output: str) -> str:
    """Writes a vgg_jax checkpoint's weights as a torchvision-layout safetensors file."""
    model, variables, _ = checkpoints.restore_model(checkpoint)
    save_torchvision_safetensors(output, variables, model)
    return f"Wrote {output}: torchvision layout of {describe_model(model)}."


def convert(
    weights: str, output: str, layout: str, name: str, class_names_file: str | None = None, **model_options: Any
) -> str:
    """Converts a weights file in ``layout`` into a vgg_jax checkpoint directory ``output``."""
    out = storage.path(output)
    if out.exists():
        raise UserError(f"{output} already exists: choose a new checkpoint directory.")
    model, variables = convert_file(weights, layout, name, **model_options)
    class_names = None
    if class_names_file:
        names = storage.path(class_names_file).read_text()
        class_names = [line.strip() for line in names.splitlines() if line.strip()]
        if len(class_names) != model.num_classes:
            raise UserError(
                f"{class_names_file} lists {len(class_names)} names but fc8 has {model.num_classes} classes."
            )
    checkpoints.save_variables(out, variables, checkpoint_meta(name, model, layout, class_names))
    return f"Wrote {output}: {models.canonical_name(name)}, {model.num_classes} classes, from {layout} (RGB input)."


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_enum("layout", None, list(LAYOUTS), "Layout of the input weights file.", flag_values=values)
    flags.DEFINE_enum(
        "to", "checkpoint", ["checkpoint", "torchvision-safetensors"], "What to write.", flag_values=values
    )
    flags.DEFINE_string("model", "vgg16", "vgg11 ... vgg19_bn, or the paper's letters.", flag_values=values)
    flags.DEFINE_integer("width", 64, "Channels of block 1 (64: the published nets).", flag_values=values)
    flags.DEFINE_integer("fc_width", 4096, "Channels of fc6 and fc7.", flag_values=values)
    flags.DEFINE_integer("crop_size", 224, "The network's crop size.", flag_values=values)
    flags.DEFINE_string(
        "class_names", None, "Text file with one class name per line, in fc8's order.", flag_values=values
    )


def main(argv: Sequence[str] | None = None) -> str:
    """``python -m vgg_jax.convert --layout=torchvision --model=vgg16 WEIGHTS CKPT_DIR``, or
    ``--to=torchvision-safetensors CKPT OUT.safetensors``."""
    values, rest = cli.parse(argv, define_flags, "python -m vgg_jax.convert", main.__doc__)
    if len(rest) != 2:
        cli.fail(f"give two arguments, INPUT and OUTPUT; got {rest}.")
    if values.to == "torchvision-safetensors":
        if values.layout:
            raise UserError("--to=torchvision-safetensors exports a vgg_jax checkpoint: drop --layout.")
        message = export(*rest)
    else:
        if not values.layout:
            raise UserError(f"--layout is required to convert a weights file: one of {', '.join(LAYOUTS)}.")
        message = convert(
            *rest,
            values.layout,
            values.model,
            values.class_names,
            width=values.width,
            fc_width=values.fc_width,
            crop_size=values.crop_size,
        )
    print(message)
    return message


if __name__ == "__main__":
    cli.run(main)
