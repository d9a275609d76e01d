"""Session-wide fixtures: the built-in demo dataset, prepared once, and the tiny run trained on it.

Every test that trains or evaluates reads the same prepared TFDS data_dir (generating the
2,300-image demo set takes ~15 s); the tiny 2-device training run is shared by the evaluation,
loading and notebook tests.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# CPU only, even where libtpu is installed (the preflight tests compile for TPU topologies without a backend).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402, F401  (reads this process's JAX settings before the cache below is set)
import pytest  # noqa: E402

# The many tiny training runs the tests start as subprocesses compile the same programs: a persistent
# compilation cache for this session's subprocesses (not this process) saves ~8 s of each.
_JIT_CACHE = tempfile.mkdtemp(prefix="vgg_jax_test_jit_cache_")
atexit.register(shutil.rmtree, _JIT_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JIT_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from tiny_runs import TINY_TRAINING, TRAINING_DEVICES, user_env  # noqa: E402

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
    """The workdir of the tiny run, trained with 2 CPU devices in a subprocess; its log is ``../main.log``."""
    workdir = tmp_path_factory.mktemp("vgg_jax_tiny_run") / "workdir"
    env = user_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={TRAINING_DEVICES}")
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
    (workdir.parent / "main.log").write_text(proc.stderr)  # its log, as a user's terminal shows it
    return workdir


@pytest.fixture(scope="session")
def clf(run):
    """``vgg_jax.load`` of the tiny run."""
    from vgg_jax.classifier import load

    return load(str(run))
