"""The paper's ImageNet runs (Table 3): ``--config=configs/paper.py:NET,SCALE[,PLATFORM]``.

NET: A, A-LRN, B, C, D, E; SCALE: 256, 384 or 256-512 (jittered); PLATFORM: cpu (float32), gpu or
tpu (bfloat16 compute). The chain of runs (init_from, staged_init_from): docs/reproduction.md
"""

from __future__ import annotations

import ml_collections

from configs import default
from vgg_jax.models import canonical_name

# Test scale Q of the in-training (centre-crop) evaluation, as in Table 3: Q = S, 384 for jittered.
EVAL_SCALE = {"256": 256, "384": 384, "256-512": 384}


def get_config(arg: str = "D,256") -> ml_collections.ConfigDict:
    parts = arg.split(",")
    if (
        len(parts) not in (2, 3)
        or parts[1] not in EVAL_SCALE
        or (len(parts) == 3 and parts[2] not in ("cpu", "gpu", "tpu"))
    ):
        raise ValueError(
            f"configs/paper.py takes NET,SCALE[,PLATFORM] with SCALE in {list(EVAL_SCALE)} and "
            f"PLATFORM in cpu, gpu, tpu; got {arg!r}."
        )
    net, scale, platform = parts[0], parts[1], parts[2] if len(parts) == 3 else "cpu"
    config = default.get_config()
    config.model.name = canonical_name(net)
    config.model.init_scheme = "paper" if config.model.name.startswith("vgg11") else "glorot"
    config.data.dataset = "imagenet2012"
    lo, hi = (int(s) for s in scale.split("-")) if "-" in scale else (int(scale), int(scale))
    config.data.scale_min, config.data.scale_max = lo, hi
    config.data.eval_scales = (EVAL_SCALE[scale],)
    if scale != "256":
        config.optimizer.learning_rate = 1e-3  # fine-tuned from the previous scale (set init_from)
    if platform != "cpu":
        config.model.dtype = "bfloat16"
    # 1,281,167 images / 256 = 5,004 steps per epoch: evaluate and checkpoint once an epoch.
    config.eval_every_steps = 5_004
    config.checkpoint.every_steps = 5_004
    return config
