"""Rollback on divergence (docs/training.md#rollback): a spike injected on the built-in data is rolled back past
the batches that led to it, and a resume reproduces the rolled-back run. (A divergence that rollbacks cannot cure:
tests/test_resume.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_main import assert_params_equal, final_params, logged, run_main, step_folders

from vgg_jax import checkpoints

SPIKE = [
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=1",  # with keep_best=0, only the keep policy for rollbacks keeps step 10
    "--config.checkpoint.keep_best=0",
    "--config.eval_every_steps=100",  # only at the end
    "--config.inject_spike.at_batch=12",  # the update on batch 12 (step 12) at 1000 x the rate
    "--config.inject_spike.lr_factor=1000",
    "--config.rollback.lr_factor=0.5",
]


@pytest.fixture(scope="module")
def spiked(tmp_path_factory, data_dir):
    """16 steps with a spike injected at step 12: (workdir, stderr)."""
    workdir = tmp_path_factory.mktemp("spiked") / "run"
    proc = run_main(workdir, data_dir, "--config.num_train_steps=16", *SPIKE)
    return workdir, proc.stderr


def test_an_injected_spike_is_rolled_back_past_its_batches(spiked):
    workdir, log = spiked
    # Step 12's update blew the parameters up; step 13's loss, on them, is the spike. The newest checkpoint from
    # before it is step 10 (step 12's parameters gave the bad loss): step 12 is set aside, not kept as a target.
    assert "inject_spike: batch 12's update made at 1000 x the rate" in log
    line = next(x for x in log.splitlines() if "Rollback 1 of 3:" in x)
    assert "at step 13 (" in line and "restored step 10, skipping the 4 batches drawn since" in line
    assert "(learning rate x0.5)" in line and "set aside 12.diverged" in line
    assert not checkpoints.read_meta(workdir / "checkpoints" / "12.diverged").get("rollbacks")
    # keep=1 newest, plus the newest one at least rollback.steps_before=1 step older (the keep policy).
    assert step_folders(workdir) == ["12.diverged", "14", "16"]
    assert logged(workdir, "train/rollbacks") == {13: 1.0} and logged(workdir, "train/rollback_to") == {13: 10.0}
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == 16 and results["rollbacks"] == 1
    assert results["learning_rate"] == pytest.approx(0.01)  # 0.02 x the rollback's 0.5
    assert logged(workdir, "train/learning_rate")[16] == pytest.approx(0.01)
    assert all(np.abs(v).max() < 10 for v in final_params(workdir).values())  # the blown-up update is gone
    # The skipped batches are in the iterator state: 16 steps + 4 skipped batches of 8 examples were read.
    state = json.loads((workdir / "checkpoints" / "16" / "data" / "process_0.json").read_text())["json"]
    assert state["epoch"] * state["layout"]["examples"] + state["position"] == (16 + 4) * 8
    meta = checkpoints.read_meta(workdir)
    assert [(r["step"], r["to"], r["skipped"]) for r in meta["rollbacks"]] == [(13, 10, 4)]


def test_a_resume_reproduces_the_rolled_back_run(spiked, tmp_path, data_dir):
    """Stopped at step 14 (after the rollback) and resumed to 16: the same parameters as the run straight to 16."""
    proc = run_main(tmp_path, data_dir, "--config.num_train_steps=14", *SPIKE)
    assert "Rollback 1 of 3" in proc.stderr
    proc = run_main(tmp_path, data_dir, "--config.num_train_steps=16", *SPIKE)
    assert "Resumed from" in proc.stderr and "at step 14" in proc.stderr and "Rollback" not in proc.stderr
    assert_params_equal(final_params(spiked[0]), final_params(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text())["learning_rate"] == pytest.approx(0.01)
