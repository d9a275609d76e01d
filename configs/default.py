"""Default config: the paper's training recipe (Sect. 3.1) for configuration D at S = 256.

Every field the code reads is here, with its meaning; docs/training.md
"""

from __future__ import annotations

import ml_collections

from vgg_jax.data.config import default_data_config
from vgg_jax.sharding import default_distributed_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Model (vgg_jax.models.get_model). name: vgg11, vgg11_lrn, vgg13, vgg16_c, vgg16, vgg19, the
    # *_bn variants, or the paper's letters A, A-LRN, B, C, D, E.
    config.model = ml_collections.ConfigDict()
    config.model.name = "vgg16"
    config.model.width = 64  # channels of block 1 (64 in the paper); blocks double up to 8x
    config.model.fc_width = 4096  # fc6 / fc7 channels
    config.model.dropout_rate = 0.5  # on fc6 and fc7, training only
    config.model.dtype = "float32"  # computation dtype: float32 or bfloat16 (parameters stay float32)
    # paper: N(0, init_std^2), zero biases ("10^-2 variance" in the paper; Caffe used std 0.01);
    # glorot: Glorot & Bengio (2010) uniform, which the paper notes trains without pre-training; he.
    config.model.init_scheme = "paper"
    config.model.init_std = 0.01
    # What the backward pass keeps of each conv block (jax.checkpoint per block; same numbers):
    # none; convs (conv outputs, ReLU/BN/LRN recomputed: elementwise work); blocks (the pool
    # outputs, each block's forward recomputed: one more forward pass). Memory: docs/performance.md.
    config.model.remat = "none"

    # Input pipeline (vgg_jax/data/config.py documents every field). crop_size is the model's too.
    config.data = default_data_config()

    config.seed = 0
    config.global_batch_size = 256  # whatever the device and host count
    # Micro-batches per step: the gradient of the global batch is accumulated over this many parts
    # when a device cannot hold its whole share.
    config.grad_accum_steps = 1
    config.num_train_steps = 370_000  # the paper stopped after 370K iterations (74 epochs)

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-2
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.weight_decay = 5e-4  # L2 penalty, added to the gradient before momentum
    config.optimizer.decay_biases = False  # Caffe's VGG release: decay_mult 0 on biases (and BN here)
    # plateau (paper): lr x decay_factor when validation top-1 stops improving for `patience`
    # evaluations (by more than min_delta), at most max_decreases times. step: at step_boundaries.
    # cosine: warmup_steps linear warm-up then cosine to 0. constant.
    config.optimizer.schedule = "plateau"
    config.optimizer.decay_factor = 0.1
    config.optimizer.patience = 1
    config.optimizer.min_delta = 0.0
    config.optimizer.max_decreases = 3
    config.optimizer.step_boundaries = (185_000, 277_500, 333_000)
    config.optimizer.warmup_steps = 0  # linear warm-up from 0 over these steps (step and cosine schedules)
    # The linear scaling rule (Goyal et al. 2017; timm's --lr-base-size): 0 uses learning_rate as given; N > 0
    # takes learning_rate as chosen for a global batch of N and trains at learning_rate x global_batch_size / N
    # (e.g. 256, the paper's batch, when a pod's batch_per_chip makes the global batch larger). Pair it with a
    # warm-up (warmup_steps, schedule step or cosine), as Goyal et al. do.
    config.optimizer.lr_base_batch = 0
    # Regex on top-level layer names (conv1_1 ... fc8) of the layers to train; the rest are frozen.
    config.optimizer.trainable = ".*"

    # Initialisation from another run (paper: S=384 from S=256 at lr 1e-3, jittered from S=384):
    # a workdir, checkpoints dir or step dir whose params (and BN statistics) start this run.
    config.init_from = ""
    # Staged initialisation (paper Sect. 3.1): a trained configuration-A run whose conv1_1, conv2_1,
    # conv3_1, conv3_2, fc6, fc7, fc8 initialise this deeper model.
    config.staged_init_from = ""
    # With init_from: replace fc8 by a fresh layer when the class count differs (transfer learning).
    config.reset_head = False
    # Resuming checks this config against the checkpoint's: fields that change what is trained (model,
    # data transform, momentum, weight decay, seed, batch, ...) are refused unless listed here,
    # comma-separated (e.g. 'optimizer.momentum,model.dropout_rate'); docs/training.md#resuming.
    config.allow_resume_changes = ""

    # Evaluation during training: the cheap protocol, at data.eval_scales.
    config.eval_protocol = "center"
    config.eval_batch_size = 256
    config.eval_every_steps = 5_000

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 5_000
    config.checkpoint.keep = 3  # newest N
    config.checkpoint.keep_best = 1  # plus the best N by validation top-1
    config.checkpoint.async_save = True
    # A step without checksum files is damaged or foreign (vgg_jax writes them for every step): refused unless
    # allowed here (resume, init_from, staged_init_from). docs/training.md#checkpoints
    config.checkpoint.allow_unverified = False
    # When every checkpoint of the workdir is damaged, start afresh (setting them aside) instead of stopping.
    config.checkpoint.fresh_start_if_damaged = False
    # Resume from this intact checkpoint step instead of the newest (0: the newest). The newer steps are set
    # aside as <step>.superseded (never deleted); a rerun with the same flag then goes on from the newest.
    config.resume_from_step = 0

    # Rollback on divergence (docs/training.md#rollback): a non-finite loss or gradient, or a loss spike (the
    # loss above spike_factor x the median of the last spike_window steps' losses, and above spike_min_loss),
    # restores the newest checkpoint at least steps_before steps before the parameters that gave the bad loss,
    # skips the batches drawn since, multiplies the learning rate by lr_factor, and goes on; at most
    # max_rollbacks times (0: stop at the first divergence). Checkpoints after the target are set aside as
    # <step>.diverged. Besides checkpoint.keep and keep_best, the newest checkpoint at least steps_before
    # steps older than the newest is kept: a target from before the trouble always exists.
    config.rollback = ml_collections.ConfigDict()
    config.rollback.max_rollbacks = 3
    config.rollback.spike_factor = 3.0  # 0: non-finite losses only
    config.rollback.spike_window = 100
    config.rollback.spike_min_loss = 1.0  # a converged model's small losses vary by large factors
    config.rollback.steps_before = 1
    config.rollback.lr_factor = 1.0  # PaLM (Chowdhery et al. 2022, Sect. 5.1) kept the rate

    # For tests and demonstrations only: the update on the at_batch-th batch drawn (counting from 1 over
    # the whole run, skipped batches included) is made with the learning rate times lr_factor (0: never).
    config.inject_spike = ml_collections.ConfigDict()
    config.inject_spike.at_batch = 0
    config.inject_spike.lr_factor = 1.0

    config.log_every_steps = 100
    # Per-layer statistics and the stall warning (vgg_jax/diagnostics.py; docs/training.md#diagnosing-a-stalled-run).
    config.diagnostics = ml_collections.ConfigDict()
    # > 0: every N steps, TensorBoard series diag/* of the step's batch: activation mean/std and dead ReLU
    # channels per layer, gradient, update and parameter norms per layer (one more forward/backward pass).
    config.diagnostics.every_steps = 0
    # Warn once (one log line) when the training loss stays at chance, within stall_margin x ln(num_classes)
    # of ln(num_classes), over the stall_steps steps after warm-up and later; 0: never. 5,004 steps: an
    # ImageNet epoch at batch 256.
    config.diagnostics.stall_steps = 5_004
    config.diagnostics.stall_margin = 0.02
    # clu profiler window: capture num_steps steps starting at start_step (-1: never).
    config.profile = ml_collections.ConfigDict()
    config.profile.start_step = -1
    config.profile.num_steps = 5

    # Device mesh: data parallel over every device; model > 1 splits fc6/fc7 over a model axis.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.model = 1
    # The type the gradients are summed over the data-parallel devices in: compute (as XLA partitions the step:
    # bfloat16 with model.dtype=bfloat16, which halves the traffic) or float32 (each device's gradient cast to
    # float32, then all-reduced). Cost and measured effect: docs/training.md#the-gradient-all-reduce.
    config.mesh.grad_reduce_dtype = "compute"

    # jax.distributed.initialize() before anything else (vgg_jax/sharding.py documents the fields).
    config.distributed = default_distributed_config()
    return config
