"""Classify unlabelled images: ``python -m vgg_jax.predict --checkpoint=DIR IMAGES_OR_FOLDERS_OR_GLOBS [--out=x.csv]``.

docs/evaluation.md#predicting-images
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from absl import flags, logging
from etils import epath

from vgg_jax import cli
from vgg_jax.classifier import Classifier, load
from vgg_jax.errors import UserError

# What a folder is searched for (case-insensitive), as torchvision's ImageFolder and timm's inference.py do.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_GLOB = "*?["


def expand(inputs: Sequence[str]) -> list[str]:
    """The image files named by ``inputs``: files as given, every image file under a folder (recursively,
    sorted), the matches of a glob pattern (``photos/*.jpg``, ``gs://bucket/x/*.png``). Local or gs:// alike
    (etils.epath, tf.io.gfile). A name that matches nothing is a user error."""
    files: list[str] = []
    for spec in inputs:
        if any(c in spec for c in _GLOB):
            tf = cli.import_tensorflow()
            found = sorted(tf.io.gfile.glob(spec))
            if not found:
                raise UserError(f"{spec!r} matches no file: check the pattern (quote it so that the shell keeps it).")
            files += found
            continue
        path = epath.Path(spec)
        if path.is_dir():
            found = sorted(
                str(root / name)
                for root, _, names in path.walk()
                for name in names
                if epath.Path(name).suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise UserError(f"folder {spec!r} holds no image file ({', '.join(IMAGE_SUFFIXES)}).")
            files += found
        elif path.exists():
            files.append(spec)
        else:
            raise FileNotFoundError(2, "No such image file or folder", spec)
    return list(dict.fromkeys(files))


def read_image(name: str) -> Any:
    """A PIL image decoded from the file's bytes (read through etils.epath: local or gs://); None if the bytes
    are not an image PIL can decode."""
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    data = epath.Path(name).read_bytes()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, UnidentifiedImageError):
        return None
    return image


def predict_files(
    clf: Classifier, files: Sequence[str], top_k: int = 5, every_secs: float = 30.0
) -> Iterator[tuple[str, list[int], list[str], list[float]]]:
    """(file, top-k class ids, their names, probabilities) per readable file, in order, ``clf.batch_size`` images
    at a time, logging progress (done/total, images/s) every ``every_secs`` and each compile. Unreadable files
    are logged and left out."""
    started, last_report, done, skipped = time.perf_counter(), time.perf_counter(), 0, []
    for start in range(0, len(files), clf.batch_size):
        chunk = files[start : start + clf.batch_size]
        images = [(f, read_image(f)) for f in chunk]
        for f, image in images:
            if image is None:
                skipped.append(f)
                logging.warning("skipped %s: not an image PIL can decode", f)
        readable = [(f, image) for f, image in images if image is not None]
        if readable:
            compiled, t = clf._probabilities._cache_size(), time.perf_counter()  # noqa: SLF001
            out = clf.predict([image for _, image in readable], top_k=top_k)
            if clf._probabilities._cache_size() > compiled:  # noqa: SLF001
                logging.info(
                    "compiled %s for batches of %d crops of %dx%d in %.1f s (with the first batch)",
                    clf.config.model.name,
                    clf.batch_size,
                    clf.crop_size,
                    clf.crop_size,
                    time.perf_counter() - t,
                )
            for (f, _), ids, names, probs in zip(readable, out.ids, out.names, out.probabilities):
                yield f, [int(i) for i in ids], list(names), [float(p) for p in probs]
        done += len(chunk)
        now = time.perf_counter()
        if now - last_report >= every_secs or done == len(files):
            last_report = now
            logging.info(
                "predicted %d/%d images (%.1f images/s)%s",
                done,
                len(files),
                done / max(now - started, 1e-9),
                f", {len(skipped)} unreadable" if skipped else "",
            )
    if skipped and len(skipped) == len(files):
        raise UserError(f"none of the {len(files)} files is an image PIL can decode (e.g. {skipped[0]}).")


def header(top_k: int) -> list[str]:
    return ["file"] + [f"{c}{i}" for i in range(1, top_k + 1) for c in ("class", "name", "probability")]


def write_csv(rows: Iterator[tuple[str, list[int], list[str], list[float]]], out: Any, top_k: int) -> int:
    """Writes one CSV row per image to the text stream ``out``; returns the number of rows."""
    writer = csv.writer(out)
    writer.writerow(header(top_k))
    n = 0
    for name, ids, names, probs in rows:
        cells = [name]
        for i, label, p in zip(ids, names, probs):
            cells += [i, label, f"{p:.6g}"]
        writer.writerow(cells)
        out.flush()
        n += 1
    return n


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string(
        "checkpoint", None, "A training workdir, a checkpoint step dir or converted weights.", flag_values=values
    )
    flags.DEFINE_integer("top_k", 5, "Classes per image, most probable first.", lower_bound=1, flag_values=values)
    flags.DEFINE_string(
        "out", None, "CSV file for the predictions (local or gs://; default: printed on stdout).", flag_values=values
    )
    flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", lower_bound=1, flag_values=values)
    flags.mark_flags_as_required(["checkpoint"], flag_values=values)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vgg_jax.predict --checkpoint=DIR IMAGE_OR_FOLDER_OR_GLOB... [--top_k=5] [--out=preds.csv]``:
    the top-k classes of each image, as the checkpoint's model sees it (shorter side to its test scale, centre
    crop, its input convention; vgg_jax.load's predict). Files, folders (searched recursively for images) and
    glob patterns, local or gs://. One CSV row per image: file, then class id, name and probability per rank."""
    values, inputs = cli.parse(argv, define_flags, "python -m vgg_jax.predict", main.__doc__)
    if not inputs:
        cli.fail("name the images: files, folders or glob patterns after the flags.")
    files = expand(inputs)
    logging.info("%d images to classify", len(files))
    clf = load(values.checkpoint, batch_size=values.batch_size)
    if values.top_k > len(clf.class_names):
        raise UserError(f"--top_k={values.top_k}: the model has {len(clf.class_names)} classes.")
    logging.info(
        "%s from %s: %d classes; shorter side -> %d, centre crop %d",
        clf.config.model.name,
        values.checkpoint,
        len(clf.class_names),
        clf.scale,
        clf.crop_size,
    )
    rows = predict_files(clf, files, values.top_k)
    if not values.out:
        write_csv(rows, sys.stdout, values.top_k)
        return 0
    out = epath.Path(values.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        n = write_csv(rows, f, values.top_k)
    print(f"Wrote {n} predictions to {values.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, tensorflow=True)
