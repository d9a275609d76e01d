"""Per-layer statistics against numpy, and the stall warning: unit-level and through the CLI."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np

from configs import default
from vgg_jax import diagnostics, models, optim
from vgg_jax.train_step import create_train_state

from tiny_runs import TINY

REPO = Path(__file__).resolve().parents[1]
STALL = "stalled at chance"


def test_layer_statistics_match_numpy():
    model = models.get_model("vgg11", num_classes=10, width=4, fc_width=16, crop_size=32, dropout_rate=0.0)
    opt = default.get_config().optimizer
    opt.momentum, opt.schedule, opt.learning_rate = 0.0, "constant", 0.1  # one update = -lr (grad + wd w)
    state = create_train_state(model, optim.make_optimizer(opt, 10), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(0, 50, (6, 32, 32, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 6).astype(np.int32),
    }
    stats = {k: float(v) for k, v in diagnostics.layer_statistics(state, batch).items()}

    relus = [n for n in ("relu1_1", "relu2_1", "relu3_1", "relu3_2", "relu4_1", "relu4_2", "relu5_1", "relu5_2")]
    relus += ["relu6", "relu7"]
    feats = models.extract_features(model, {"params": state.params}, batch["image"], relus, dense=False)
    for name in relus:
        x = np.asarray(feats[name], np.float64)
        dead = np.mean(np.all(x.reshape(-1, x.shape[-1]) <= 0, axis=0))
        np.testing.assert_allclose(stats[f"act/{name}/dead"], dead, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(stats[f"act/{name}/mean"], x.mean(), rtol=1e-4, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(stats[f"act/{name}/std"], x.std(), rtol=1e-4, atol=1e-7, err_msg=name)
    assert any(stats[f"act/{n}/dead"] > 0 for n in relus)  # the dead count is exercised, not only zeros

    def loss(params):
        logits = model.apply({"params": params}, batch["image"])
        return -np.log(10) * 0 + jax.numpy.mean(jax.nn.logsumexp(logits, -1) - logits[np.arange(6), batch["label"]])

    grads = jax.grad(loss)(state.params)
    logits = np.asarray(model.apply({"params": state.params}, batch["image"]), np.float64)
    np.testing.assert_allclose(stats["logits/std_over_batch"], logits.std(axis=0).mean(), rtol=1e-4)
    for layer, leaves in state.params.items():
        g = {k: np.asarray(v, np.float64) for k, v in grads[layer].items()}
        w = {k: np.asarray(v, np.float64) for k, v in leaves.items()}
        norm = math.sqrt(sum((x**2).sum() for x in g.values()))
        update = 0.1 * np.concatenate([(g[k] + (opt.weight_decay * w[k] if k == "kernel" else 0)).ravel() for k in g])
        np.testing.assert_allclose(stats[f"grad/{layer}"], norm, rtol=1e-4, err_msg=layer)
        np.testing.assert_allclose(stats[f"update/{layer}"], np.linalg.norm(update), rtol=1e-4, err_msg=layer)
        np.testing.assert_allclose(stats[f"param/{layer}"], math.sqrt(sum((x**2).sum() for x in w.values())), rtol=1e-5)


def _watch(stall_steps=20, warmup=10, schedule="cosine") -> diagnostics.StallWatch:
    config = ml_collections.ConfigDict(default.get_config().to_dict())
    config.optimizer.warmup_steps, config.optimizer.schedule = warmup, schedule
    config.diagnostics.stall_steps = stall_steps
    return diagnostics.StallWatch(config, num_classes=10)


def _stats():
    return {
        "act/relu1_1/dead": 0.0,
        "act/relu6/dead": 1.0,
        "act/relu6/std": 0.0,
        "grad/conv1_1": 0.0,
        "grad/fc8": 1e-3,
        "logits/std_over_batch": 0.0,
    }


def test_stall_watch_warns_once_past_warmup_plus_stall_steps(caplog):
    watch = _watch()
    warned = []
    with caplog.at_level(logging.WARNING):
        for step in range(5, 101, 5):
            # Above chance at first (large initial logits, as the demo's 3.6), then at chance: only the last
            # stall_steps count.
            if watch.update(step, 3.6 if step <= 10 else math.log(10) + 0.01, _stats):
                warned.append(step)
    assert warned == [30]  # warm-up 10 + 20 steps
    lines = [r.getMessage() for r in caplog.records if STALL in r.getMessage()]
    assert len(lines) == 1 and "relu6 100%" in lines[0] and "ln(10)" in lines[0]


def test_stall_watch_is_silent_while_learning_or_far_from_chance():
    learning, exploding, constant_schedule = _watch(), _watch(), _watch(warmup=50, schedule="constant")
    for step in range(5, 101, 5):
        assert not learning.update(step, max(math.log(10) - 0.02 * step, 0.5), _stats)
        assert not exploding.update(step, 3.6, _stats)
    # A loss that leaves chance late but whose last stall_steps are away from it: no warning.
    late = _watch()
    for step in range(5, 101, 5):
        assert not late.update(step, math.log(10) if step < 25 else 2.0, _stats)
    # A loss falling through chance (2.6 -> 2.0 over the window, as a tiny net memorising a few images from
    # large initial logits) averages near ln 10 but is learning: no warning; it is warned once the fall stops.
    falling = _watch(warmup=0, schedule="constant")
    assert not any(falling.update(s, 2.6 - 0.03 * s, _stats) for s in range(1, 21))
    warned = [s for s in range(21, 61) if falling.update(s, math.log(10), _stats)]
    assert len(warned) == 1 and 30 < warned[0] <= 40, warned  # once the window is mostly at chance
    # warm-up counts for the cosine schedule only: a constant schedule is checked from stall_steps on.
    assert [s for s in range(5, 41, 5) if constant_schedule.update(s, math.log(10), _stats)] == [20]


def _main(workdir: Path, data_dir: str, steps: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "vgg_jax.main", f"--workdir={workdir}", *TINY, f"--config.data.data_dir={data_dir}"]
    cmd += [f"--config.{k}={steps}" for k in ("num_train_steps", "eval_every_steps", "checkpoint.every_steps")]
    proc = subprocess.run([*cmd, *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_a_run_that_cannot_learn_says_so_once_and_a_learning_run_does_not(tmp_path, data_dir):
    # Learning rate 0 and the paper's N(0, 0.01^2) init: the logits stay ~0, the loss at ln 10.
    stalled = _main(
        tmp_path / "stalled",
        data_dir,
        12,
        "--config.optimizer.learning_rate=0",
        "--config.model.init_scheme=paper",
        "--config.diagnostics.stall_steps=6",
    )
    lines = [line for line in stalled.stderr.splitlines() if STALL in line]
    assert len(lines) == 1, stalled.stderr[-3000:]
    assert "Step 6:" in lines[0] and "dead ReLU channels" in lines[0] and "gradient norm" in lines[0]
    # The same tiny net on 16 training images without colour shift or dropout: its loss falls from 2.5 to
    # about 1.5 in 40 steps (measured), and nothing is reported.
    learning = _main(
        tmp_path / "learning",
        data_dir,
        40,
        "--config.data.train_split=train[:16]",
        "--config.data.pca_alpha_std=0",
        "--config.model.dropout_rate=0",
        "--config.optimizer.learning_rate=0.01",
        "--config.log_every_steps=5",
        "--config.diagnostics.stall_steps=20",
    )
    assert STALL not in learning.stderr
    assert "train/loss=1." in learning.stderr  # it did learn: a logged loss below 2
