"""vgg_jax: a faithful JAX/Flax reproduction of VGG (Simonyan & Zisserman, ICLR 2015).

``vgg_jax.load(path)`` (vgg_jax/classifier.py) loads on first use, so importing the package, or a
config, does not import orbax or TensorFlow.
"""

from typing import Any

from vgg_jax import cli

cli.import_jax()  # before the first `import jax` below: without the CUDA plugin's start-up noise on a CPU machine

from vgg_jax.models import MODELS, PAPER_NAMES, VGG, get_model  # noqa: E402

__all__ = ["MODELS", "PAPER_NAMES", "VGG", "get_model", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from vgg_jax.classifier import load

        return load
    raise AttributeError(f"module 'vgg_jax' has no attribute {name!r}")
