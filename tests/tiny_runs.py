"""Helpers shared by the tests: overrides for a tiny but complete training run on the built-in
data (the real demo data through the paper's whole transform at reduced sizes: a run takes
seconds), a random "converted" checkpoint, and a free loopback port for multi-process runs.
"""

import os
import socket

TINY = [
    "--config=configs/demo.py",
    "--config.model.width=4",
    "--config.model.fc_width=16",
    "--config.model.dropout_rate=0.5",  # the paper's, which the demo leaves out: runs exercise the dropout key
    "--config.data.crop_size=32",
    "--config.data.scale_min=36",
    "--config.data.scale_max=64",
    "--config.data.eval_scales=(36,)",
    "--config.data.eval_split=validation[:40]",
    "--config.data.shuffle_buffer=256",
    "--config.global_batch_size=8",
    "--config.eval_batch_size=16",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.learning_rate=0.02",
    "--config.log_every_steps=2",
]

# The session's tiny trained run (tests/conftest.py): TINY for 6 steps on 2 CPU devices; the tests
# load it on their process's single device.
TRAINING_DEVICES = 2
TINY_TRAINING = [
    *TINY,
    "--config.num_train_steps=6",
    "--config.eval_every_steps=6",
    "--config.checkpoint.every_steps=6",
]


def save_random_converted(path, name: str, **model_options):
    """A reduced-size model with He-scaled random weights, saved like a torchvision conversion.

    Returns ``(model, params)``; the checkpoint at ``path`` is what ``vgg_jax.convert`` writes.
    """
    import jax
    import numpy as np

    from vgg_jax import checkpoints, convert, models

    model = models.get_model(name, **model_options)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(
            size=s.shape, scale=np.sqrt(2 / np.prod(s.shape[:-1])) if len(s.shape) == 4 else 0.05
        ).astype(np.float32),
        models.variable_shapes(model)["params"],
    )
    checkpoints.save_variables(path, {"params": params}, convert.checkpoint_meta(name, model, "torchvision", None))
    return model, params


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the coordinator of a multi-process test run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a command as a user runs it: without the settings the test session adds
    (JAX_PLATFORMS=cpu, XLA_FLAGS, VGG_JAX_VERBOSE; tests/conftest.py), plus ``extra``."""
    dropped = ("JAX_PLATFORMS", "XLA_FLAGS", "VGG_JAX_VERBOSE")
    return {k: v for k, v in os.environ.items() if k not in dropped} | extra
