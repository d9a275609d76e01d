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
from test_main import REPO, last_line, latest_step, logged, main_command, run_main, step_folders

from vgg_jax import checkpoints, convert
from vgg_jax.classifier import load
from vgg_jax.errors import CheckpointError, ConfigError

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


# ----------------------------------------------------------------------------------------------
# Schedule changes and resume_from_step


def cosine(lr: float, count: int, total: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, lr, 1, total) for count >= 1 (one warm-up step), in float64."""
    return 0.5 * lr * (1 + np.cos(np.pi * (count - 1) / (total - 1)))


def test_every_listed_schedule_change_applies_on_resume(four_steps, tmp_path, data_dir):
    """Issue 27, items 4 and 5: constant -> cosine -> constant, each on resume; the optimizer state (its momentum
    and step count) is carried into the new schedule's structure (constant -> step: the test below). The rate of
    update n is the schedule at count n - 1; results.json holds the last update's. step_boundaries, a list
    before, is set from the command line (every field: tests/test_cli.py)."""
    workdir = copy_run(four_steps, tmp_path / "run")
    cos = ["--config.optimizer.schedule=cosine", "--config.optimizer.warmup_steps=0"]
    proc = run_main(workdir, data_dir, "--config.num_train_steps=6", *STEPS, *cos)
    assert 'optimizer.schedule "constant" -> "cosine"' in proc.stderr and "at step 4" in proc.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert results["learning_rate"] == pytest.approx(cosine(0.02, 5, 6), rel=1e-5)
    assert logged(workdir, "train/learning_rate")[6] == pytest.approx(cosine(0.02, 4, 6), rel=1e-5)
    constant = ["--config.optimizer.learning_rate=0.01", "--config.optimizer.step_boundaries=(9,)"]
    proc = run_main(workdir, data_dir, "--config.num_train_steps=8", *STEPS, *constant)
    assert 'optimizer.schedule "cosine" -> "constant"' in proc.stderr and "at step 6" in proc.stderr
    assert "optimizer.step_boundaries [185000, 277500, 333000] -> [9]" in proc.stderr
    assert json.loads((workdir / "results.json").read_text())["learning_rate"] == pytest.approx(0.01)
    assert logged(workdir, "train/learning_rate")[8] == pytest.approx(0.01)


def test_the_optimizer_state_is_carried_into_another_schedule():
    """The update count, momentum and rate carry over; a step-wise schedule continues from the update count."""
    import jax.numpy as jnp

    from configs import default
    from vgg_jax import optim

    config = default.get_config().optimizer
    params = {"fc8": {"kernel": jnp.full((3,), 2.0), "bias": jnp.ones(2)}}
    grads = {"fc8": {"kernel": jnp.asarray([1.0, -2.0, 3.0]), "bias": jnp.asarray([0.5, 0.25])}}
    config.update(schedule="constant", learning_rate=0.1, warmup_steps=0)
    tx = optim.make_optimizer(config, 10)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(grads, state, params)
    config.schedule = "cosine"
    cos = optim.make_optimizer(config, 10)
    adopted = optim.adopt_opt_state(state, cos.init(params))
    assert int(adopted.count) == 3 and int(adopted.hyperparams_states["learning_rate"].count) == 3
    trace = lambda s: s.inner_state[1][0].trace  # noqa: E731
    np.testing.assert_array_equal(trace(adopted)["fc8"]["kernel"], trace(state)["fc8"]["kernel"])
    updates, after = cos.update(grads, adopted, params)
    assert float(optim.current_learning_rate(after)) == pytest.approx(cosine(0.1, 3, 10), rel=1e-5)
    # SGD with momentum 0.9 and L2 decay 5e-4 on kernels, in float64: trace' = g + wd w + 0.9 trace.
    g = np.asarray(grads["fc8"]["kernel"], np.float64) + 5e-4 * 2.0
    expected = -cosine(0.1, 3, 10) * (g + 0.9 * np.asarray(trace(state)["fc8"]["kernel"], np.float64))
    np.testing.assert_allclose(updates["fc8"]["kernel"], expected, rtol=1e-5)
    config.schedule = "constant"
    back = optim.adopt_opt_state(after, optim.make_optimizer(config, 10).init(params))
    assert int(back.count) == 4 and back.hyperparams_states == {}
    config.update(schedule="step", step_boundaries=(3,))  # the rate x decay_factor after update 3
    step = optim.make_optimizer(config, 10)
    _, stepped = step.update(grads, optim.adopt_opt_state(state, step.init(params)), params)
    assert float(optim.current_learning_rate(stepped)) == pytest.approx(0.1 * 0.1)
    config.trainable = "fc8"
    with pytest.raises(ValueError, match="cannot carry the optimizer state over"):
        optim.adopt_opt_state(state, optim.make_optimizer(config, 10).init(params))


def test_resume_from_a_chosen_step(four_steps, tmp_path, data_dir):
    from vgg_jax import main

    from tiny_runs import TINY

    workdir = copy_run(four_steps, tmp_path / "run")
    in_process = [f"--workdir={workdir}", *TINY, f"--config.data.data_dir={data_dir}", *STEPS]
    with pytest.raises(ConfigError, match=r"^--config.resume_from_step=3: .* has no step 3; its steps are 2, 4.$"):
        main.main([*in_process, "--config.num_train_steps=6", "--config.resume_from_step=3"])
    back = ["--config.num_train_steps=4", "--config.resume_from_step=2"]
    proc = run_main(workdir, data_dir, *STEPS, *back)
    assert "Resuming from step 2 (resume_from_step)" in proc.stderr and "Resumed from" in proc.stderr
    assert step_folders(workdir) == ["2", "4", "4.superseded"]  # not deleted
    assert checkpoints.read_meta(workdir / "checkpoints" / "4")["config"]["resume_from_step"] == 2
    # The same command again goes on from the newest step, written after the rewind: here, nothing to do.
    main.main([*in_process, *back])
    assert step_folders(workdir) == ["2", "4", "4.superseded"]


def test_the_resume_table_lists_the_fields_that_may_change():
    """docs/training.md#resuming's first row names exactly the fields config_checks.RESUMABLE lets change."""
    import re

    from vgg_jax import config_checks

    text = (REPO / "docs" / "training.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `num_train_steps`;"))
    fields = {f.removesuffix("*") for f in re.findall(r"`([a-z_.*]+)`", row.split(" | ")[0])}
    assert fields == set(config_checks.RESUMABLE)


def test_a_divergence_rollbacks_cannot_cure_stops_and_is_not_resumed_into(four_steps, tmp_path, data_dir):
    """Issue 27, item 7: at a learning rate of 1e6, step 5's update is finite but blown up and saved
    (checkpoint.every_steps=1); step 6's loss reveals it. That checkpoint is set aside (not kept as a rollback
    target), the run rolls back once (rollback.max_rollbacks=1), stops in one line naming what it tried, and the
    advised rerun at a lower rate resumes from step 4, from before the trouble."""
    workdir = copy_run(four_steps, tmp_path / "run")
    steps = ["--config.checkpoint.every_steps=1", "--config.rollback.max_rollbacks=1", "--config.eval_every_steps=4"]
    proc = run_main(
        workdir,
        data_dir,
        "--config.num_train_steps=12",
        *steps,
        "--config.optimizer.learning_rate=1e6",
        expect_ok=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = last_line(proc)
    assert line.startswith(("error: Non-finite loss or gradient at step 6", "error: Loss spike at step 6"))
    assert "after 1 rollback(s) (step 6 -> 4 (2 batches skipped, lr x1))" in line
    assert "checkpoints/5.diverged-1." in line and "A rerun resumes from step 4" in line
    assert step_folders(workdir) == ["2", "4", "5.diverged", "5.diverged-1"]
    blown = checkpoints.restore_model(workdir / "checkpoints" / "5.diverged")[1]["params"]["fc8"]["kernel"]
    assert np.abs(np.asarray(blown)).max() > 1e3
    proc = run_main(workdir, data_dir, "--config.num_train_steps=6", *steps, "--config.optimizer.learning_rate=0.01")
    assert "at step 4" in proc.stderr and "Rollback" not in proc.stderr
    assert json.loads((workdir / "results.json").read_text())["step"] == 6
    final = checkpoints.restore_model(workdir)[1]["params"]
    assert all(np.abs(np.asarray(v)).max() < 10 for v in jax.tree.leaves(final))
