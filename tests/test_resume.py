"""Resuming a run (docs/training.md#resuming): settings that may change are applied and logged, changes to what is
trained stop with one line; damaged checkpoints are caught, set aside and skipped; loaders name them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_main import REPO, last_line, latest_step, logged, main_command, run_main

from vgg_jax import checkpoints, convert
from vgg_jax.classifier import load
from vgg_jax.errors import CheckpointError

STEPS = ["--config.checkpoint.every_steps=2", "--config.eval_every_steps=4"]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, data_dir) -> Path:
    """A tiny run trained to step 4 at a constant learning rate of 0.02: checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("resume") / "run"
    run_main(workdir, data_dir, "--config.num_train_steps=4", *STEPS)
    return workdir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_new_learning_rate_applies_on_resume_and_is_logged(four_steps, tmp_path, data_dir):
    workdir = copy_run(four_steps, tmp_path / "run")
    proc = run_main(workdir, data_dir, "--config.num_train_steps=6", *STEPS, "--config.optimizer.learning_rate=1e-4")
    assert "resuming with changes: num_train_steps 4 -> 6, optimizer.learning_rate 0.02 -> 0.0001" in proc.stderr
    assert json.loads((workdir / "results.json").read_text())["learning_rate"] == pytest.approx(1e-4)
    rates = logged(workdir, "train/learning_rate")
    assert rates[4] == pytest.approx(0.02) and rates[6] == pytest.approx(1e-4)


def test_changes_to_what_is_trained_stop_in_one_line_unless_allowed(four_steps, tmp_path, data_dir):
    workdir = copy_run(four_steps, tmp_path / "run")
    changes = ["--config.num_train_steps=6", *STEPS, "--config.model.name=vgg11_lrn", "--config.optimizer.momentum=0.0"]
    proc = run_main(workdir, data_dir, *changes, expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = last_line(proc)
    assert line.startswith("error: ") and 'model.name "vgg11" -> "vgg11_lrn"' in line
    assert "optimizer.momentum 0.9 -> 0.0" in line and f"--config.init_from={workdir}" in line
    assert "--config.allow_resume_changes=model.name,optimizer.momentum" in line
    assert latest_step(workdir) == 4  # nothing was trained
    run_main(workdir, data_dir, *changes, "--config.allow_resume_changes=model.name,optimizer.momentum")
    meta = checkpoints.read_meta(workdir)
    assert meta["step"] == 6 and meta["config"]["model"]["name"] == "vgg11_lrn"


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints


def damage(path: Path, how: str) -> None:
    content = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(content[: len(content) // 2])
    elif how == "overwrite":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, max(len(content), 8), dtype=np.uint8).tobytes())
    else:  # one flipped bit in the middle
        flipped = bytearray(content)
        flipped[len(flipped) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))


def test_every_file_of_a_step_damaged_four_ways_is_caught_or_harmless(four_steps, tmp_path):
    """Delete, truncate, overwrite and flip one bit of each file of a real step: the checksums catch it, or the
    file is orbax's bookkeeping, which restores the same values."""
    step = four_steps / "checkpoints" / "4"
    files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
    kinds = {
        "state/manifest.ocdbt",
        "state/_METADATA",
        "state/_sharding",
        "data/process_0.json",
        "meta/metadata",
        f"state/{checkpoints.DIGESTS}",
    }
    assert kinds <= set(files) and any(f.startswith("state/d/") for f in files)
    assert any(f.startswith("state/ocdbt.process_0/") for f in files)
    clean = checkpoints.restore_model(step)[1]
    harmless = []
    for i, rel in enumerate(files):
        for how in ("delete", "truncate", "overwrite", "flip"):
            if how in ("truncate", "flip") and (step / rel).stat().st_size == 0:
                continue
            copy = copy_run(step, tmp_path / f"{i}-{how}")
            damage(copy / rel, how)
            if checkpoints.verify_step(copy):
                continue
            restored = checkpoints.restore_model(copy)[1]
            for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(restored)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{rel} {how}")
            harmless.append(rel)
            shutil.rmtree(copy)
    assert {Path(h).name for h in harmless} <= {"_CHECKPOINT_METADATA", "commit_success.txt"}, harmless


def test_a_damaged_newest_step_is_set_aside_and_the_run_resumes_from_the_previous_one(four_steps, tmp_path, data_dir):
    workdir = copy_run(four_steps, tmp_path / "run")
    data_file = max((workdir / "checkpoints" / "4" / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
    damage(data_file, "flip")
    proc = run_main(workdir, data_dir, "--config.num_train_steps=6", *STEPS)
    assert f"Checkpoint step 4 is damaged (state/d/{data_file.name} does not match its checksum)" in proc.stderr
    assert (workdir / "checkpoints" / "4.damaged").is_dir()  # set aside, not deleted
    assert "Resumed from" in proc.stderr and "at step 2" in proc.stderr
    assert json.loads((workdir / "results.json").read_text())["step"] == 6


def test_loaders_on_a_damaged_step_name_it_and_the_intact_ones(four_steps, tmp_path, data_dir):
    workdir = copy_run(four_steps, tmp_path / "run")
    damage(workdir / "checkpoints" / "4" / "meta" / "metadata", "truncate")
    message = (
        r"Checkpoint .*checkpoints/4 is damaged \(meta/metadata has \d+ bytes, \d+ were written\); intact steps: 2"
    )
    with pytest.raises(CheckpointError, match=message):
        load(str(workdir))
    with pytest.raises(CheckpointError, match=message):
        convert.main(["--to=torchvision-safetensors", str(workdir), str(tmp_path / "out.safetensors")])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "vgg_jax.evaluate", f"--checkpoint={workdir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc).startswith("error: Checkpoint ") and "intact steps: 2" in last_line(proc)
    proc = subprocess.run(
        main_command(tmp_path / "new", data_dir, "--config.num_train_steps=2", f"--config.init_from={workdir}"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2 and "is damaged" in last_line(proc) and "intact steps: 2" in last_line(proc)


def test_an_evaluation_error_loses_no_training(four_steps, tmp_path, data_dir):
    """The checkpoint of an evaluation step is written before the evaluation; a resumed run evaluates it first.
    (The resumed run's first evaluation is step 4's, pending in the copied checkpoint; its second, step 8's, fails.)"""
    workdir = copy_run(four_steps, tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = main_command(
        workdir,
        data_dir,
        "--config.num_train_steps=8",
        *STEPS,
        script=str(Path(__file__).with_name("failing_eval_main.py")),
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "evaluation failed on purpose" in proc.stderr
    assert latest_step(workdir) == 8 and checkpoints.read_meta(workdir)["pending_eval"]
    proc = run_main(workdir, data_dir, "--config.num_train_steps=8", *STEPS)
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == 8 and results["images"] == 40
    assert logged(workdir, "eval/images").keys() >= {4, 8}


def test_every_checkpoint_damaged_stops_in_one_line_and_changes_nothing(four_steps, tmp_path, data_dir):
    """No silent fresh start: the error names every damaged step; a fresh start only when asked for."""
    workdir = copy_run(four_steps, tmp_path / "run")
    for step in (2, 4):
        damage(
            max((workdir / "checkpoints" / str(step) / "state" / "d").iterdir(), key=lambda p: p.stat().st_size),
            "truncate",
        )
    before = {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    proc = run_main(workdir, data_dir, "--config.num_train_steps=6", *STEPS, expect_ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "falling back" not in proc.stderr
    line = last_line(proc)
    assert line.startswith(f"error: Every checkpoint in {workdir}/checkpoints is damaged (step 4: state/d/")
    assert "; step 2: state/d/" in line and "--config.checkpoint.fresh_start_if_damaged=True" in line
    after = {str(p.relative_to(workdir)): p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    lease = f"checkpoints/{checkpoints.LEASE}"  # the workdir's lock, taken and released
    assert {k: v for k, v in after.items() if k != lease} == {k: v for k, v in before.items() if k != lease}
    proc = run_main(
        workdir, data_dir, "--config.num_train_steps=2", *STEPS, "--config.checkpoint.fresh_start_if_damaged=True"
    )
    assert "starting afresh from step 0" in proc.stderr
    assert (workdir / "checkpoints" / "2.damaged").is_dir() and (workdir / "checkpoints" / "4.damaged").is_dir()
    assert latest_step(workdir) == 2


def test_a_step_without_checksums_is_damaged_unless_unverified_steps_are_allowed(four_steps, tmp_path, data_dir):
    """Every step vgg_jax writes has checksum files: one without them is damaged or foreign, never 'intact'."""
    workdir = copy_run(four_steps, tmp_path / "run")
    step = workdir / "checkpoints" / "4"
    for digests in step.rglob(checkpoints.DIGESTS):
        digests.unlink()
    with pytest.raises(
        CheckpointError, match=r"checkpoints/4 is damaged \(no _CHECKSUMS.* cannot be verified.*intact steps: 2"
    ):
        load(str(workdir))
    assert load(str(workdir), allow_unverified=True).path == str(workdir)  # as the user allows
    damage(max((step / "state" / "d").iterdir(), key=lambda p: p.stat().st_size), "flip")
    proc = run_main(workdir, data_dir, "--config.num_train_steps=6", *STEPS)
    assert "Checkpoint step 4 is damaged (no _CHECKSUMS.sha256.json files" in proc.stderr
    assert "unverified" not in proc.stderr.replace("allow unverified steps", "")
    assert "Resumed from" in proc.stderr and "at step 2" in proc.stderr


def test_a_second_run_on_a_workdir_is_refused_in_one_line_while_the_first_lives(tmp_path, data_dir):
    first = subprocess.Popen(
        main_command(
            tmp_path,
            data_dir,
            "--config.num_train_steps=6",
            *STEPS,
            script=str(Path(__file__).with_name("slow_save_main.py")),
        ),
        cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "VGG_JAX_TEST_STALL_STEP": "2"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not (tmp_path / "checkpoints" / "stalled").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.1)
        proc = run_main(
            tmp_path,
            data_dir,
            "--config.num_train_steps=6",
            *STEPS,
            "--config.optimizer.learning_rate=0.05",
            expect_ok=False,
        )
    finally:
        first.kill()
        first.wait()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = last_line(proc)
    assert (
        line.startswith(f"error: A training run in {tmp_path} is already under way: ") and f" pid {first.pid} " in line
    )
    assert not list(tmp_path.glob("events.out.tfevents.*"))[1:]  # only the first run's
