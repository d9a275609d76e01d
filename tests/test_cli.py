"""User errors end every entry point with one line and exit status 2, before anything is trained; --verbose
shows the traceback; program errors keep theirs (vgg_jax/cli.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_main import REPO

from vgg_jax import cli, main
from vgg_jax.errors import ConfigError

from tiny_runs import TINY

CONFIG_ERRORS = [
    ("--config.eval_protocol=tencrop", "Unknown or repeated evaluation method(s) in protocol 'tencrop'"),
    ("--config.data.eval_scales=(20,)", "--config.data.eval_scales=(20,): test scales [20] are below crop_size=32"),
    ("--config.optimizer.learning_rate=-0.1", "--config.optimizer.learning_rate=-0.1: must be positive"),
    ("--config.num_train_steps=-5", "--config.num_train_steps=-5: must be positive"),
    ("--config.model.dropout_rate=1.5", "--config.model.dropout_rate=1.5: must be in [0, 1)"),
    ("--config.model.dtype=bf16", "--config.model.dtype='bf16': must be one of float32, bfloat16"),
    ("--config.model.name=vgg12", "--config.model.name='vgg12': Unknown model 'vgg12'"),
    ("--config.optimizer.schedule=linear", "--config.optimizer.schedule='linear': must be one of plateau"),
    ("--config.data.crop_size=33", "--config.data.crop_size=33: must be a multiple of 32"),
    ("--config.checkpoint.keep=0", "--config.checkpoint.keep=0: must be >= 1"),
]


@pytest.mark.parametrize("override, message", CONFIG_ERRORS)
def test_bad_config_values_stop_before_anything_is_written(override, message, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        main.main([f"--workdir={workdir}", *TINY, override])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not workdir.exists()


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VGG_JAX_VERBOSE")} | (env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    return line


def test_every_entry_point_reports_user_errors_in_one_line(tmp_path):
    line = one_line_error(run_cli("-m", "vgg_jax.main", f"--workdir={tmp_path}", *TINY, "--config.model.dtype=bf16"))
    assert "--config.model.dtype='bf16'" in line
    line = one_line_error(
        run_cli("-m", "vgg_jax.main", f"--workdir={tmp_path}", *TINY, "--config.data.dataset=imagenet2013")
    )
    assert "unknown dataset 'imagenet2013' (did you mean 'imagenet2012'" in line
    line = one_line_error(
        run_cli("-m", "vgg_jax.convert", "--layout=torchvision", str(tmp_path / "no.pth"), str(tmp_path / "c"))
    )
    assert "No such weights file" in line
    line = one_line_error(run_cli("-m", "vgg_jax.data.stats", "--data.dataset=folder", f"--out={tmp_path / 's.json'}"))
    assert "dataset='folder' needs --config.data.folder" in line
    line = one_line_error(run_cli("-m", "experiments.launch", "--sweep=paper", "--nets=A,F", "--dry_run"))
    assert "Unknown or no nets ['F']" in line
    line = one_line_error(run_cli("-m", "vgg_jax.evaluate", "--checkpoint=x", "--protcol=dense"))
    assert "protcol" in line
    # --verbose (or VGG_JAX_VERBOSE=1) shows where a user error came from.
    proc = run_cli(
        "-m", "vgg_jax.convert", "--layout=torchvision", str(tmp_path / "no.pth"), str(tmp_path / "c"), "--verbose"
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "No such weights file" in proc.stderr


def test_program_errors_keep_their_traceback():
    proc = run_cli("-c", "from vgg_jax import cli; cli.run(lambda argv: 1 / 0)")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_a_later_override_of_a_field_replaces_an_earlier_one(tmp_path):
    """ml-collections appends a tuple field given twice; a sweep's run-specific override must win instead."""
    values, _ = cli.parse(
        [f"--workdir={tmp_path}", *TINY, "--config.data.eval_scales=(40, 48)"], main.define_flags, "main"
    )
    assert values.config.data.eval_scales == (40, 48) and "--config.data.eval_scales=(36,)" in TINY
