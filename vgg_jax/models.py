"""The VGG networks of Simonyan & Zisserman (ICLR 2015), Table 1, as Flax linen modules.

docs/models.md
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# Kernel sizes of the convolutions of each of the five blocks (paper Table 1).
Stages = tuple[tuple[int, ...], ...]
STAGES: dict[str, Stages] = {
    "A": ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    "B": ((3, 3),) * 5,
    "C": ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)),
    "D": ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    "E": ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)),
}

# Five 2x2 max-pools: the step, in input pixels, of the pool5 map and of the dense score map.
STRIDE = 32

# AlexNet LRN parameters (Krizhevsky et al. 2012), used by A-LRN: k, n, alpha, beta.
LRN_BIAS, LRN_SIZE, LRN_ALPHA, LRN_BETA = 2.0, 5, 1e-4, 0.75

# "The first four convolutional layers and the last three fully-connected layers" of net A
# (paper Sect. 3.1), by the names that exist in every deeper configuration.
STAGED_INIT_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")

# Rematerialisation of the convolutional blocks (``VGG.remat``): which of a block's activations the
# backward pass keeps; the rest it recomputes from the block's input, inside that block's backward.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,  # no recomputation: conv and ReLU outputs (and BN, LRN) are all kept
    "convs": jax.checkpoint_policies.save_only_these_names("conv_output"),  # ReLU/BN/LRN recomputed
    "blocks": jax.checkpoint_policies.nothing_saveable,  # only the pool outputs kept
}


def local_response_norm(
    x: jax.Array,
    size: int = LRN_SIZE,
    bias: float = LRN_BIAS,
    alpha: float = LRN_ALPHA,
    beta: float = LRN_BETA,
) -> jax.Array:
    """Cross-channel LRN of Krizhevsky et al.: ``x / (k + alpha * sum_{n neighbours} x^2) ** beta``.

    ``alpha`` is not divided by ``size`` (the AlexNet paper's and TensorFlow's convention; Caffe and
    torch divide it). Channels are the last axis; windows are clipped at the channel ends.
    """
    channels = np.arange(x.shape[-1])
    # The window sums as one matmul with a 0/1 band matrix: a GEMM is cheaper, forward and backward,
    # than shifted slices (docs/performance.md).
    band = jnp.asarray(np.abs(channels[:, None] - channels[None, :]) <= size // 2, jnp.float32)
    squared = jnp.square(x.astype(jnp.float32))
    window_sum = jnp.matmul(squared, band, precision=jax.lax.Precision.HIGHEST)
    return (x / jnp.power(bias + alpha * window_sum, beta)).astype(x.dtype)


def kernel_initializer(scheme: str, std: float) -> Callable[..., jax.Array]:
    """Weight initialiser: ``paper`` is N(0, std^2) (paper Sect. 3.1), ``glorot`` is Glorot uniform."""
    if scheme == "paper":
        return nn.initializers.normal(stddev=std)
    if scheme == "glorot":
        return nn.initializers.glorot_uniform()
    if scheme == "he":
        return nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    raise ValueError(f"Unknown init scheme {scheme!r}: use 'paper', 'glorot' or 'he'.")


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 on NHWC, as ``nn.max_pool(x, (2, 2), strides=(2, 2))``.

    Odd sides drop their last row/column (VALID). Written as a reshape and a max, whose gradient is
    elementwise (tied maxima share it); XLA:CPU runs that far faster than the select-and-scatter
    gradient of ``reduce_window`` (docs/performance.md).
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def fc_as_matmul(lhs: jax.Array, rhs: jax.Array, window_strides, padding, *args: Any, **kwargs: Any) -> jax.Array:
    """``lax.conv_general_dilated`` for the FC layers (NHWC, HWIO, stride 1, VALID), as a matrix
    product where the window is 1x1 (fc7, fc8) or covers the whole input (fc6 on a crop-size image).

    Same values as the convolution; XLA:CPU runs these products several times faster than the
    equivalent convolutions and their gradients (docs/performance.md). Other inputs (dense
    evaluation of fc6 on a larger image) go to the convolution.
    """
    window, features = rhs.shape[:2], rhs.shape[-1]
    precision = kwargs.get("precision")
    if window == (1, 1):
        return jnp.dot(lhs, rhs.reshape(-1, features), precision=precision)
    if lhs.shape[1:3] == window:
        y = jnp.dot(lhs.reshape(lhs.shape[0], -1), rhs.reshape(-1, features), precision=precision)
        return y.reshape(lhs.shape[0], 1, 1, features)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, *args, **kwargs)


class VGG(nn.Module):
    """A VGG network (paper Table 1).

    Attributes:
      stages: kernel sizes of the convolutions of each block (see ``STAGES``).
      num_classes: size of fc8.
      width: channels of block 1; block b has ``min(width * 2**(b-1), 8 * width)`` (64 -> 512).
      fc_width: channels of fc6 and fc7 (4096 in the paper).
      crop_size: training crop side; fc6's window is ``crop_size // 32``.
      dropout_rate: dropout after fc6 and fc7, applied only when ``train=True``.
      lrn: local response normalisation after relu1_1 (configuration A-LRN).
      batch_norm: conv -> BN -> ReLU, as torchvision's ``vgg*_bn``.
      dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
      init_scheme: ``paper`` (normal, ``init_std``, zero biases), ``glorot`` or ``he``.
      init_std: standard deviation of the ``paper`` scheme. The paper says "10^-2 variance";
        Caffe-era code used std 0.01, which is the default here.
      remat: what the backward pass keeps of each convolutional block (``REMAT_POLICIES``):
        ``none``; ``convs``: the convolution outputs, ReLUs (and BN, LRN) recomputed, about half
        the activation memory for elementwise work; ``blocks``: the block's input only, its
        forward pass recomputed in its backward pass (one more forward pass in all). Same numbers.
    """

    stages: Stages
    num_classes: int = 1000
    width: int = 64
    fc_width: int = 4096
    crop_size: int = 224
    dropout_rate: float = 0.5
    lrn: bool = False
    batch_norm: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_scheme: str = "paper"
    init_std: float = 0.01
    remat: str = "none"

    @property
    def fc6_window(self) -> int:
        """Side of fc6's convolution window: the pool5 map of a crop-size image."""
        if self.crop_size % STRIDE:
            raise ValueError(f"crop_size must be a multiple of {STRIDE} (five 2x2 pools), got {self.crop_size}.")
        return self.crop_size // STRIDE

    def block_features(self, block: int) -> int:
        """Channels of block ``block``'s convolutions (1-5): ``width`` doubling up to ``8 * width``."""
        return min(self.width * 2 ** (block - 1), 8 * self.width)

    def _tap(self, name: str, x: jax.Array) -> jax.Array:
        """Exposes an activation under its community name (see ``extract_features``)."""
        # One dict-valued variable: sowing under the layer name itself would clash with the submodule.
        self.sow("intermediates", "features", {name: x}, init_fn=dict, reduce_fn=lambda d, new: d | new)
        return x

    def _layer(self, features: int, kernel_size: tuple[int, int], **kwargs: Any) -> nn.Conv:
        """A convolution (or FC layer stored as one) with the model's initialisation and dtypes."""
        return nn.Conv(
            features,
            kernel_size,
            kernel_init=kernel_initializer(self.init_scheme, self.init_std),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **kwargs,
        )

    def _conv_block(self, x: jax.Array, block: int, train: bool) -> jax.Array:
        """Block ``block`` (1-5): its convolutions (BN, LRN), ReLUs and the 2x2 max pool."""
        features = self.block_features(block)
        for i, k in enumerate(self.stages[block - 1], start=1):
            name = f"{block}_{i}"
            x = self._layer(features, (k, k), padding="SAME", name=f"conv{name}")(x)
            x = self._tap(f"conv{name}", checkpoint_name(x, "conv_output"))
            if self.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=0.9,
                    epsilon=1e-5,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"bn{name}",
                )(x)
            x = self._tap(f"relu{name}", nn.relu(x))
            if self.lrn and block == 1 and i == 1:
                x = self._tap("lrn1", local_response_norm(x))
        return max_pool_2x2(x)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, dense: bool = False) -> jax.Array:
        """Classifies NHWC images.

        Args:
          x: images (N, H, W, 3). With ``dense=False`` H and W must be ``crop_size``.
          train: enables dropout (needs a ``dropout`` rng) and batch-norm statistics updates.
          dense: return the class score map (N, h, w, num_classes) of the fully convolutional net.

        Returns:
          float32 logits (N, num_classes), or the score map when ``dense=True``.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"Expected NHWC RGB images (N, H, W, 3), got shape {x.shape}.")
        window = self.fc6_window
        if not dense and x.shape[1:3] != (self.crop_size, self.crop_size):
            raise ValueError(
                f"Input is {x.shape[1]}x{x.shape[2]} but the model classifies {self.crop_size}x"
                f"{self.crop_size} crops: crop the images, or pass dense=True for the score map."
            )
        if min(x.shape[1:3]) < self.crop_size:
            raise ValueError(f"Dense evaluation needs sides >= crop_size {self.crop_size}, got {x.shape[1:3]}.")

        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Unknown remat {self.remat!r}: use one of {', '.join(REMAT_POLICIES)}.")
        conv_block = VGG._conv_block
        if self.remat != "none":  # one checkpoint per block; block and train are Python values
            conv_block = nn.remat(conv_block, static_argnums=(2, 3), policy=REMAT_POLICIES[self.remat])
        x = x.astype(self.dtype)
        for block in range(1, len(self.stages) + 1):
            x = conv_block(self, x, block, train)
            x = self._tap(f"pool{block}", x)

        # Fully connected layers as convolutions (paper Sect. 3.2, dense evaluation).
        fc = functools.partial(self._layer, padding="VALID", conv_general_dilated=fc_as_matmul)
        x = self._tap("fc6", fc(self.fc_width, (window, window), name="fc6")(x))
        x = self._tap("relu6", nn.relu(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = self._tap("fc7", fc(self.fc_width, (1, 1), name="fc7")(x))
        x = self._tap("relu7", nn.relu(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = fc(self.num_classes, (1, 1), name="fc8")(x).astype(jnp.float32)
        if not dense:
            x = x.reshape(x.shape[0], self.num_classes)
        return self._tap("fc8", x)


# Model registry: community names (torchvision's) and the paper's letters.
MODELS: dict[str, Callable[..., VGG]] = {
    "vgg11": functools.partial(VGG, stages=STAGES["A"]),
    "vgg11_lrn": functools.partial(VGG, stages=STAGES["A"], lrn=True),
    "vgg13": functools.partial(VGG, stages=STAGES["B"]),
    "vgg16_c": functools.partial(VGG, stages=STAGES["C"]),
    "vgg16": functools.partial(VGG, stages=STAGES["D"]),
    "vgg19": functools.partial(VGG, stages=STAGES["E"]),
    "vgg11_bn": functools.partial(VGG, stages=STAGES["A"], batch_norm=True),
    "vgg13_bn": functools.partial(VGG, stages=STAGES["B"], batch_norm=True),
    "vgg16_bn": functools.partial(VGG, stages=STAGES["D"], batch_norm=True),
    "vgg19_bn": functools.partial(VGG, stages=STAGES["E"], batch_norm=True),
}
PAPER_NAMES = {"A": "vgg11", "A-LRN": "vgg11_lrn", "B": "vgg13", "C": "vgg16_c", "D": "vgg16", "E": "vgg19"}
OPTIONS = tuple(f.name for f in dataclasses.fields(VGG) if f.name not in ("parent", "name", "stages"))


def canonical_name(name: str) -> str:
    """Maps a paper letter or community name to the registry name; ValueError lists the valid names."""
    resolved = PAPER_NAMES.get(name, name)
    if resolved not in MODELS:
        valid = ", ".join([*MODELS, *PAPER_NAMES])
        raise ValueError(f"Unknown model {name!r}. Valid names: {valid}.")
    return resolved


def get_model(name: str, *, num_classes: int = 1000, **overrides: Any) -> VGG:
    """Returns the linen module for ``name`` (``vgg16``, ``D``, ``vgg11_lrn``, ``A-LRN``, ...).

    ``overrides`` set any ``VGG`` attribute (width, fc_width, crop_size, dropout_rate, dtype,
    init_scheme, init_std, ...). ``dtype`` also accepts the strings ``'float32'`` and ``'bfloat16'``.
    """
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise ValueError(f"Unknown model option(s) {unknown}. Valid options: {', '.join(OPTIONS)}.")
    if isinstance(overrides.get("dtype"), str):
        overrides["dtype"] = jnp.dtype(overrides["dtype"])
    return MODELS[canonical_name(name)](num_classes=num_classes, **overrides)


def from_config(model_config: Mapping[str, Any], *, num_classes: int, crop_size: int) -> VGG:
    """The model a config's ``model`` section describes: its ``name`` and whichever ``VGG`` options it
    sets (a training run's config sets them all, a converted checkpoint's only its sizes)."""
    options = {k: v for k, v in model_config.items() if k in OPTIONS and k not in ("num_classes", "crop_size")}
    return get_model(model_config["name"], num_classes=num_classes, crop_size=crop_size, **options)


def init_variables(model: VGG, rng: jax.Array, batch_size: int = 1) -> dict[str, Any]:
    """Initialises ``params`` (and ``batch_stats`` for BN models) on a crop-size input."""
    x = jnp.zeros((batch_size, model.crop_size, model.crop_size, 3), jnp.float32)
    return dict(model.init({"params": rng}, x, train=False))


def variable_shapes(model: VGG) -> dict[str, Any]:
    """The variables' shapes and dtypes, computed without allocating them (``jax.eval_shape``)."""
    return jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays or ``ShapeDtypeStruct``s."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def extract_features(
    model: VGG,
    variables: Mapping[str, Any],
    x: jax.Array,
    layers: Iterable[str],
    *,
    dense: bool = True,
) -> dict[str, jax.Array]:
    """Returns the activations named in ``layers`` (e.g. ``relu1_2``, ``relu3_3``, ``pool5``, ``fc7``).

    Names: ``conv{b}_{i}`` (before the non-linearity), ``relu{b}_{i}``, ``lrn1`` (A-LRN),
    ``pool{b}``, ``fc6``/``fc7`` (before ReLU), ``relu6``/``relu7``, ``fc8`` (logits). With the
    default ``dense=True`` any image with sides >= crop_size works and fc layers are maps; under
    ``jax.jit`` the layers after the deepest requested one are not computed.
    """
    layers = list(layers)
    _, state = model.apply(variables, x, train=False, dense=dense, mutable=["intermediates"])
    found = state["intermediates"]["features"]
    missing = [name for name in layers if name not in found]
    if missing:
        raise ValueError(f"Unknown layer(s) {missing} for this model. Available: {', '.join(found)}.")
    return {name: found[name] for name in layers}


def staged_init(
    trained_a: Mapping[str, Any], fresh: Mapping[str, Any], layers: Sequence[str] = STAGED_INIT_LAYERS
) -> tuple[dict[str, Any], list[str]]:
    """Paper Sect. 3.1: initialise a deeper net from trained net A.

    Copies ``layers`` (by default conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8) from
    ``trained_a`` params into a copy of ``fresh`` params. Returns the new params and the copied names.
    Raises ValueError naming the first layer whose shapes differ or that is missing.
    """
    params = dict(fresh)
    for name in layers:
        for tree, which in ((trained_a, "trained A"), (fresh, "target")):
            if name not in tree:
                raise ValueError(f"Staged init: layer {name!r} is missing from the {which} parameters.")
        for leaf in fresh[name]:
            src, dst = trained_a[name][leaf], fresh[name][leaf]
            if src.shape != dst.shape:
                raise ValueError(
                    f"Staged init: {name}/{leaf} has shape {tuple(src.shape)} in trained A but "
                    f"{tuple(dst.shape)} in the target; build both with the same width, fc_width, "
                    "crop_size and num_classes."
                )
        params[name] = jax.tree_util.tree_map(jnp.asarray, dict(trained_a[name]))
    return params, list(layers)


def forward_macs(model: VGG, image_size: int | tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass (convolutions and FC layers), analytically.

    ``image_size`` defaults to the crop size; a larger size counts the dense (fully convolutional)
    pass. At 224 this matches torchvision's published ``_ops`` (e.g. vgg16 15.47 GMACs).
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else (image_size or (model.crop_size,) * 2)
    macs, channels = 0, 3
    for block, kernel_sizes in enumerate(model.stages, start=1):
        features = model.block_features(block)
        for k in kernel_sizes:
            macs += h * w * k * k * channels * features
            channels = features
        h, w = h // 2, w // 2
    window = model.fc6_window
    positions = (h - window + 1) * (w - window + 1)
    macs += positions * window * window * channels * model.fc_width
    macs += positions * model.fc_width * (model.fc_width + model.num_classes)
    return macs


def train_flops_per_image(model: VGG) -> int:
    """Model FLOPs of training on one crop: forward and backward, about 3 forward passes, 2 FLOP per MAC."""
    return 3 * 2 * forward_macs(model)
