"""Named one-line bugs in the core modules and the tests that must catch each (docs/testing.md).

A mutant replaces ``find`` (which must occur exactly ``count`` times in ``file``) by ``replace``. Add one
whenever a bug slips through review: the list grows with the code.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, or "-k", "expr"
    count: int = 1


M, T = "vgg_jax/models.py", "vgg_jax/train_step.py"
OPT, TR = "vgg_jax/optim.py", "vgg_jax/train.py"
C, X = "vgg_jax/checkpoints.py", "vgg_jax/data/transforms.py"
P, E, V = "vgg_jax/data/pipeline.py", "vgg_jax/evaluate.py", "vgg_jax/convert.py"
MAIN = "tests/test_main.py"
DG = "vgg_jax/diagnostics.py"
CC, HW, PF = "vgg_jax/config_checks.py", "vgg_jax/hardware.py", "vgg_jax/preflight.py"
CK = ("tests/test_checkpoints.py",)
# tests/test_train_step.py without its multi-process and compile-heavy tests (which a step mutant also breaks)
STEP = ("tests/test_train_step.py", "-k", "not two_processes and not fc_sharding and not on_a_mesh and not remat")

MUTANTS = [
    # models: the networks and their regularisation
    Mutant(
        "lrn_alpha_divided_by_n",
        M,
        "bias + alpha * window_sum",
        "bias + alpha / size * window_sum",
        ("tests/test_models.py",),
    ),
    Mutant(
        "lrn_window_too_narrow", M, "<= size // 2, jnp.float32", "< size // 2, jnp.float32", ("tests/test_models.py",)
    ),
    Mutant("avg_pool_instead_of_max", M, ".max(axis=(2, 4))", ".mean(axis=(2, 4))", ("tests/test_models.py",)),
    Mutant(
        "no_relu_after_convs",
        M,
        'x = self._tap(f"relu{name}", nn.relu(x))',
        'x = self._tap(f"relu{name}", x)',
        ("tests/test_models.py",),
    ),
    Mutant(
        "dropout_never_applied",
        M,
        "deterministic=not train",
        "deterministic=True",
        ("tests/test_models.py", *STEP),
        count=2,
    ),
    Mutant(
        "dropout_also_at_test_time",
        M,
        "deterministic=not train",
        "deterministic=False",
        ("tests/test_models.py",),
        count=2,
    ),
    Mutant(
        "fc7_dropout_missing",
        M,
        'x = self._tap("relu7", nn.relu(x))\n        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)',
        'x = self._tap("relu7", nn.relu(x))',
        ("tests/test_models.py", *STEP),
    ),
    Mutant("bn_momentum_ignored", M, "momentum=0.9,", "momentum=0.99,", ("tests/test_models.py",)),
    Mutant(
        "init_std_ignored",
        M,
        "nn.initializers.normal(stddev=std)",
        "nn.initializers.normal(stddev=0.01)",
        ("tests/test_models.py",),
    ),
    Mutant(
        "staged_init_skips_conv3_2", M, '"conv3_1", "conv3_2", "fc6"', '"conv3_1", "fc6"', ("tests/test_models.py",)
    ),
    # train step: randomness, accumulation, the finite guard
    Mutant(
        "same_dropout_mask_every_step",
        T,
        "rng = jax.random.fold_in(state.dropout_rng, state.step)",
        "rng = state.dropout_rng",
        STEP,
    ),
    Mutant("same_dropout_mask_every_micro_batch", T, "jax.random.fold_in(rng, m)", "rng", STEP),
    Mutant("accumulated_gradient_not_averaged", T, "g / accum_steps", "g", STEP),
    # mesh.grad_reduce_dtype=float32: without the per-device copy JAX sums the gradients itself, in bfloat16
    Mutant(
        "float32_reduction_sums_in_bfloat16_first",
        T,
        'params = jax.lax.pcast(params, data, to="varying")',
        "pass",
        ("tests/test_preflight.py", "-k", "float32_gradient"),
    ),
    # the preflight: a line per compile as it happens; XLA:GPU's shard_map all-reduces share one channel
    Mutant(
        "preflight_output_block_buffered",
        "vgg_jax/preflight.py",
        "config.global_batch_size)]\n    print(results[-1].line(usable), flush=True)",
        "config.global_batch_size)]\n    print(results[-1].line(usable))",
        ("tests/test_preflight.py", "-k", "progress"),
    ),
    Mutant(
        "finite_guard_ignores_gradient",
        T,
        "finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))",
        "finite = jnp.isfinite(loss)",
        STEP,
    ),
    Mutant(
        "batch_stats_not_updated",
        T,
        "batch_stats=new_stats), lambda s: s",
        "batch_stats=s.batch_stats), lambda s: s",
        STEP,
    ),
    Mutant("top1_is_top2", T, "jax.lax.top_k(scores, k)", "jax.lax.top_k(scores, k + 1)", STEP),
    # optimizer and schedules
    Mutant(
        "biases_always_decayed",
        OPT,
        "decay_biases or path[-1].key",
        "True or path[-1].key",
        STEP,
    ),
    Mutant("decay_biases_ignored", OPT, "decay_biases or path[-1].key", "path[-1].key", STEP),
    Mutant("nesterov_ignored", OPT, "nesterov=config.nesterov", "nesterov=False", STEP),
    Mutant(
        "plateau_patience_off_by_one",
        OPT,
        "self.bad_evals >= self.patience",
        "self.bad_evals > self.patience",
        STEP,
    ),
    Mutant(
        "plateau_one_decrease_too_many",
        OPT,
        "self.decreases < self.max_decreases",
        "self.decreases <= self.max_decreases",
        STEP,
    ),
    Mutant(
        "plateau_min_delta_sign",
        OPT,
        "self.best + self.min_delta",
        "self.best - self.min_delta",
        STEP,
    ),
    Mutant(
        "frozen_and_trained_swapped",
        OPT,
        '"train" if re.fullmatch',
        '"freeze" if re.fullmatch',
        STEP,
    ),
    Mutant(
        "step_schedule_never_decays",
        OPT,
        "int(b): config.decay_factor for b",
        "int(b): 1.0 for b",
        STEP,
    ),
    # the training loop
    Mutant(
        "plateau_decision_dropped",
        TR,
        "state = plateau_update(state, plateau, top1, step)",
        "plateau_update(state, plateau, top1, step)",
        (MAIN, "-k", "plateau"),
    ),
    Mutant("plateau_keeps_the_rate", TR, "* plateau.factor", "* 1.0", (MAIN, "-k", "plateau")),
    Mutant(
        "resume_ignores_new_learning_rate",
        TR,
        "state = apply_learning_rate(state, config, plateau, guard.lr_scale)",
        "pass",
        ("tests/test_resume.py", "-k", "learning_rate"),
    ),
    Mutant(
        "rollback_to_the_suspect_step",
        "vgg_jax/rollback.py",
        "return trouble.step - 1 - steps_before",
        "return trouble.step - steps_before",
        ("tests/test_resume.py", "-k", "cannot_cure"),
    ),
    Mutant(
        "rollback_rewinds_the_iterator",
        TR,
        "state, _, meta = restore_step(ckpt, target, config, model, mesh, abstract)",
        "state, ds, meta = restore_step(ckpt, target, config, model, mesh, abstract); train_iter.resume(ds)",
        ("tests/test_rollback.py", "-k", "past_its_batches"),
    ),
    Mutant(
        "new_schedule_resets_momentum",
        OPT,
        "inner_state=old.inner_state,",
        "inner_state=new.inner_state,",
        ("tests/test_resume.py", "-k", "carried"),
    ),
    Mutant(
        "labels_by_position",
        E,
        'labels = local["label"][valid] if member.label_map is None else member.label_map[local["label"][valid]]',
        'labels = local["label"][valid]',
        ("tests/test_evaluate.py", "-k", "folder"),
    ),
    Mutant(
        "iterator_not_restored",
        TR,
        "relayout = train_iter.resume(start.data_states)",
        "relayout = None",
        (MAIN, "-k", "sigkill_then_resume"),
    ),
    Mutant(
        "no_checkpoint_before_evaluation",
        TR,
        "save(step, before_eval=evaluating)",
        "save(step, before_eval=evaluating) if not evaluating else None",
        ("tests/test_resume.py", "-k", "evaluation_error"),
    ),
    # checkpoints
    Mutant(
        "keep_best_keeps_the_worst",
        C,
        "key=lambda s: (self.scores[s], -s)",
        "key=lambda s: (-self.scores[s], -s)",
        ("tests/test_checkpoints.py",),
    ),
    Mutant(
        "checksums_not_compared",
        C,
        'elif got[0] != want["sha256"]:',
        "elif False:",
        ("tests/test_resume.py", "-k", "four_ways or set_aside"),
    ),
    Mutant(
        "resume_does_not_verify",
        C,
        "problems = verify_step(self.directory / str(step), allow_unverified=self.allow_unverified)",
        "problems = []",
        ("tests/test_resume.py", "-k", "set_aside"),
    ),
    Mutant(
        "steps_without_checksums_pass",
        C,
        "        if allow_unverified:\n            return []",
        "        if True:\n            return []",
        ("tests/test_resume.py", "-k", "without_checksums"),
    ),
    Mutant(
        "unfinished_steps_picked",
        C,
        "finished = [p for _, p in steps if is_finalized(p)]",
        "finished = [p for _, p in steps]",
        ("tests/test_gcs.py", "-k", "unfinished"),  # only GCS leaves unfinished numbered steps (docs/training.md)
    ),
    Mutant(
        "a_live_lease_is_taken",
        "vgg_jax/storage.py",
        "            if not free:\n                return record",
        "            if False:\n                return record",
        ("tests/test_storage.py",),
    ),
    # transforms
    Mutant("pca_eigval_on_wrong_scale", X, "tf.float32) * 255.0", "tf.float32)", ("tests/test_transforms.py",)),
    Mutant(
        "always_flipped",
        X,
        "flip = tf.logical_and(config.flip, u[3] < 0.5)",
        "flip = tf.constant(config.flip)",
        ("tests/test_transforms.py",),
    ),
    Mutant(
        "scale_max_never_drawn",
        X,
        "(config.scale_max - config.scale_min + 1)",
        "(config.scale_max - config.scale_min)",
        ("tests/test_transforms.py",),
    ),
    Mutant(
        "mean_added",
        X,
        "shift = -tf.constant(config.mean_rgb",
        "shift = tf.constant(config.mean_rgb",
        ("tests/test_transforms.py",),
    ),
    Mutant("std_ignored", X, "if config.std_rgb != (1.0, 1.0, 1.0):", "if False:", ("tests/test_transforms.py",)),
    Mutant(
        "multicrop_grid_misses_the_border",
        X,
        "(hw[:, None] - c)) // (grid - 1)",
        "(hw[:, None] - c)) // grid",
        ("tests/test_transforms.py",),
    ),
    Mutant(
        "torchvision_crop_offset_floored",
        X,
        "tf.round(tf.cast(size - crop, tf.float64) / 2.0)",
        "tf.floor(tf.cast(size - crop, tf.float64) / 2.0)",
        ("tests/test_preprocessing.py",),
    ),
    # input pipeline
    Mutant(
        "eval_drops_a_partial_last_batch",
        P,
        "num_batches = -(-max(s.num_examples for s in shards) // batch)",
        "num_batches = max(s.num_examples for s in shards) // batch",
        ("tests/test_pipeline.py",),
    ),
    Mutant(
        "same_chunk_order_every_epoch",
        P,
        '_fold(base, _SEED_TAGS["chunks"], epoch)',
        '_fold(base, _SEED_TAGS["chunks"])',
        ("tests/test_pipeline.py",),
    ),
    Mutant(
        "same_augmentation_every_epoch",
        P,
        '_fold(base, _SEED_TAGS["augment"], el["epoch"], el["index"])',
        '_fold(base, _SEED_TAGS["augment"], el["index"])',
        ("tests/test_pipeline.py",),
    ),
    Mutant(
        "resume_repeats_an_example",
        P,
        'int(b["position"][-1]) + 1',
        'int(b["position"][-1])',
        ("tests/test_pipeline.py",),
    ),
    Mutant(
        "process_shards_overlap",
        P,
        "infos[:process_index])",
        "infos[: max(process_index - 1, 0)])",
        ("tests/test_pipeline.py",),
    ),
    # evaluation
    Mutant(
        "dense_without_flip",
        E,
        "batch: Mapping[str, jax.Array], flip: bool = True",
        "batch: Mapping[str, jax.Array], flip: bool = False",
        ("tests/test_evaluate.py",),
    ),
    Mutant(
        "multicrop_only_two_views",
        E,
        "jax.lax.scan(add, first, views[1:])",
        "jax.lax.scan(add, first, views[1:2])",
        ("tests/test_evaluate.py",),
    ),
    Mutant(
        "scales_not_averaged",
        E,
        "sum(p.posteriors.astype(np.float64) for p in group) / len(group)",
        "group[0].posteriors.astype(np.float64)",
        ("tests/test_evaluate.py",),
    ),
    Mutant("top5_is_top4", E, "k5 = min(5, ", "k5 = min(4, ", ("tests/test_evaluate.py",)),
    Mutant(
        "dense_positions_off_by_one",
        E,
        "canvas // models.STRIDE + size // models.STRIDE, 0)",
        "canvas // models.STRIDE + size // models.STRIDE + 1, 0)",
        ("tests/test_evaluate.py",),
    ),
    # conversion
    Mutant(
        "torch_kernel_axes_swapped", V, ".transpose(2, 3, 1, 0)", ".transpose(3, 2, 1, 0)", ("tests/test_convert.py",)
    ),
    Mutant("bgr_weights_not_flipped", V, "if layout in BGR_LAYOUTS:", "if False:", ("tests/test_convert.py",)),
    # diagnostics: per-layer statistics and the stall warning
    Mutant(
        "dead_counts_zero_activations_not_channels",
        DG,
        "1.0 - alive.mean()",
        "1.0 - (x > 0).mean()",
        ("tests/test_diagnostics.py", "-k", "numpy"),
    ),
    Mutant(
        "update_norm_is_the_gradient_norm",
        DG,
        'for kind, tree in (("grad", grads), ("update", updates),',
        'for kind, tree in (("grad", grads), ("update", grads),',
        ("tests/test_diagnostics.py", "-k", "numpy"),
    ),
    Mutant(
        "stall_warning_repeats",
        DG,
        "        self.warned = True\n",
        "",
        ("tests/test_diagnostics.py", "-k", "once"),
    ),
    Mutant(
        "stall_window_never_forgets",
        DG,
        "if s > step - self.steps]",
        "if s > -1]",
        ("tests/test_diagnostics.py", "-k", "once"),
    ),
    Mutant(
        "stall_watch_not_called_by_the_loop",
        TR,
        'stall.update(step, float(scalars["loss"]), lambda: stats_fn(state, batch))',
        "pass",
        ("tests/test_diagnostics.py", "-k", "cannot_learn"),
    ),
    Mutant(
        "stall_margin_ten_times_wider",
        DG,
        "float(config.diagnostics.stall_margin) * self.chance",
        "float(config.diagnostics.stall_margin) * 10 * self.chance",
        ("tests/test_diagnostics.py", "-k", "cannot_learn"),
    ),
    # issue 29: state saved and restored, ranges in the config table, units, CLI defaults, per-image outputs
    Mutant(
        "scores_keep_json_keys",
        TR,
        'scores.update({int(k): v for k, v in meta.get("scores", {}).items()})',
        'scores.update(meta.get("scores", {}))',
        CK,
    ),
    Mutant("pending_eval_forgotten", TR, 'return bool(meta.get("pending_eval"))', "return False", CK),
    Mutant(
        "plateau_load_swaps_counters",
        OPT,
        'int(state["bad_evals"]), int(state["decreases"])',
        'int(state["decreases"]), int(state["bad_evals"])',
        CK,
    ),
    Mutant(
        "plateau_resumes_at_the_base_rate",
        OPT,
        'int(state["bad_evals"]), int(state["decreases"])',
        'int(state["decreases"]), int(state["bad_evals"])',
        (MAIN, "-k", "plateau"),
    ),
    Mutant(
        "rollbacks_not_restored",
        "vgg_jax/rollback.py",
        'self.rollbacks = list(meta.get("rollbacks", []))',
        "self.rollbacks = []",
        CK,
    ),
    Mutant(
        "iterator_skipped_count_not_restored",
        P,
        'self._reporter.count = int(state["skipped"])',
        "self._reporter.count = 0",
        CK,
    ),
    Mutant(
        "momentum_may_be_one",
        CC,
        '"optimizer.momentum": Bound(0, 1, open_high=True)',
        '"optimizer.momentum": Bound(0, 1)',
        ("tests/test_config_checks.py",),
    ),
    Mutant(
        "open_upper_bounds_include_the_end",
        CC,
        "value < self.high if self.open_high",
        "value <= self.high if self.open_high",
        ("tests/test_config_checks.py",),
    ),
    Mutant(
        "spike_factor_zero_refused",
        CC,
        'Bound(1, open_low=True, also=(0,), note="0: no spike rule',
        'Bound(1, open_low=True, note="0: no spike rule',
        ("tests/test_config_checks.py",),
    ),
    Mutant(
        "allowed_resume_changes_ignored",
        CC,
        'resumable(field, config.get("allow_resume_changes", ""))',
        "resumable(field)",
        ("tests/test_config_checks.py",),
    ),
    Mutant(
        "resume_sections_not_matched",
        CC,
        '(r.endswith(".") and field.startswith(r))',
        '(r.endswith(".") and field == r)',
        ("tests/test_config_checks.py",),
    ),
    Mutant("gib_is_a_billion_bytes", HW, "GIB = 2**30", "GIB = 10**9", ("tests/test_preflight.py", "-k", "gib")),
    Mutant(
        "tpu_hbm_in_gb",
        PF,
        'int(hardware.TPU[self.generation]["hbm_gib"] * hardware.GIB)',
        'int(hardware.TPU[self.generation]["hbm_gib"] * 10**9)',
        ("tests/test_preflight.py", "-k", "gib"),
    ),
    Mutant(
        "predictions_of_the_last_pass",
        E,
        "final = sum(p.posteriors.astype(np.float64) for p in passes) / len(passes)",
        "final = passes[-1].posteriors.astype(np.float64)",
        ("tests/test_evaluate.py", "-k", "defaults_to_dense"),
    ),
    Mutant(
        "evaluate_defaults_to_center",
        E,
        'flags.DEFINE_string("protocol", "dense",',
        'flags.DEFINE_string("protocol", "center",',
        ("tests/test_evaluate.py", "-k", "defaults_to_dense"),
    ),
]
