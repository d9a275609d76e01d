"""The paper's evaluation protocols (vgg_jax.evaluate): dense, multi-crop, multi-scale, combined,
ensembles, and the counting of every validation image exactly once on 1 and 2 processes.

References are independent of the evaluator: each image evaluated alone with ``model.apply``
(numpy float64 soft-max and averaging), the pipeline's own views, per-image loops.
"""

from __future__ import annotations

import collections
import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_jax import checkpoints, data, evaluate, models, sharding
from vgg_jax.data import demo

from tiny_runs import TRAINING_DEVICES, free_port

REPO = Path(__file__).resolve().parents[1]


def softmax64(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@functools.cache
def jitted(model):
    return jax.jit(model.apply, static_argnames=("train", "dense"))


def alone_dense(model, variables, image: np.ndarray) -> np.ndarray:
    """Dense evaluation of one unpadded image by itself: soft-max of the mean score map."""
    scores = jitted(model)(variables, jnp.asarray(image)[None], dense=True)
    return softmax64(np.asarray(scores, np.float64).mean(axis=(1, 2)))[0]


dense = jax.jit(evaluate.dense_posteriors, static_argnames=("apply_fn", "flip"))
multicrop = jax.jit(evaluate.multicrop_posteriors, static_argnames="apply_fn")


def random_model(name: str, seed: int = 0):
    """A tiny model of ``name`` with random parameters and, for BN, random running statistics."""
    model = models.get_model(name, num_classes=7, width=4, fc_width=16, crop_size=32, init_scheme="glorot")
    variables = models.init_variables(model, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: (
            v + 0.2 * jax.random.normal(next(keys), v.shape) if "bias" in str(path) or "scale" in str(path) else v
        ),
        variables,
    )
    if "batch_stats" in variables:
        variables["batch_stats"] = jax.tree_util.tree_map(
            lambda v: jnp.abs(v) + jax.random.uniform(next(keys), v.shape), variables["batch_stats"]
        )
    return model, variables


# ----------------------------------------------------------------------------------------------
# Dense evaluation


@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "vgg11_lrn"])
def test_dense_padded_image_equals_the_image_alone(name):
    """Images of several sizes on one canvas (top-left, zero padding) give, with and without the
    flip, exactly the soft-max of each image evaluated by itself."""
    model, variables = random_model(name)
    rng = np.random.default_rng(0)
    canvas = (64, 96)
    sizes = [(64, 96), (40, 52), (33, 95), (64, 37), (32, 32)]  # full, odd, thin, portrait, crop size
    image = np.zeros((len(sizes), *canvas, 3), np.float32)
    for i, (h, w) in enumerate(sizes):
        image[i, :h, :w] = rng.normal(0, 60, (h, w, 3))
    batch = {
        "image": jnp.asarray(image),
        "height": jnp.array([h for h, _ in sizes]),
        "width": jnp.array([w for _, w in sizes]),
    }
    plain = np.asarray(dense(model.apply, variables, batch, flip=False), np.float64)
    flipped = np.asarray(dense(model.apply, variables, batch), np.float64)
    for i, (h, w) in enumerate(sizes):
        alone = alone_dense(model, variables, image[i, :h, :w])
        mirror = alone_dense(model, variables, image[i, :h, :w][:, ::-1])
        np.testing.assert_allclose(plain[i], alone, atol=2e-6, err_msg=str(sizes[i]))
        np.testing.assert_allclose(flipped[i], 0.5 * (alone + mirror), atol=2e-6, err_msg=str(sizes[i]))
    # Without the per-layer zeroing the padding leaks into the border positions: the test can fail.
    leaky = jitted(model)(variables, jnp.asarray(image[1:2]), dense=True)
    rows = int(evaluate.valid_positions(jnp.array(40), 64, leaky.shape[1]))
    cols = int(evaluate.valid_positions(jnp.array(52), 96, leaky.shape[2]))
    leaky = softmax64(np.asarray(leaky[0, :rows, :cols], np.float64).mean((0, 1)))
    assert np.abs(leaky - alone_dense(model, variables, image[1, :40, :52])).max() > 1e-4


def test_valid_positions_match_the_score_map_of_the_image_alone():
    model, variables = random_model("vgg11")
    canvas = (160, 224)
    canvas_map = jax.eval_shape(lambda x: model.apply(variables, x, dense=True), jnp.zeros((1, *canvas, 3))).shape
    for size in range(32, 161, 7):
        alone = jax.eval_shape(lambda x: model.apply(variables, x, dense=True), jnp.zeros((1, size, size, 3))).shape
        assert int(evaluate.valid_positions(jnp.array(size), canvas[0], canvas_map[1])) == alone[1]
        assert int(evaluate.valid_positions(jnp.array(size), canvas[1], canvas_map[2])) == alone[2]


def test_dense_evaluation_of_a_crop_size_image_is_the_plain_classification(clf):
    """Crop-size images (alone, or at the corner of a larger canvas in a batch with larger images)."""
    cfg = clf.config.data.copy_and_resolve_references()
    cfg.eval_split = "validation[:4]"
    crops = next(iter(data.create_eval_iterator(cfg, view="center", scale=36, global_batch_size=4)))["image"]
    apply = jitted(clf.model)
    plain = softmax64(apply(clf.variables, crops))
    mirrored = softmax64(apply(clf.variables, crops[:, :, ::-1]))
    c = clf.crop_size
    alone = {"image": crops, "height": np.full(4, c), "width": np.full(4, c)}
    np.testing.assert_allclose(dense(clf.apply_fn, clf.variables, alone, flip=False), plain, atol=1e-6)
    np.testing.assert_allclose(dense(clf.apply_fn, clf.variables, alone), 0.5 * (plain + mirrored), atol=1e-6)
    canvas = np.random.default_rng(1).normal(0, 50, (6, 2 * c, 3 * c, 3)).astype(np.float32)
    canvas[:4] = 0.0
    canvas[:4, :c, :c] = crops
    padded = {"image": canvas, "height": np.array([c] * 4 + [2 * c] * 2), "width": np.array([c] * 4 + [3 * c] * 2)}
    np.testing.assert_allclose(dense(clf.apply_fn, clf.variables, padded, flip=False)[:4], plain, atol=1e-6)


def test_flip_within_mirrors_only_the_image():
    image = np.arange(2 * 1 * 5 * 3, dtype=np.float32).reshape(2, 1, 5, 3)
    out = np.asarray(evaluate.flip_within(jnp.asarray(image), jnp.array([3, 5])))
    np.testing.assert_array_equal(out[0, 0], image[0, 0, [2, 1, 0, 3, 4]])
    np.testing.assert_array_equal(out[1, 0], image[1, 0, ::-1])


# ----------------------------------------------------------------------------------------------
# Multi-crop


def test_multicrop_reduced_to_the_centre_crop_is_the_centre_protocol(clf):
    cfg = clf.config.data.copy_and_resolve_references()
    cfg.eval_split = "validation[:5]"
    center = next(iter(data.create_eval_iterator(cfg, view="center", scale=40, global_batch_size=5)))
    grid = next(iter(data.create_eval_iterator(cfg, view="multicrop", scale=40, global_batch_size=5)))
    center, grid = ({k: v for k, v in b.items() if k != "file_name"} for b in (center, grid))
    expected = np.asarray(evaluate.center_posteriors(clf.apply_fn, clf.variables, center))
    one_view = {"image": center["image"][:, None]}
    np.testing.assert_allclose(multicrop(clf.apply_fn, clf.variables, one_view), expected, atol=1e-6)
    # The grid's middle crop (row 2, column 2 of 5x5) is the centre crop, up to resampling round-off.
    np.testing.assert_allclose(grid["image"][:, 12], center["image"], atol=0.01)
    middle = {"image": grid["image"][:, 12:13]}
    np.testing.assert_allclose(multicrop(clf.apply_fn, clf.variables, middle), expected, atol=1e-4)
    # All 50 views: the mean of the views' soft-max, each view classified on its own.
    apply = jitted(clf.model)
    per_view = np.stack([softmax64(apply(clf.variables, grid["image"][:, v])) for v in range(50)], 1)
    np.testing.assert_allclose(multicrop(clf.apply_fn, clf.variables, grid), per_view.mean(1), atol=1e-6)


def test_150_crops_at_3_scales_each_evaluated_exactly_once(clf):
    """Every crop the model sees is recorded; they are the pipeline's 50 views x 3 scales of each
    image, each exactly once (padding rows are all zeros)."""
    cfg = clf.config.data.copy_and_resolve_references()
    cfg.eval_split = "validation[:5]"
    scales = (36, 48, 64)
    seen: list[np.ndarray] = []

    def recording_apply(variables, x, **kwargs):
        jax.debug.callback(lambda crops: seen.extend(np.array(crops)), x)
        return clf.model.apply(variables, x, **kwargs)

    member = evaluate.Member("recorded", recording_apply, clf.variables, cfg)
    report = evaluate.evaluate_members(
        [member], sharding.make_mesh(), protocol="multicrop", scales=scales, batch_size=3
    )
    assert report.results["images"] == 5
    real = [crop.tobytes() for crop in seen if np.any(crop)]
    expected = []
    for q in scales:
        for batch in data.create_eval_iterator(cfg, view="multicrop", scale=q, global_batch_size=3):
            expected += [view.tobytes() for views in batch["image"][batch["valid"]] for view in views]
    assert len(expected) == 5 * 150
    assert len(real) == 5 * 150
    assert collections.Counter(real) == collections.Counter(expected)
    assert len(seen) == 2 * 3 * 50 * 3  # 2 batches of 3 images per scale: one padding row per scale


# ----------------------------------------------------------------------------------------------
# Whole passes: combining, counting, ensembles


def per_image_center(models_and_variables, cfg, scale: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels and, per model, float64 centre-view posteriors, one image at a time, in split order."""
    labels, posteriors = [], [[] for _ in models_and_variables]
    for batch in data.create_eval_iterator(cfg, view="center", scale=scale, global_batch_size=1):
        if batch["valid"][0]:
            labels.append(int(batch["label"][0]))
            for out, (model, variables) in zip(posteriors, models_and_variables):
                out.append(softmax64(jitted(model)(variables, batch["image"]))[0])
    return np.array(labels), [np.array(p) for p in posteriors]


def error(posteriors: np.ndarray, labels: np.ndarray, k: int) -> float:
    top = np.argsort(-posteriors, axis=1, kind="stable")[:, :k]
    return 100.0 * (1.0 - np.mean((top == labels[:, None]).any(1)))


def test_multiscale_and_ensemble_average_per_image_posteriors(clf):
    """Centre protocol at two scales for an ensemble of the trained model and a random one,
    against per-image loops: errors of each scale, of each model over scales, of the ensemble."""
    cfg = clf.config.data.copy_and_resolve_references()
    cfg.eval_split = "validation[:7]"
    other_model = clf.model.clone(init_scheme="paper", init_std=0.05)
    other_vars = models.init_variables(other_model, jax.random.key(3))
    members = [
        evaluate.Member("trained", clf.apply_fn, clf.variables, cfg),
        evaluate.Member("random", other_model.apply, other_vars, cfg),
    ]
    report = evaluate.evaluate_members(members, sharding.make_mesh(), protocol="center", scales=(36, 52), batch_size=4)
    res = report.results
    ref = {}
    for q in (36, 52):
        labels, (ref["trained", q], ref["random", q]) = per_image_center(
            [(clf.model, clf.variables), (other_model, other_vars)], cfg, q
        )
    for name in ("trained", "random"):
        for q in (36, 52):
            assert res[f"{name}/top1_error@{q}"] == pytest.approx(error(ref[name, q], labels, 1))
            assert res[f"{name}/top5_error@{q}"] == pytest.approx(error(ref[name, q], labels, 5))
        assert res[f"{name}/top1_error"] == pytest.approx(error((ref[name, 36] + ref[name, 52]) / 2, labels, 1))
    ensemble = sum(ref.values()) / 4
    assert res["top1_error"] == pytest.approx(error(ensemble, labels, 1))
    assert res["top5_error"] == pytest.approx(error(ensemble, labels, 5))
    assert res["images"] == 7
    table = report.markdown().splitlines()
    assert table[0].startswith("| ConvNet | train (S) | test (Q) | method | top-1 val. error (%)")
    assert len(table) == 2 + 2 * 3 + 1 and "ensemble of trained, random" in table[-1]


def test_scales_are_combined_by_averaging_posteriors_not_by_taking_one():
    """Multi-scale evaluation averages the soft-max posteriors of the scales per image (paper Sect. 4.2),
    on posteriors made so that each scale alone errs on other images and their average errs on none."""
    labels = np.array([0, 1, 2, 0])
    at_36 = np.array([[0.4, 0.6, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8], [0.7, 0.3, 0.0]])  # image 0 wrong
    at_52 = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [0.4, 0.6, 0.0]])  # images 1, 3 wrong

    def one_pass(scale: int, posteriors: np.ndarray) -> evaluate.Pass:
        names = np.array([""] * 4)
        return evaluate.Pass("m", "center", scale, np.arange(4), labels, posteriors.astype(np.float32), names, 0, 4)

    _, results = evaluate.combine([one_pass(36, at_36), one_pass(52, at_52)], ["m"], ("center",), (36, 52))
    assert (results["top1_error@36"], results["top1_error@52"]) == (error(at_36, labels, 1), error(at_52, labels, 1))
    assert (results["top1_error@36"], results["top1_error@52"]) == (25.0, 50.0)
    assert results["top1_error"] == error((at_36 + at_52) / 2, labels, 1) == 0.0


def test_training_loop_keys_and_unknown_protocol(clf):
    cfg = clf.config.data.copy_and_resolve_references()
    cfg.eval_split = "validation[:3]"
    results = evaluate.evaluate(clf.apply_fn, clf.variables, cfg, sharding.make_mesh(), protocol="center", batch_size=2)
    assert set(results) == {"top1_error@36", "top5_error@36", "images"}
    assert results["images"] == 3 and "top1_error" not in results  # one scale: one key per figure
    with pytest.raises(ValueError, match="Unknown or repeated evaluation method.*'dense\\+multicrop'"):
        evaluate.evaluate(clf.apply_fn, clf.variables, cfg, sharding.make_mesh(), protocol="dense+crops")


def test_paper_scales():
    cfg = data.default_data_config()
    cfg.scale_min = cfg.scale_max = 384
    assert evaluate.paper_scales(cfg) == (352, 384, 416)
    cfg.scale_min, cfg.scale_max = 256, 512
    assert evaluate.paper_scales(cfg) == (256, 384, 512)


CLI = ["--protocol=dense+multicrop", "--scales=36,48", "--data.eval_split=validation[:13]", "--batch_size=4"]


def test_cli_counts_every_image_once_on_1_and_2_processes(run, tmp_path):
    """13 images in global batches of 4: one process (3 full batches and 1 image + 3 padding rows
    per view) and two jax.distributed processes on localhost asking for batches of 7 (padded to 8: 7
    and 6 images in batches of 4) agree on every result and on the per-image predictions, and both
    count each image once."""
    one_csv, two_csv = tmp_path / "one.csv", tmp_path / "two.csv"
    report = evaluate.main([f"--checkpoint={run}", *CLI, f"--out={tmp_path / 'one'}", f"--predictions={one_csv}"])
    one = report.results
    assert one["images"] == 13
    rows = list(csv.DictReader(one_csv.open()))
    assert [int(r["index"]) for r in rows] == list(range(13))
    labels = [int(r["label"]) for r in rows]
    assert [r["label_name"] for r in rows] == [demo.CLASS_NAMES[k] for k in labels]
    top1 = [int(r["top1"]) for r in rows]
    assert np.mean([t != k for t, k in zip(top1, labels)]) * 100 == pytest.approx(one["top1_error"])
    scores = np.array([[float(r[f"score{i}"]) for i in range(1, 6)] for r in rows])
    assert np.all(np.diff(scores, axis=1) <= 0) and np.all(scores.sum(1) <= 1 + 1e-5)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vgg_jax.evaluate",
                f"--checkpoint={run / 'checkpoints'}",
                *CLI,
                "--batch_size=7",
                f"--predictions={two_csv}",
                "--distributed.enabled=True",
                f"--distributed.coordinator_address=127.0.0.1:{port}",
                "--distributed.num_processes=2",
                f"--distributed.process_id={i}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    written = json.loads((run / "eval" / "dense+multicrop_36-48.json").read_text())  # the default --out
    assert written["results"] == pytest.approx(one, abs=1e-9)
    assert "| vgg11 | [36;64] | 36,48 | dense+multicrop |" in outputs[0][0]
    assert "| ConvNet |" not in outputs[1][0]  # only process 0 prints and writes
    md = (tmp_path / "one" / "dense+multicrop_36-48.md").read_text().splitlines()
    assert len(md) == 2 + 2 * (2 + 1) + 1
    two = list(csv.DictReader(two_csv.open()))  # gathered from both processes
    assert [r["index"] for r in two] == [r["index"] for r in rows] and [r["top1"] for r in two] == [
        str(t) for t in top1
    ]
    np.testing.assert_allclose([float(r["score1"]) for r in two], scores[:, 0], rtol=1e-4)


def test_cli_defaults_to_dense_and_writes_each_images_mean_posteriors(run, clf, tmp_path):
    """docs/evaluation.md: --protocol defaults to dense. The --predictions CSV holds, for every image, the top-5
    classes and posteriors of the mean (numpy float64) of the protocol's passes, here dense at Q=36 and Q=52,
    each evaluated alone."""
    split, scales = "validation[:5]", (36, 52)
    csv_path = tmp_path / "p.csv"
    flags = [f"--checkpoint={run}", "--scales=36,52", f"--data.eval_split={split}", "--batch_size=4"]
    evaluate.main([*flags, f"--out={tmp_path}", f"--predictions={csv_path}"])
    assert json.loads((tmp_path / "dense_36-52.json").read_text())["protocol"] == "dense"
    cfg = clf.config.data.copy_and_resolve_references()
    cfg.eval_split = split
    member = evaluate.Member("vgg11", clf.apply_fn, clf.variables, cfg)
    passes = [
        evaluate.evaluate_members([member], sharding.make_mesh(), protocol="dense", scales=(q,), batch_size=4).final
        for q in scales
    ]
    assert all(np.array_equal(p.index, np.arange(5)) for p in passes)
    mean = np.mean([p.posteriors.astype(np.float64) for p in passes], axis=0)
    rows = list(csv.DictReader(csv_path.open()))
    assert [int(r["index"]) for r in rows] == list(range(5))
    for r, want in zip(rows, mean):
        top = np.argsort(-want, kind="stable")[:5]
        assert [int(r[f"top{i}"]) for i in range(1, 6)] == list(top)
        np.testing.assert_allclose([float(r[f"score{i}"]) for i in range(1, 6)], want[top], rtol=2e-5)


def test_cli_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main([])
    assert "give --checkpoint=PATH" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="No complete checkpoint under"):
        evaluate.main([f"--checkpoint={tmp_path}"])
    with pytest.raises(ValueError, match="'dense\\+multicrop'"):
        evaluate.main([f"--checkpoint={tmp_path}", "--protocol=dense,multicrop"])
    with pytest.raises(ValueError, match="comma-separated integers"):
        evaluate.parse_scales("256;384")


def test_default_output_directory(tmp_path):
    assert str(evaluate.default_out(str(tmp_path))) == str(tmp_path / "eval")
    assert str(evaluate.default_out(str(tmp_path / "checkpoints"))) == str(tmp_path / "eval")
    assert str(evaluate.default_out(str(tmp_path / "checkpoints" / "12"))) == str(tmp_path / "eval")
    assert str(evaluate.default_out("gs://bucket/run/checkpoints/12")) == "gs://bucket/run/eval"  # not ./gs:/...


def test_checkpoint_trained_on_two_devices(run):
    """The fixture's run really used 2 devices (its mesh is in the checkpoint metadata)."""
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(checkpoints.find_checkpoint(run) / "state").item_metadata
    assert list(meta["params"]["fc8"]["bias"].sharding.shape) == [TRAINING_DEVICES, 1]
    assert jax.device_count() == 1


def _demo_folder(root: Path, data_dir: str, classes: tuple[str, ...], per_class: int) -> Path:
    """``root/{train,val}/<class>/`` with ``per_class`` demo validation images of each of ``classes``."""
    import tensorflow_datasets as tfds

    import ilsvrc_fixture as fx

    cfg = data.default_data_config()
    cfg.data_dir = data_dir
    builder = data.sources.get_source(cfg).builder
    files = collections.defaultdict(list)
    for example in tfds.as_numpy(
        builder.as_dataset(split="validation", decoders={"image": tfds.decode.SkipDecoding()})
    ):
        name = demo.CLASS_NAMES[int(example["label"])]
        if name in classes and len(files[name]) < per_class:
            files[name].append((f"{name}_{len(files[name])}.png", example["image"]))
    fx.write_folder(str(root), {"train": dict(files), "val": dict(files)})
    return root


def test_a_folder_is_labelled_by_class_name_not_by_position(run, tmp_path, data_dir):
    """Issue 27, item 6: the checkpoint's 10 classes as folders (sorted, so in another order than its own):
    every prediction row names its folder's class, and the errors are counted against those labels."""
    folder = _demo_folder(tmp_path / "pets", data_dir, demo.CLASS_NAMES, per_class=3)
    assert sorted(demo.CLASS_NAMES) != list(demo.CLASS_NAMES)
    where = [f"--data.folder={folder}", f"--data.data_dir={tmp_path / 'tfds'}", "--protocol=center", "--scales=36"]
    where.append("--data.eval_split=validation")
    csv_path = tmp_path / "p.csv"
    report = evaluate.main([f"--checkpoint={run}", "--data.dataset=folder", *where, f"--predictions={csv_path}"])
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 30 and report.results["images"] == 30
    for r in rows:
        assert r["label_name"] == r["file_name"].split("/")[1], r  # val/<class>/<file>
        assert demo.CLASS_NAMES[int(r["label"])] == r["label_name"]
    wrong = np.mean([r["top1"] != r["label"] for r in rows])
    assert report.results["top1_error@36"] == pytest.approx(100 * wrong)


def test_a_folder_of_other_classes_is_an_error(run, tmp_path, data_dir):
    folder = _demo_folder(tmp_path / "three", data_dir, demo.CLASS_NAMES[:3], per_class=1)
    for cls in demo.CLASS_NAMES[:2]:  # two classes renamed: names the checkpoint does not know
        os.rename(folder / "train" / cls, folder / "train" / f"{cls}_renamed")
        os.rename(folder / "val" / cls, folder / "val" / f"{cls}_renamed")
    where = [f"--data.folder={folder}", f"--data.data_dir={tmp_path / 'tfds'}", "--protocol=center", "--scales=36"]
    where.append("--data.eval_split=validation")
    with pytest.raises(evaluate.ConfigError) as e:
        evaluate.main([f"--checkpoint={run}", "--data.dataset=folder", *where])
    message = str(e.value)
    assert "\n" not in message and "(3 classes) are not those of" in message and "(10 classes)" in message
    assert "'horizontal_stripes_renamed'" in message and "labels cannot be matched by name" in message
