"""The checkpoint manager (vgg_jax.checkpoints.Checkpointer): retention (the newest ``keep`` and the ``keep_best``
best by validation top-1, as the training loop records it, also across a resume), and round trips of everything a
checkpoint carries besides the train state."""

from __future__ import annotations

import json

import jax
import numpy as np

from configs import demo
from vgg_jax import checkpoints, data, optim, rollback, train


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


def _run_state(config):
    """A plateau, scores and rollback guard with asymmetric values: a swapped or retyped field shows."""
    plateau = optim.Plateau(factor=0.1, patience=3, min_delta=0.01, max_decreases=3)
    plateau.best, plateau.bad_evals, plateau.decreases = 0.625, 2, 1
    guard = rollback.Guard(config.rollback)
    guard.losses.extend([2.5, 2.25, 2.0])
    guard.rollbacks.append({"step": 7, "to": 4, "skipped": 3, "lr_factor": 0.5, "reason": "loss spike at step 7"})
    return plateau, {2: 0.9, 4: 0.5}, guard


def _fresh(config):
    plateau = optim.Plateau(factor=0.1, patience=3, min_delta=0.01, max_decreases=3)
    return plateau, {}, rollback.Guard(config.rollback)


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def test_the_meta_item_and_iterator_state_survive_save_restore_save(tmp_path, data_dir):
    """Every field a checkpoint carries besides the train state (meta: plateau, scores, rollbacks, loss history,
    pending_eval, config, class names; the iterator's position) is read back with its value and type, and
    writing it again gives the same JSON."""
    config = demo.get_config()
    config.data.data_dir = data_dir
    plateau, scores, guard = _run_state(config)
    train_iter = data.create_train_iterator(config.data, global_batch_size=8, seed=3)
    train_iter.set_state({**train_iter.get_state(), "epoch": 2, "position": 5, "skipped": 1})
    meta = train.meta_item(4, config, ["cat", "dog"], plateau, scores, guard, pending_eval=True)
    state = {"w": np.arange(3, dtype=np.float32)}
    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2, keep_best=1, async_save=False)
    ckpt.save(4, state, train_iter.get_state(), meta)
    ckpt.close()

    ckpt = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2, keep_best=1, async_save=False)
    restored, data_states, read = ckpt.restore(4, _abstract(state))
    ckpt.close()
    np.testing.assert_array_equal(restored["w"], state["w"])
    plateau2, scores2, guard2 = _fresh(config)
    guard2.load(read)
    assert train.load_meta_state(read, plateau2, scores2) is True  # pending_eval
    assert plateau2 == plateau and [type(v) for v in plateau2.state().values()] == [float, int, int]
    assert scores2 == scores and all(type(k) is int for k in scores2)
    assert guard2.state() == guard.state() and guard2.losses.maxlen == config.rollback.spike_window
    iter2 = data.create_train_iterator(config.data, global_batch_size=8, seed=3)
    assert iter2.resume(data_states) is None  # the same layout: exact
    assert iter2.get_state() == train_iter.get_state() and (iter2.epoch, iter2.num_skipped) == (train_iter.epoch, 1)
    again = train.meta_item(4, config, read["class_names"], plateau2, scores2, guard2, pending_eval=True)
    assert json.dumps(again, sort_keys=True) == json.dumps(meta, sort_keys=True) == json.dumps(read, sort_keys=True)


def test_a_resumed_run_keeps_its_best_step_from_before_the_resume(tmp_path):
    """keep_best over a resume: the scores read back from the meta item still name their steps, so step 2 (the
    best, 0.9) outlives steps 4 and 6 once it is no longer among the keep=2 newest."""
    config = demo.get_config()
    top1 = {2: 0.9, 4: 0.5, 6: 0.3, 8: 0.4}
    plateau, _, guard = _fresh(config)

    def run(steps, ckpt):
        for step in steps:
            ckpt.scores[step] = top1[step]
            meta = train.meta_item(step, config, ["cat"], plateau, ckpt.scores, guard, pending_eval=False)
            ckpt.save(step, {"w": np.full((2,), step, np.float32)}, {"position": step}, meta)
        ckpt.wait()

    first = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2, keep_best=1, async_save=False)
    run((2, 4), first)
    first.close()
    resumed = checkpoints.Checkpointer(tmp_path / "checkpoints", keep=2, keep_best=1, async_save=False)
    train.load_meta_state(checkpoints.read_meta(tmp_path / "checkpoints" / "4"), plateau, resumed.scores)
    run((6, 8), resumed)
    assert resumed.steps() == [2, 6, 8]
    resumed.close()
