"""vgg_jax: a faithful JAX/Flax reproduction of VGG (Simonyan & Zisserman, ICLR 2015)."""

from vgg_jax.load import load
from vgg_jax.models import MODELS, PAPER_NAMES, VGG, get_model

__all__ = ["MODELS", "PAPER_NAMES", "VGG", "get_model", "load"]
