"""Transfer learning: converted or trained VGG weights, a new fc8, your image folder.

``--config=configs/transfer.py:CKPT`` where CKPT is the starting checkpoint: a directory written by
``python -m vgg_jax.convert`` (torchvision, Keras or Caffe weights), or a training workdir / step
directory. Its meta sets the model (name, width, fc_width, crop size) and the input normalisation
(mean_rgb, std_rgb), so the network sees pixels as it was trained on them::

    python -m vgg_jax.convert --source=torchvision --model=vgg16 vgg16-397923af.pth /ckpt/vgg16_tv
    python -m vgg_jax.main --config=configs/transfer.py:/ckpt/vgg16_tv --workdir=runs/pets \\
        --config.data.folder=/data/pets      # /data/pets/{train,val}/<class>/*.jpg

fc8 is replaced by a fresh layer for the folder's class count (``reset_head``). Only fc6, fc7 and
fc8 train (``optimizer.trainable='fc[678]'``); the conv blocks stay frozen. Override with
``--config.optimizer.trainable='.*'`` to fine-tune everything (lower the learning rate) or
``'fc8'`` for a linear classifier on fc7 features. For ``*_bn`` models the frozen blocks' BN
statistics still follow the new data (training runs BN in training mode).
"""

from __future__ import annotations

import ml_collections

from configs import default
from vgg_jax import checkpoints, convert


def get_config(init_from: str = "") -> ml_collections.ConfigDict:
    if not init_from:
        raise ValueError("configs/transfer.py needs the starting checkpoint: --config=configs/transfer.py:CKPT "
                         "(a `python -m vgg_jax.convert` output directory or a training workdir).")
    meta = checkpoints.read_meta(init_from)
    model, data = meta["config"]["model"], meta["config"]["data"]

    config = default.get_config()
    config.init_from = init_from
    config.reset_head = True
    config.model.name = model["name"]
    config.model.width = model["width"]
    config.model.fc_width = model["fc_width"]
    config.data.crop_size = data["crop_size"]
    config.data.mean_rgb, config.data.std_rgb = convert.data_normalization(convert.checkpoint_preprocessing(meta))
    if data.get("stats_path"):  # a training run whose mean came from `python -m vgg_jax.data.stats`
        config.data.stats_path = data["stats_path"]

    config.data.dataset = "folder"  # set --config.data.folder=<root>
    # Fixed training scale S = crop * 8 / 7 (256 for 224 crops), random crop, flip, PCA colour shift.
    scale = data["crop_size"] * 8 // 7
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
