"""Train step, optimizer and schedule tests (synthetic batches; the data pipeline is not involved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vgg_jax import bench, models, optim, sharding
from vgg_jax import train_step as train_step_lib
from vgg_jax.train_step import create_train_state

from tiny_runs import free_port

# Compiled as the trainer compiles it (jit_train_step's XLA options), without its shardings.
train_step = jax.jit(
    train_step_lib.train_step, static_argnames=("accum_steps",), compiler_options=train_step_lib.compiler_options()
)
WORKER = Path(__file__).with_name("sharded_train_worker.py")


def opt_config(**overrides):
    config = dict(
        learning_rate=0.1,
        momentum=0.9,
        nesterov=False,
        weight_decay=5e-4,
        decay_biases=False,
        schedule="constant",
        decay_factor=0.1,
        step_boundaries=[2],
        warmup_steps=0,
        trainable=".*",
    )
    return ml_collections.ConfigDict(config | overrides)


def tiny_state(name="vgg11", tx=None, **model_overrides):
    options = dict(num_classes=5, width=4, fc_width=16, crop_size=32, init_scheme="glorot") | model_overrides
    model = models.get_model(name, **options)
    return create_train_state(model, tx or optim.make_optimizer(opt_config(), 10), jax.random.PRNGKey(0))


def batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 5, size=n), jnp.int32),
    }


def loss_grads(state, b: dict) -> dict:
    """Gradients of the mean cross-entropy (no dropout in these states), as the train step computes them."""
    return jax.grad(
        lambda p: optax.softmax_cross_entropy_with_integer_labels(
            state.apply_fn({"params": p}, b["image"]), b["label"]
        ).mean()
    )(state.params)


def test_sgd_momentum_and_l2_decay_match_caffe_update_in_float64():
    """Caffe SGD (paper Sect. 3.1): v = mu v - lr (g + wd w) on kernels, v = mu v - lr g on biases; w += v."""
    state = tiny_state(dropout_rate=0.0)
    b = batch()
    grads = loss_grads(state, b)
    w0 = np.asarray(state.params["conv2_1"]["kernel"], np.float64)
    bias0 = np.asarray(state.params["conv2_1"]["bias"], np.float64)
    g = np.asarray(grads["conv2_1"]["kernel"], np.float64)
    gb = np.asarray(grads["conv2_1"]["bias"], np.float64)
    s1, _ = train_step(state, b)
    v = -0.1 * (g + 5e-4 * w0)
    np.testing.assert_allclose(s1.params["conv2_1"]["kernel"], w0 + v, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s1.params["conv2_1"]["bias"], bias0 - 0.1 * gb, rtol=1e-5, atol=1e-7)
    # Second step: the momentum term carries 0.9 of the first update.
    s2, _ = train_step(s1, b)
    w1 = np.asarray(s1.params["conv2_1"]["kernel"], np.float64)
    g1 = np.asarray(loss_grads(s1, b)["conv2_1"]["kernel"], np.float64)
    np.testing.assert_allclose(
        s2.params["conv2_1"]["kernel"], w1 + 0.9 * v - 0.1 * (g1 + 5e-4 * w1), rtol=1e-4, atol=1e-7
    )


def test_decay_biases_option_decays_biases():
    """The first update of make_optimizer's SGD is -lr (g + wd w) where decayed, -lr g elsewhere: kernels
    always; biases and batch-norm scales and offsets only with decay_biases=True (Caffe's decay_mult 0)."""
    params = {
        "conv1_1": {"kernel": jnp.full((3,), 2.0), "bias": jnp.full((3,), 3.0)},
        "bn1_1": {"scale": jnp.full((3,), 4.0), "bias": jnp.full((3,), 5.0)},
    }
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    for decay_biases in (False, True):
        tx = optim.make_optimizer(opt_config(decay_biases=decay_biases, learning_rate=0.1, weight_decay=0.01), 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        for layer, leaf in (("conv1_1", "kernel"), ("conv1_1", "bias"), ("bn1_1", "scale"), ("bn1_1", "bias")):
            w = float(params[layer][leaf][0])
            decayed = leaf == "kernel" or decay_biases
            expected = -0.1 * (0.5 + (0.01 * w if decayed else 0.0))
            np.testing.assert_allclose(
                updates[layer][leaf], expected, rtol=1e-6, err_msg=f"{layer}/{leaf} {decay_biases}"
            )


def test_nesterov_momentum_matches_its_definition():
    """optax's Nesterov SGD (Sutskever et al. 2013, as torch): v = mu v + g; update = -lr (g + mu v)."""
    params = {"fc8": {"kernel": jnp.ones((2,)), "bias": jnp.ones((2,))}}
    g = 0.5
    for nesterov, first, second in (
        (False, -0.1 * g, -0.1 * (0.9 * g + g)),
        (True, -0.1 * (g + 0.9 * g), -0.1 * (g + 0.9 * (0.9 * g + g))),
    ):
        tx = optim.make_optimizer(opt_config(nesterov=nesterov, weight_decay=0.0), 10)
        state = tx.init(params)
        grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, g), params)
        u1, state = tx.update(grads, state, params)
        u2, _ = tx.update(grads, state, params)
        np.testing.assert_allclose(u1["fc8"]["bias"], first, rtol=1e-6, err_msg=str(nesterov))
        np.testing.assert_allclose(u2["fc8"]["bias"], second, rtol=1e-6, err_msg=str(nesterov))


def _update(before, after, layer="fc7"):
    return np.asarray(after.params[layer]["kernel"]) - np.asarray(before.params[layer]["kernel"])


def test_dropout_masks_change_from_step_to_step_and_repeat_at_the_same_step():
    state = tiny_state(dropout_rate=0.5)
    b = batch()
    at_0 = _update(state, train_step(state, b)[0])
    again = _update(state, train_step(state, b)[0])
    at_1 = _update(state, train_step(state.replace(step=state.step + 1), b)[0])
    np.testing.assert_array_equal(at_0, again)  # the mask is a function of (dropout key, step)
    assert not np.allclose(at_0, at_1, rtol=1e-3, atol=1e-8)


def test_micro_batches_draw_their_own_dropout_masks():
    """Each example twice in a row: accumulating over 2 micro-batches averages two copies of the batch, each
    with its own dropout mask. Without dropout that equals one step on the batch; with it, it must not."""
    x = batch(4)
    doubled = {k: jnp.repeat(v, 2, axis=0) for k, v in x.items()}
    for rate in (0.0, 0.5):
        state = tiny_state(dropout_rate=rate)
        single = _update(state, train_step(state, x)[0])
        accumulated = _update(state, train_step(state, doubled, accum_steps=2)[0])
        if rate == 0.0:
            np.testing.assert_allclose(accumulated, single, rtol=1e-4, atol=1e-8)
        else:
            assert not np.allclose(accumulated, single, rtol=1e-3, atol=1e-8)


def test_a_non_finite_gradient_with_a_finite_loss_is_not_applied():
    state = tiny_state(dropout_rate=0.0)
    apply = state.apply_fn

    def apply_fn(variables, x, **kwargs):  # the same logits; d/db sqrt(b - b) is infinite
        logits, updates = apply(variables, x, **kwargs)
        b = variables["params"]["fc8"]["bias"][0]
        return logits + jnp.sqrt(b - jax.lax.stop_gradient(b)), updates

    new, m = train_step(state.replace(apply_fn=apply_fn), batch())
    assert np.isfinite(float(m.compute()["loss"])) and float(m.finite.total) == 0.0
    for x, y in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(new.params)):
        np.testing.assert_array_equal(x, y)


def test_top1_and_top5_metrics_against_numpy():
    state = tiny_state(dropout_rate=0.0)
    b = batch(16, seed=3)
    logits = np.asarray(state.apply_fn({"params": state.params}, b["image"]), np.float64)
    labels = np.asarray(b["label"])
    order = np.argsort(-logits, axis=1)
    summary = train_step(state, b)[1].compute()
    assert summary["top1_error"] == pytest.approx(100 * np.mean(order[:, 0] != labels))
    assert summary["top5_error"] == pytest.approx(100 * np.mean(~(order[:, :5] == labels[:, None]).any(1)))


def test_gradient_accumulation_equals_the_full_batch():
    state = tiny_state(dropout_rate=0.0)
    b = batch(8)
    full, m_full = train_step(state, b)
    accumulated, m_acc = train_step(state, b, accum_steps=4)
    for x, y in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(accumulated.params)):
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(m_full.compute()["loss"], m_acc.compute()["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_full.compute()["top1_error"], m_acc.compute()["top1_error"])


def test_batch_norm_statistics_move_with_each_step():
    """The BN variant's running statistics (torchvision vgg*_bn; flax momentum 0.9) are updated by the step: to
    exactly what the model's own training pass gives for the step's batch and starting parameters."""
    state = tiny_state("vgg11_bn", dropout_rate=0.0)
    b = batch()
    new, _ = train_step(state, b)
    _, expected = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, b["image"], train=True, mutable=["batch_stats"]
    )
    moved = 0
    for path, got in jax.tree_util.tree_leaves_with_path(new.batch_stats):
        before = _leaf(state.batch_stats, path)
        np.testing.assert_allclose(got, _leaf(expected["batch_stats"], path), rtol=1e-5, atol=1e-6)
        moved += not np.allclose(got, before)
    assert moved == len(jax.tree_util.tree_leaves(new.batch_stats))  # every mean and variance changed


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


@pytest.mark.parametrize("name", ["vgg11_lrn", "vgg11_bn"])
def test_remat_gives_the_same_update(name):
    state = tiny_state(name, dropout_rate=0.0)
    b = batch()
    plain, _ = train_step(state, b)
    for policy in ("convs", "blocks"):
        remat, _ = train_step(tiny_state(name, dropout_rate=0.0, remat=policy), b)
        for x, y in zip(
            jax.tree_util.tree_leaves((plain.params, plain.batch_stats)),
            jax.tree_util.tree_leaves((remat.params, remat.batch_stats)),
        ):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="Unknown remat 'some'"):
        train_step(tiny_state(name, remat="some"), b)


def _primitive_counts(fn, *args) -> dict[str, int]:
    counts: dict[str, int] = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def test_remat_recomputes_what_its_policy_drops():
    """VGG-11 has 8 convolutions: a gradient runs 3 per layer (forward, input and kernel gradients,
    less conv1_1's input gradient); ``blocks`` runs each forward once more, ``convs`` only the ReLUs."""
    base = models.get_model("vgg11", num_classes=5, width=4, fc_width=16, crop_size=32)
    params = models.init_variables(base, jax.random.PRNGKey(0))["params"]
    x = jnp.ones((2, 32, 32, 3))
    counts = {
        policy: _primitive_counts(
            jax.grad(lambda p, m=base.clone(remat=policy): m.apply({"params": p}, x).sum()), params
        )
        for policy in ("none", "convs", "blocks")
    }
    assert [counts[p]["conv_general_dilated"] for p in ("none", "convs", "blocks")] == [23, 23, 31]
    relus = counts["none"]["max"]  # the ReLUs of 8 convs and 2 FC layers
    assert counts["convs"]["max"] == relus + 8 and counts["blocks"]["max"] == relus + 8


def test_remat_saves_memory_in_the_compiled_step():
    """XLA must neither merge the recomputation back into the forward pass (XLA:CPU's CSE does,
    unless jit_train_step keeps the checkpoints' optimization barriers) nor keep what it drops."""
    mesh = sharding.make_mesh()
    images = jax.ShapeDtypeStruct((16, 64, 64, 3), jnp.float32)
    batch_spec = {"image": images, "label": jax.ShapeDtypeStruct((16,), jnp.int32)}
    temporaries, convolutions = {}, {}
    for policy in ("none", "convs", "blocks"):
        model = models.get_model("vgg16", num_classes=5, width=8, fc_width=16, crop_size=64, remat=policy)
        state, shardings = train_step_lib.abstract_train_state(model, optim.make_optimizer(opt_config(), 10), mesh)
        step = train_step_lib.jit_train_step(shardings, sharding.batch_sharding(mesh))
        compiled = step.lower(state, batch_spec).compile()
        temporaries[policy] = compiled.memory_analysis().temp_size_in_bytes
        convolutions[policy] = bench.count_convolutions(compiled.as_text())
    # VGG-16: 13 forward, 13 kernel-gradient and 12 input-gradient convolutions; blocks: 13 more.
    assert convolutions == {"none": 38, "convs": 38, "blocks": 51}
    assert temporaries["convs"] < 0.75 * temporaries["none"], temporaries
    assert temporaries["blocks"] < 0.75 * temporaries["none"], temporaries


def test_non_finite_loss_leaves_the_state_unchanged():
    state = tiny_state()
    b = batch()
    b["image"] = b["image"].at[0, 0, 0, 0].set(jnp.nan)
    new, m = train_step(state, b)
    assert float(m.finite.total) == 0.0
    for x, y in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(new.params)):
        np.testing.assert_array_equal(x, y)
    _, m_ok = train_step(state, batch())
    assert float(m_ok.finite.total) == 1.0


def test_loss_falls_on_a_fixed_batch_and_metrics_are_sane():
    state = tiny_state("vgg11_bn", tx=optim.make_optimizer(opt_config(learning_rate=0.05), 10), init_scheme="he")
    b = batch(16)
    losses = []
    for _ in range(8):
        state, m = train_step(state, b)
        losses.append(float(m.compute()["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    summary = m.compute()
    assert 100.0 >= summary["top1_error"] >= summary["top5_error"] >= 0.0


def test_set_learning_rate_drives_the_next_update_and_the_metric_reports_it():
    """fc8's first bias update is -lr * its gradient (biases are not decayed; no momentum yet)."""
    state = tiny_state(dropout_rate=0.0)
    b = batch()
    grad = loss_grads(state, b)["fc8"]["bias"]
    state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, 1e-3))
    new, m = train_step(state, b)
    np.testing.assert_allclose(
        new.params["fc8"]["bias"] - state.params["fc8"]["bias"], -1e-3 * grad, rtol=1e-4, atol=1e-10
    )
    assert float(m.compute()["learning_rate"]) == pytest.approx(1e-3)


def test_frozen_layers_do_not_move():
    tx = optim.make_optimizer(opt_config(trainable="fc8"), 10)
    state = tiny_state(tx=tx, dropout_rate=0.0)
    new, _ = train_step(state, batch())
    np.testing.assert_array_equal(new.params["conv1_1"]["kernel"], state.params["conv1_1"]["kernel"])
    assert not np.allclose(new.params["fc8"]["kernel"], state.params["fc8"]["kernel"])


def test_schedules():
    step = optim.learning_rate_schedule(opt_config(schedule="step", step_boundaries=[2, 4]), 10)
    assert [float(step(i)) for i in (0, 2, 4)] == pytest.approx([0.1, 0.01, 0.001])
    cosine = optim.learning_rate_schedule(opt_config(schedule="cosine", warmup_steps=2), 10)
    assert float(cosine(2)) == pytest.approx(0.1) and float(cosine(10)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="Unknown schedule 'linear'"):
        optim.learning_rate_schedule(opt_config(schedule="linear"), 10)


def test_step_schedule_warms_up_linearly_and_keeps_its_boundaries():
    """Goyal et al. (2017) Sect. 2.2: a gradual warm-up from 0 to the rate, then the step decays at their steps."""
    step = optim.learning_rate_schedule(opt_config(schedule="step", step_boundaries=[6], warmup_steps=4), 10)
    assert [float(step(i)) for i in (0, 1, 2, 4, 5, 6)] == pytest.approx([0.0, 0.025, 0.05, 0.1, 0.1, 0.01])


def test_linear_scaling_rule_is_applied_once_where_training_resolves_its_config(caplog):
    """lr_base_batch=N: the rate was chosen for a global batch of N and scales by global_batch / N (Goyal et al.
    2017, Sect. 2.1; timm's --lr-base-size); the resolved config stores the scaled rate and no rule, so a resumed
    run, resolved again, sees no change. 0 keeps the rate; a negative value is refused before anything runs."""
    from configs import default
    from vgg_jax import config_checks, train
    from vgg_jax.errors import ConfigError

    config = default.get_config()
    config.global_batch_size, config.optimizer.lr_base_batch = 512, 256  # e.g. --batch_per_chip=64 on 8 chips
    resolved = train.resolve(config)
    assert resolved.optimizer.learning_rate == pytest.approx(0.02) and resolved.optimizer.lr_base_batch == 0
    assert train.resolve(resolved).optimizer.learning_rate == pytest.approx(0.02)  # applied once
    assert any("without a warm-up" in r.getMessage() for r in caplog.records)  # plateau has none
    assert config_checks.resume_changes(json.loads(resolved.to_json()), train.resolve(config)) == ([], [])
    config.optimizer.lr_base_batch = 0
    assert train.resolve(config).optimizer.learning_rate == pytest.approx(0.01)
    config.optimizer.lr_base_batch = -256
    with pytest.raises(ConfigError, match="--config.optimizer.lr_base_batch=-256: must be an integer >= 0"):
        config_checks.validate(config)
    # What a tool that derives the global batch from the hardware says (preflight's --batch_per_chip).
    config.optimizer.lr_base_batch = 0
    note = optim.batch_note(config, 256)
    assert "global batch 512 instead of the config's 256: the learning rate stays 0.01, chosen for 256" in note
    assert "--config.optimizer.lr_base_batch=256" in note
    config.optimizer.lr_base_batch = 256
    assert "learning rate 0.01 x 512/256 = 0.02" in optim.batch_note(config, 256)
    assert optim.batch_note(config, 512) is None


def test_plateau_divides_by_ten_three_times_at_most():
    p = optim.Plateau(patience=1)
    accuracies = [0.1, 0.2, 0.2, 0.3, 0.25, 0.3, 0.3, 0.3, 0.3]
    decisions = [p.update(a) for a in accuracies]
    assert decisions == [False, False, True, False, True, True, False, False, False]
    assert p.decreases == 3
    restored = optim.Plateau()
    restored.load(p.state())
    assert restored.state() == p.state()


def test_plateau_counts_only_improvements_of_at_least_min_delta():
    """As keras.callbacks.ReduceLROnPlateau(mode='max', min_delta=...): an accuracy must beat the best by more
    than min_delta to count as an improvement."""
    p = optim.Plateau(patience=1, min_delta=0.01)
    decisions = [p.update(a) for a in (0.50, 0.505, 0.52, 0.525, 0.531)]
    assert decisions == [False, True, False, True, False]
    assert p.best == 0.531


def _run_workers(tmp_path, name, num_processes, devices, *extra):
    out = tmp_path / f"{name}.npz"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(out),
                "--devices",
                str(devices),
                "--process_id",
                str(i),
                "--num_processes",
                str(num_processes),
                "--port",
                str(port),
                *extra,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(num_processes)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return dict(np.load(out)), logs


def _assert_same_params(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=1e-5, err_msg=key)


def test_two_processes_equal_one_process(tmp_path):
    """2 processes x 2 CPU devices (gloo, localhost) end where 1 process x 4 devices does."""
    one, _ = _run_workers(tmp_path, "one", 1, 4)
    two, _ = _run_workers(tmp_path, "two", 2, 2)
    _assert_same_params(one, two)


def test_fc_sharding_equals_replicated(tmp_path):
    """fc6/fc7 split over a model axis of 2 (8 devices as 4 x 2) equals the replicated run."""
    replicated, _ = _run_workers(tmp_path, "replicated", 1, 8)
    sharded, logs = _run_workers(tmp_path, "sharded", 1, 8, "--model_axis", "2")
    assert "fc6 shard shape (1, 1, 32, 16)" in logs[0]
    _assert_same_params(replicated, sharded)


def test_gradient_accumulation_on_a_mesh_equals_the_full_batch(tmp_path):
    """Micro-batches taken from each device's own share (no BN, no dropout: exactly the same gradient); the same
    with the gradients reduced in float32 (mesh.grad_reduce_dtype: each device's gradient, then one float32 mean
    over the data axis, here 4 devices x fc6/fc7 split over a model axis of 2)."""
    full, _ = _run_workers(tmp_path, "full", 1, 4, "--plain")
    accumulated, _ = _run_workers(tmp_path, "accumulated", 1, 4, "--plain", "--accum", "2")
    _assert_same_params(full, accumulated)
    args = ("--plain", "--accum", "2", "--model_axis", "2", "--reduce", "float32")
    reduced, _ = _run_workers(tmp_path, "float32", 1, 8, *args)
    _assert_same_params(full, reduced)
