"""``python -m vgg_jax.predict``: unlabelled images (files, folders, globs; any PIL mode) to a CSV of top-k classes
with their names, equal to ``vgg_jax.load(...).predict`` on the same files; quiet output (vgg_jax/predict.py)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vgg_jax import predict
from vgg_jax.errors import UserError

from tiny_runs import user_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of unlabelled images: RGB JPEG and PNG (one in a subfolder), a CMYK JPEG, a grayscale PNG with an
    upper-case suffix, a file that is not an image and one that is not an image file at all."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)

    def pixels(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    (root / "sub").mkdir()
    Image.fromarray(pixels(50, 70)).save(root / "a.jpg")
    Image.fromarray(pixels(64, 40)).save(root / "sub" / "b.png")
    Image.fromarray(pixels(45, 60)).convert("CMYK").save(root / "c_cmyk.jpg")
    Image.fromarray(pixels(40, 40)[..., 0]).save(root / "D_GRAY.PNG")
    (root / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image file")
    return root


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_folders_files_and_globs_name_the_images(photos, tmp_path):
    images = sorted(str(p) for p in photos.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    assert predict.expand([str(photos)]) == sorted(images)  # recursive, any case, .txt left out
    jpegs = [str(photos / name) for name in ("a.jpg", "broken.jpg", "c_cmyk.jpg")]
    assert predict.expand([str(photos / "*.jpg")]) == jpegs
    # Given twice (a file and its folder): once, in the order first given.
    assert predict.expand([str(photos / "sub" / "b.png"), str(photos / "sub")]) == [str(photos / "sub" / "b.png")]
    with pytest.raises(FileNotFoundError):
        predict.expand([str(photos / "missing.jpg")])
    with pytest.raises(UserError, match="matches no file"):
        predict.expand([str(photos / "*.webp")])
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("")
    with pytest.raises(UserError, match="holds no image file"):
        predict.expand([str(tmp_path / "texts")])


def test_predictions_equal_the_notebook_api_with_names_for_every_mode(clf, photos, tmp_path, caplog):
    """Each CSV row is ``clf.predict`` of the same file (read by path through PIL in the notebook API, from bytes
    through etils.epath here): the same classes, names and probabilities. The CMYK and grayscale files are
    classified as PIL's RGB conversion of them; the undecodable file is reported and left out."""
    out = tmp_path / "out" / "preds.csv"
    caplog.set_level("INFO", logger="absl")
    assert predict.main(["--checkpoint=" + str(clf.path), str(photos), "--top_k=3", f"--out={out}"]) == 0
    rows = read_csv(out.read_text())
    files = [r["file"] for r in rows]
    assert files == [f for f in predict.expand([str(photos)]) if not f.endswith("broken.jpg")]
    assert list(rows[0]) == ["file"] + [f"{c}{i}" for i in (1, 2, 3) for c in ("class", "name", "probability")]
    reference = clf.predict(files, top_k=3)  # the notebook API, reading each path itself
    for row, ids, names, probs in zip(rows, reference.ids, reference.names, reference.probabilities):
        assert [int(row[f"class{i}"]) for i in (1, 2, 3)] == list(ids)
        assert [row[f"name{i}"] for i in (1, 2, 3)] == names
        assert names == [clf.class_names[i] for i in ids]
        np.testing.assert_allclose([float(row[f"probability{i}"]) for i in (1, 2, 3)], probs, rtol=1e-5)
    cmyk = Image.open(photos / "c_cmyk.jpg")
    assert cmyk.mode == "CMYK"
    as_rgb = clf.predict(np.asarray(cmyk.convert("RGB")), top_k=3)
    row = next(r for r in rows if r["file"].endswith("c_cmyk.jpg"))
    assert [int(row[f"class{i}"]) for i in (1, 2, 3)] == list(as_rgb.ids[0])
    assert any("skipped" in r.getMessage() and "broken.jpg" in r.getMessage() for r in caplog.records)
    assert any("predicted 5/5 images" in r.getMessage() for r in caplog.records)


def test_stdout_without_out_and_user_errors(clf, photos, capsys):
    assert predict.main([f"--checkpoint={clf.path}", str(photos / "a.jpg"), "--top_k=1"]) == 0
    rows = read_csv(capsys.readouterr().out)
    assert [r["file"] for r in rows] == [str(photos / "a.jpg")] and rows[0]["name1"] in clf.class_names
    with pytest.raises(UserError, match="--top_k=11: the model has 10 classes"):
        predict.main([f"--checkpoint={clf.path}", str(photos / "a.jpg"), "--top_k=11"])
    with pytest.raises(UserError, match="none of the 1 files is an image"):
        predict.main([f"--checkpoint={clf.path}", str(photos / "broken.jpg")])


def test_the_command_streams_quiet_progress_and_writes_the_csv(run, photos, tmp_path):
    """As a user runs it: no TensorFlow banner, no orbax lines, our progress lines; a glob; the CSV file."""
    env = user_env()
    out = tmp_path / "preds.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "vgg_jax.predict", f"--checkpoint={run}", str(photos / "*.jpg"), f"--out={out}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["file"] for r in read_csv(out.read_text())] == [str(photos / "a.jpg"), str(photos / "c_cmyk.jpg")]
    err = proc.stderr
    for noise in ("oneDNN", "absl::InitializeLog", "Metadata file", "orbax", "checkpointer.py"):
        assert noise not in err, err
    assert "3 images to classify" in err and "compiled vgg11" in err and "predicted 3/3 images" in err, err
    assert f"Wrote 2 predictions to {out}" in err
