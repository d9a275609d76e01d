"""Transfer learning: ``--config=configs/transfer.py:MODEL,CONVENTION[,CROP] --config.init_from=CKPT``.

Converted or trained VGG weights, a new fc8, your image folder; docs/backbone.md#transfer-learning
"""

from __future__ import annotations

import ml_collections

from configs import default
from vgg_jax import preprocessing


def get_config(arg: str = "vgg16,torchvision") -> ml_collections.ConfigDict:
    """MODEL: the checkpoint's network (vgg16, D, ...). CONVENTION: the input convention its weights
    were trained with, one of ``vgg_jax.preprocessing.PRESETS`` (torchvision; caffe for Keras and Caffe
    weights and for runs of this project). CROP: its crop size (default 224)."""
    parts = arg.split(",")
    if (
        len(parts) not in (2, 3)
        or parts[1] not in preprocessing.PRESETS
        or (len(parts) == 3 and not parts[2].isdigit())
    ):
        raise ValueError(
            f"configs/transfer.py takes MODEL,CONVENTION[,CROP] with CONVENTION in {sorted(preprocessing.PRESETS)}, "
            f"e.g. configs/transfer.py:vgg16,torchvision; got {arg!r}."
        )
    name, convention = parts[0], preprocessing.PRESETS[parts[1]]
    crop = int(parts[2]) if len(parts) == 3 else 224

    config = default.get_config()
    config.reset_head = True  # a fresh fc8 for the folder's classes; set --config.init_from=CKPT
    config.model.name = name
    config.data.crop_size = crop
    config.data.update(convention.data_fields())

    config.data.dataset = "folder"  # set --config.data.folder=<root>
    # Fixed training scale S = crop * 8 / 7 (256 for 224 crops), random crop, flip, PCA colour shift.
    scale = crop * 8 // 7
    config.data.scale_min = config.data.scale_max = scale
    config.data.eval_scales = (scale,)
    config.data.shuffle_buffer = 2048

    config.optimizer.trainable = "fc[678]"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 100
    config.global_batch_size = 64
    config.num_train_steps = 3_000
    config.eval_batch_size = 64
    config.eval_every_steps = 500
    config.checkpoint.every_steps = 500
    config.log_every_steps = 50
    return config
