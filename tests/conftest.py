"""Session-wide fixtures: the built-in demo dataset, prepared once, and the tiny run trained on it.

Every test that trains or evaluates reads the same prepared TFDS data_dir (generating the
2,300-image demo set takes ~15 s); the tiny 2-device training run is shared by the evaluation,
loading and notebook tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_runs import TINY_TRAINING, TRAINING_DEVICES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A TFDS data_dir with the built-in demo set prepared."""
    from vgg_jax import data

    cfg = data.default_data_config()  # dataset='vgg_jax_demo' by default
    cfg.data_dir = str(tmp_path_factory.mktemp("demo_tfds"))
    data.num_examples(cfg, "train")  # generates and prepares it (first use)
    return cfg.data_dir


@pytest.fixture(scope="session")
def run(tmp_path_factory, data_dir) -> Path:
    """The workdir of the tiny run, trained with 2 CPU devices in a subprocess."""
    workdir = tmp_path_factory.mktemp("vgg_jax_tiny_run") / "workdir"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={TRAINING_DEVICES}"
    cmd = [
        sys.executable,
        "-m",
        "vgg_jax.main",
        f"--workdir={workdir}",
        *TINY_TRAINING,
        f"--config.data.data_dir={data_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir


@pytest.fixture(scope="session")
def clf(run):
    """``vgg_jax.load`` of the tiny run."""
    from vgg_jax.classifier import load

    return load(str(run))
