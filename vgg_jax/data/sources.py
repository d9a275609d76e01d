"""Dataset resolution: a data config -> a prepared TFDS builder and the names of its features.

docs/data.md#datasets
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import hashlib
import os
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet_builder
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

from vgg_jax import storage
from vgg_jax.data import demo
from vgg_jax.errors import UserError

IMAGENET_TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_FOLDER_SPLITS = {"val": "validation"}  # folder name -> TFDS split name; others keep their name
PREPARE_LEASE = ".vgg_jax_prepare.{}.lease"  # in data_dir, per dataset: the process preparing it (vgg_jax.storage)
PREPARE_WAIT = 24 * 3600.0  # seconds a process waits for another one's preparation before it gives up


class DatasetError(UserError):
    """A dataset is missing, unprepared or unusable; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A prepared dataset and the features the pipeline reads (image bytes, class id, a name)."""

    name: str
    builder: tfds.core.DatasetBuilder
    image_key: str
    label_key: str
    file_name_key: str | None  # a text feature naming each example (ImageNet's file_name), if any

    def num_examples(self, split: str) -> int:
        return self.builder.info.splits[split].num_examples

    @property
    def class_names(self) -> list[str]:
        return list(self.builder.info.features[self.label_key].names)


def default_cache_dir() -> str:
    """Where the demo and folder datasets go when ``data_dir`` is unset: ``~/.cache/vgg_jax/tfds``."""
    cache = storage.path(os.environ.get("XDG_CACHE_HOME") or epath.Path("~/.cache").expanduser())
    return os.fspath(cache / "vgg_jax" / "tfds")


@dataclasses.dataclass(frozen=True)
class DataLocation:
    """The config fields that pick a dataset (a hashable cache key)."""

    dataset: str
    data_dir: str | None
    manual_dir: str | None
    folder: str | None
    download: bool


def get_source(data_config: Any) -> Source:
    """The prepared source of ``data_config`` (prepares the demo, folder and ImageNet sets on first use).

    Cached per process and location: a folder changed while a process runs is seen by the next one.
    """
    return _get_source(
        DataLocation(
            data_config.dataset,
            data_config.data_dir,
            data_config.manual_dir,
            data_config.folder,
            bool(data_config.download),
        )
    )


@functools.lru_cache(maxsize=16)
def _get_source(loc: DataLocation) -> Source:
    if loc.dataset == "vgg_jax_demo":
        builder = _prepare(functools.partial(demo.VggJaxDemo, data_dir=loc.data_dir or default_cache_dir()))
    elif loc.dataset == "folder":
        builder = _prepare(_folder_builder(loc))
    elif loc.dataset == "imagenet2012":
        builder = _imagenet_builder(loc)
    else:
        builder = _tfds_builder(loc)
    return _source_of(loc.dataset, builder)


def check_split(source: Source, split: str) -> None:
    """A clear error when ``split`` (e.g. 'validation', 'train[:90%]') is not in the dataset."""
    try:
        source.builder.info.splits[split]
    except (KeyError, ValueError) as e:
        raise DatasetError(
            f"split {split!r} is not in {source.name} (splits: {sorted(source.builder.info.splits)}); "
            f"set --config.data.train_split / eval_split to one of them ({e})."
        ) from e


# ----------------------------------------------------------------------------------------------
# Preparation


def _prepare(make: Callable[[], tfds.core.DatasetBuilder], **kwargs: Any) -> tfds.core.DatasetBuilder:
    """The builder ``make()`` returns, its dataset prepared once whatever the number of processes asking.

    Preparing holds the dataset's lease in its data_dir (``PREPARE_LEASE``, vgg_jax.storage: atomic on local
    disks and on GCS), so of the processes sharing a data_dir, those of one run or of a sweep, one prepares and
    the others wait, then read what it wrote; processes with data_dirs of their own (hosts with their own disks) each
    prepare theirs. The builder is made again after waiting: it reads the finished dataset's info."""
    builder = make()
    name = builder.info.full_name  # name/config/version
    lease = storage.Lease(
        storage.path(builder.data_dir_root) / PREPARE_LEASE.format(name.replace("/", ".")),
        f"preparing {name} in {builder.data_dir_root}",
    )
    # Prepared and nobody preparing (on GCS, TFDS's final rename copies file by file: wait for its end).
    # Reads only, so a prepared data_dir may be read-only.
    if builder.is_prepared() and lease.holder() is None:
        return builder
    advice = (
        "If that process is stuck, stop it; or prepare the dataset beforehand (tfds build, or one run with this "
        "data_dir) and start the others after it."
    )
    with lease.acquire(wait=PREPARE_WAIT, advice=advice):
        builder = make()  # another process may have prepared it while we waited
        if not builder.is_prepared():
            logging.info("Preparing %s in %s (first use; done once)", builder.name, builder.data_dir)
            # TFDS's progress bars only go to a terminal: in a log file they are escape codes.
            started, bars = time.time(), tqdm_utils._active  # noqa: SLF001 (TFDS keeps the switch there)
            tfds.display_progress_bar(bars and sys.stderr.isatty())
            try:
                builder.download_and_prepare(**kwargs)
            finally:
                tfds.display_progress_bar(bars)
            logging.info("Prepared %s in %.0f s", builder.name, time.time() - started)
    return make()


# ----------------------------------------------------------------------------------------------
# ImageNet and other TFDS datasets


def _imagenet_builder(loc: DataLocation) -> tfds.core.DatasetBuilder:
    builder = tfds.builder("imagenet2012", data_dir=loc.data_dir)
    if builder.is_prepared():
        return builder
    manual_dir = loc.manual_dir
    missing = [t for t in IMAGENET_TARS.values() if not manual_dir or not (storage.path(manual_dir) / t).is_file()]
    if missing:
        where = f"manual_dir={manual_dir!r} lacks {missing}" if manual_dir else "manual_dir is not set"
        raise DatasetError(
            f"imagenet2012 is not prepared in {builder.data_dir} and {where}. Download "
            f"{IMAGENET_TARS['train']} (138 GB) and {IMAGENET_TARS['validation']} (6.3 GB) from "
            "https://image-net.org/download-images (free registration), put both in one folder and run "
            "with --config.data.manual_dir=<that folder> (and --config.data.data_dir=<where the prepared "
            "TFRecords go, about 150 GB>). The first run then prepares the dataset once (hours), or "
            "prepare it beforehand with: tfds build imagenet2012 --manual_dir=<folder> --data_dir=<dir>."
        )
    _prepare(  # Imagenet2012 labels validation images by file number
        functools.partial(Imagenet2012, data_dir=loc.data_dir),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
    return tfds.builder("imagenet2012", data_dir=loc.data_dir)


VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG", re.IGNORECASE)


def validation_labels(names: list[str], labels: list[str]) -> dict[str, str]:
    """``ILSVRC2012_val_NNNNNNNN.JPEG`` -> line NNNNNNNN (1-based) of ``labels``, whatever else the archive
    holds; DatasetError naming the first file without such a number."""
    out = {}
    for name in names:
        found = VAL_NAME.fullmatch(name.rsplit("/", 1)[-1])  # a member of the tar
        number = int(found.group(1)) if found else 0
        if not 1 <= number <= len(labels):
            raise DatasetError(
                f"{IMAGENET_TARS['validation']} holds {name!r}, which is not ILSVRC2012_val_NNNNNNNN.JPEG with "
                f"NNNNNNNN in 1..{len(labels)}: its label cannot be known. Remove it, or restore the original archive."
            )
        out[name] = labels[number - 1]
    return out


class Imagenet2012(imagenet_builder.Builder, skip_registration=True):
    """TFDS's ``imagenet2012`` builder, but each validation image labelled by the number in its file name.

    TFDS pairs the sorted validation file names present with the first lines of its label list, which
    mislabels a partial or renamed archive without an error. Same name, version and output: the stock
    builder reads what this one prepares.
    """

    name = "imagenet2012"

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> list:
        splits = super()._split_generators(dl_manager)
        for split in splits:
            if "validation_labels" in split.gen_kwargs:
                labels = tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME).read_text().split()
                archive = storage.path(dl_manager.manual_dir) / IMAGENET_TARS["validation"]
                with archive.open("rb") as f, tarfile.open(fileobj=f) as tar:
                    split.gen_kwargs["validation_labels"] = validation_labels(tar.getnames(), labels)
        return splits


def _tfds_builder(loc: DataLocation) -> tfds.core.DatasetBuilder:
    name = loc.dataset
    try:
        builder = tfds.builder(name, data_dir=loc.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name.split("/")[0], ["vgg_jax_demo", "folder", *tfds.list_builders()], n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise DatasetError(
            f"unknown dataset {name!r}{hint}: set --config.data.dataset to 'vgg_jax_demo' (built in), "
            "'imagenet2012', 'folder' (with --config.data.folder) or a TFDS image-classification dataset name."
        ) from None
    if not builder.is_prepared():
        if not loc.download:
            raise DatasetError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Either set "
                f"--config.data.download=True (TFDS downloads and prepares it on first use), or run once: "
                f"tfds build {name} --data_dir={builder.data_dir_root}"
            )
        builder = _prepare(functools.partial(tfds.builder, name, data_dir=loc.data_dir))
    return builder


def _source_of(name: str, builder: tfds.core.DatasetBuilder) -> Source:
    """Find the image and label features (the supervised keys, else 'image'/'label')."""
    features = dict(builder.info.features.items())
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    image, label = features.get(image_key), features.get(label_key)
    if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
        raise DatasetError(
            f"{name} is not an image-classification dataset: it needs an Image feature and a ClassLabel "
            f"feature (its supervised keys or 'image'/'label'); its features are {builder.info.features}."
        )
    file_name = features.get("file_name")
    file_name_key = "file_name" if isinstance(file_name, tfds.features.Text) else None
    return Source(name, builder, image_key, label_key, file_name_key)


# ----------------------------------------------------------------------------------------------
# Image folders


@dataclasses.dataclass(frozen=True)
class FolderIndex:
    """The images of a folder (local or gs://): per split, sorted (relative path, class name) pairs, and
    the files' sizes."""

    root: str
    class_names: tuple[str, ...]
    files: dict[str, tuple[tuple[str, str], ...]]
    sizes: dict[str, int]  # relative path -> bytes

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for split, items in sorted(self.files.items()):
            for rel, _ in items:
                h.update(f"{split}/{rel}:{self.sizes[rel]}\n".encode())
        return h.hexdigest()[:12]


def _images(folder: epath.Path) -> list[epath.Path]:
    """The images under ``folder``, at any depth."""
    return [
        directory / n for directory, _, names in folder.walk() for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
    ]


def _subdirs(folder: epath.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def scan_folder(root: str) -> FolderIndex:
    """Index ``root/<split>/<class>/<image>`` ('val' becomes the 'validation' split)."""
    base = storage.path(root)
    if not base.is_dir():
        raise DatasetError(
            f"folder dataset root {root!r} does not exist; set --config.data.folder to a directory laid "
            "out as <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg."
        )
    split_dirs = _subdirs(base)
    if "train" not in split_dirs:
        raise DatasetError(
            f"{root} has no train/ sub-folder (found {split_dirs}); expected <root>/train/<class>/*.jpg."
        )
    train = base / "train"
    class_names = tuple(_subdirs(train))
    if not class_names:
        raise DatasetError(f"{train} has no class sub-folders; expected {train}/<class>/*.jpg.")
    files = {}
    for split_dir in split_dirs:
        items = []
        for cls in _subdirs(base / split_dir):
            if cls not in class_names:
                raise DatasetError(
                    f"{root}/{split_dir}/{cls} is a class that {train} lacks; every split must use the "
                    f"classes of train/ ({len(class_names)} classes)."
                )
            images = _images(base / split_dir / cls)
            if split_dir == "train" and not images:
                raise DatasetError(
                    f"class folder {train / cls} holds no {'/'.join(IMAGE_EXTENSIONS)} image: it would become a "
                    "class that no training image shows. Add its images or remove the folder."
                )
            items += [(os.fspath(p.relative_to(base)), cls) for p in images]
        if not items:
            raise DatasetError(
                f"{root}/{split_dir} holds no {'/'.join(IMAGE_EXTENSIONS)} images under <class>/ folders."
            )
        files[_FOLDER_SPLITS.get(split_dir, split_dir)] = tuple(sorted(items))
    names = sorted({rel for items in files.values() for rel, _ in items})
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:  # one request per file on GCS
        sizes = dict(zip(names, pool.map(lambda rel: (base / rel).stat().length, names)))
    return FolderIndex(os.fspath(base), class_names, files, sizes)


class VggJaxFolder(tfds.core.GeneratorBasedBuilder):
    """An image folder as a TFDS dataset (``vgg_jax_folder/<folder name>-<fingerprint>``).

    The images' bytes are stored as they are (JPEG or PNG); ``file_name`` keeps each image's path
    relative to the root, for error messages. A changed file list gets a new fingerprint, so a new
    preparation, never a stale one.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Image folder as TFRecords."}

    def __init__(self, *, index: FolderIndex, **kwargs: Any):
        self._index = index
        base = re.sub(r"[^a-z0-9_]+", "_", epath.Path(index.root).name.lower()) or "root"
        config = tfds.core.BuilderConfig(name=f"{base}_{index.fingerprint}", description=f"images under {index.root}")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=self._index.class_names),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {split: self._generate_examples(split) for split in self._index.files}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        for rel, cls in self._index.files[split]:
            yield rel, {"image": (epath.Path(self._index.root) / rel).read_bytes(), "label": cls, "file_name": rel}


def _folder_builder(loc: DataLocation) -> Callable[[], VggJaxFolder]:
    if not loc.folder:
        raise DatasetError(
            "dataset='folder' needs --config.data.folder=<root> with <root>/train/<class>/*.jpg and "
            "<root>/val/<class>/*.jpg."
        )
    index = scan_folder(loc.folder)
    return functools.partial(VggJaxFolder, index=index, data_dir=loc.data_dir or default_cache_dir())
