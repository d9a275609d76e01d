"""The checkpoint manager's retention (vgg_jax.checkpoints.Checkpointer): the newest ``keep`` and the
``keep_best`` best by validation top-1, as the training loop records it."""

from __future__ import annotations

import numpy as np

from vgg_jax import checkpoints


def test_keeps_the_newest_and_the_best_by_validation_top1(tmp_path):
    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2, keep_best=1, async_save=False)
    top1 = {1: 0.30, 2: 0.90, 3: 0.50, 4: 0.10, 5: 0.20}
    for step in range(1, 7):
        state = {"w": np.full((3,), float(step), np.float32)}
        ckpt.save(step, state, {"position": step}, {"step": step})
        if step in top1:  # as the loop: the evaluation after the step's checkpoint
            ckpt.scores[step] = top1[step]
    ckpt.wait()
    assert ckpt.steps() == [2, 5, 6]  # best (0.9) and the newest two; not the worst (4) nor the others
    ckpt.close()
    # A reopened manager keeps what is there.
    assert checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2, keep_best=1).steps() == [2, 5, 6]
