"""Pod storage (docs/training.md#checkpoints, docs/data.md#datasets): every flow on gs://, against a real GCS
emulator (tests/gcs_emulator.py: fake-gcs-server behind TLS, in a network namespace of its own), run through the
command line as a user would.

The tests share one bucket and one scenario (the ``resumed`` fixture): a run killed mid-save, a second run and
the loaders while its newest step is unfinished, its resume; then evaluation and notebook loading from it; then
two runs started together on one gs:// data_dir, one of them from its weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gcs_emulator import BUCKET, Emulator, available
from test_main import REPO, last_line

from tiny_runs import TINY

HOOKED_MAIN = str(Path(__file__).with_name("slow_save_main.py"))
RUN = f"gs://{BUCKET}/run"
STEPS = ["--config.num_train_steps=6", "--config.checkpoint.every_steps=2", "--config.eval_every_steps=6"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    why = available()
    assert why is None, f"the GCS emulator {why}"  # CI runs as root with util-linux: it must run there
    emulator = Emulator(tmp_path_factory.mktemp("gcs")).start()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def markers(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("markers")


def env(gcs: Emulator, markers: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # This checkout's vgg_jax (and configs/) from any working directory.
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return gcs.env({**base, "VGG_JAX_TEST_MARKERS": str(markers), "VGG_JAX_TEST_STALL_STEP": "-1", **extra})


def start(gcs, markers, args: list[str], cwd: Path = REPO, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        gcs.command([sys.executable, *args], cwd),
        cwd=cwd,
        env=env(gcs, markers, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, code: int | None = 0) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if code is not None:
        assert proc.returncode == code, err[-4000:]
    return done


def python(gcs, markers, code: str) -> dict:
    """Runs ``code`` in the emulator's namespace; returns the JSON it prints last."""
    done = finish(start(gcs, markers, ["-c", code]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def train(workdir: str, *overrides: str) -> list[str]:
    return [HOOKED_MAIN, f"--workdir={workdir}", *TINY, *overrides]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path.name}: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def resumed(gcs, markers, data_dir, tmp_path_factory) -> dict:
    """A run on gs:// killed (SIGKILL) while step 6 is written in place (no commit_success.txt yet); meanwhile a
    second run on its workdir and the loaders; then its newest finished step damaged, and the run resumed. Also
    uploads an image folder for the tests below. Returns what each saw."""
    data = f"--config.data.data_dir={data_dir}"
    first = start(gcs, markers, train(RUN, data, *STEPS), VGG_JAX_TEST_STALL_STEP="6")
    wait_for(markers / "stalled", first)
    second = start(gcs, markers, train(RUN, data, *STEPS))
    images = make_image_folder(tmp_path_factory.mktemp("images"))
    code = f"""
import json
from etils import epath
import vgg_jax
from vgg_jax import checkpoints
from vgg_jax.errors import CheckpointError
steps = epath.Path("{RUN}/checkpoints")
unfinished = (steps / "6" / "data").is_dir() and not (steps / "6" / "commit_success.txt").exists()
loaded = vgg_jax.load("{RUN}").path
newest = checkpoints.find_checkpoint("{RUN}").name
from experiments import status
shown = status.checkpoint_step("{RUN}")
try:
    vgg_jax.load("{RUN}/checkpoints/6")
    refused = ""
except CheckpointError as e:
    refused = str(e)
# The newest finished step damaged: the resumed run must set it aside too.
data = max((steps / "4" / "state" / "d").iterdir(), key=lambda p: p.stat().length)
content = bytearray(data.read_bytes()); content[len(content) // 2] ^= 0x10; data.write_bytes(bytes(content))
for folder, _, names in epath.Path("{images}").walk():
    for file in (folder / name for name in names):
        (epath.Path("gs://{BUCKET}/imgs") / file.relative_to("{images}")).write_bytes(file.read_bytes())
print(json.dumps(dict(unfinished=unfinished, loaded=loaded, newest=newest, shown=shown, refused=refused,
                      damaged=data.name)))
"""
    checks = start(gcs, markers, ["-c", code])
    seen = dict(second=finish(second, code=None))
    seen["loaders"] = json.loads(finish(checks).stdout.strip().splitlines()[-1])
    first.send_signal(signal.SIGKILL)
    first.wait()
    seen["first"] = first.communicate()[1]
    seen["resumed"] = finish(start(gcs, markers, train(RUN, data, *STEPS)))
    return seen


def test_a_second_run_on_a_gcs_workdir_is_refused_while_the_first_lives(resumed):
    second = resumed["second"]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    line = last_line(second)
    assert line.startswith(f"error: A training run in {RUN} is already under way: ") and " pid " in line, line
    assert f"lease {RUN}/checkpoints/lease.json, renewed" in line and "--workdir" in line


def test_an_unfinished_gcs_step_is_never_loaded_and_named_when_asked_for(resumed):
    seen = resumed["loaders"]
    assert seen["unfinished"], "the stalled save should have left step 6 without commit_success.txt"
    assert seen["newest"] == "4" and seen["loaded"] == RUN  # vgg_jax.load of the workdir: step 4
    assert seen["shown"] == 4  # experiments.status: the newest finished step
    assert f"Checkpoint {RUN}/checkpoints/6 is unfinished (orbax never finalized it" in seen["refused"]
    assert "intact steps: 4, 2" in seen["refused"]


def test_a_run_killed_mid_save_on_gcs_resumes_from_its_newest_intact_step_exactly(resumed):
    """The rerun passes over the unfinished step 6, sets the damaged step 4 aside and resumes from step 2: steps 3
    and 4 again, from step 2's state and input position, give the losses they gave before the kill."""
    done = resumed["resumed"]
    damaged = resumed["loaders"]["damaged"]
    assert f"Checkpoint step 4 is damaged (state/d/{damaged} does not match its checksum)" in done.stderr
    assert "Resumed from" in done.stderr and "at step 2" in done.stderr
    assert logged_loss(resumed["first"], 4) == logged_loss(done.stderr, 4)
    assert not (REPO / "gs:").exists()


def logged_loss(stderr: str, step: int) -> str:
    (line,) = [x for x in stderr.splitlines() if f"] [{step}] train/" in x]
    return line.split("train/loss=")[1].split(",")[0]


def test_evaluate_and_the_notebook_api_read_and_write_gcs(gcs, markers, resumed, tmp_path):
    out, predictions = f"gs://{BUCKET}/evaluated", f"gs://{BUCKET}/predictions/run.csv"
    done = finish(
        start(gcs, markers, ["-m", "vgg_jax.evaluate", f"--checkpoint={RUN}", "--protocol=center", f"--out={out}",
                              f"--predictions={predictions}"], cwd=tmp_path)
    )  # fmt: skip
    assert f"Wrote {out}/center_36.json and {out}/center_36.md" in done.stderr
    assert f"Wrote 40 predictions to {predictions}" in done.stderr
    assert not list(tmp_path.iterdir()), "evaluate wrote into its working directory"
    seen = python(
        gcs,
        markers,
        f"""
import csv, io, json
from etils import epath
import numpy as np
import vgg_jax
record = json.loads(epath.Path("{out}/center_36.json").read_text())
rows = list(csv.DictReader(io.StringIO(epath.Path("{predictions}").read_text())))
clf = vgg_jax.load("{RUN}")
image = "gs://{BUCKET}/imgs/val/dots/0.jpg"
local = "{tmp_path}/image.jpg"
epath.Path(local).write_bytes(epath.Path(image).read_bytes())
same = bool(np.array_equal(clf.probabilities(image), clf.probabilities(local)))
step = json.loads(epath.Path("{RUN}/results.json").read_text())["step"]
names = clf.predict(image, top_k=2).names
print(json.dumps(dict(results=record["results"], rows=len(rows), same=same, names=names, step=step)))
""",
    )
    assert seen["rows"] == 40 and seen["step"] == 6 and seen["same"]
    assert seen["results"]["images"] == 40 and len(seen["names"][0]) == 2
    # The predict command: a gs:// folder (searched recursively) and a gs:// glob in, a gs:// CSV out.
    preds, cwd = f"gs://{BUCKET}/predictions/imgs.csv", tmp_path / "predict"
    cwd.mkdir()
    done = finish(
        start(gcs, markers, ["-m", "vgg_jax.predict", f"--checkpoint={RUN}", f"gs://{BUCKET}/imgs/val",
                              f"gs://{BUCKET}/imgs/train/dots/*.jpg", f"--out={preds}", "--top_k=2"], cwd=cwd)
    )  # fmt: skip
    assert f"Wrote 10 predictions to {preds}" in done.stderr, done.stderr[-3000:]
    assert not list(cwd.iterdir()), "predict wrote into its working directory"
    rows = python(gcs, markers, f"""
import csv, io, json
from etils import epath
print(json.dumps(list(csv.DictReader(io.StringIO(epath.Path("{preds}").read_text())))))
""")  # fmt: skip
    assert sorted(r["file"] for r in rows)[0] == f"gs://{BUCKET}/imgs/train/dots/0.jpg"
    assert len({r["file"] for r in rows}) == 10 and all(0 < float(r["probability1"]) <= 1 for r in rows)


def make_image_folder(root: Path) -> Path:
    """``root/{train,val}/<class>/*.jpg``: three texture classes of the built-in dataset, small images."""
    import numpy as np

    from vgg_jax.data import demo

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for label, name in enumerate(("stripes", "dots", "rings")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image = demo.render((0, 5, 4)[label], rng)
                (folder / f"{i}.jpg").write_bytes(demo.encode_jpeg(image))
    return root


def test_two_runs_started_together_on_one_gcs_data_dir_prepare_it_once_and_both_train(gcs, markers, resumed, tmp_path):
    """Two processes in working directories of their own (as two hosts), one gs:// data_dir, a folder dataset on
    gs:// (uploaded by the first test): one prepares it, the other waits for it, both train. The first starts
    from the killed-and-resumed run's weights (init_from=gs://) and is preempted (SIGTERM) after step 2."""
    tiny = [f"--config={REPO / 'configs' / 'demo.py'}", *TINY[1:]]
    data = [
        "--config.data.dataset=folder",
        f"--config.data.folder=gs://{BUCKET}/imgs",
        f"--config.data.data_dir=gs://{BUCKET}/tfds",
        "--config.data.eval_split=validation",
        "--config.checkpoint.every_steps=2",
    ]
    procs, dirs = [], {}
    for name, extra in (
        ("x", ["--config.num_train_steps=1000", "--config.eval_every_steps=1000", f"--config.init_from={RUN}",
               "--config.reset_head=True"]),
        ("y", ["--config.num_train_steps=2", "--config.eval_every_steps=2"]),
    ):  # fmt: skip
        dirs[name] = tmp_path / name
        (dirs[name] / "markers").mkdir(parents=True)
        args = [HOOKED_MAIN, f"--workdir=gs://{BUCKET}/{name}", *tiny, *data, *extra]
        procs.append(
            start(gcs, markers, args, cwd=dirs[name], VGG_JAX_TEST_SLOW_PREPARE="5",
                  VGG_JAX_TEST_MARKERS=str(dirs[name] / "markers"))
        )  # fmt: skip
    x, y = procs
    wait_for(dirs["x"] / "markers" / "saved-2", x)
    x.send_signal(signal.SIGTERM)
    preempted, finished = finish(x), finish(y)
    assert "Preempted at step" in preempted.stderr and f"Initialised from {RUN}" in preempted.stderr
    prepared = [p for p in (preempted, finished) if "vgg_jax_folder downloaded and prepared to" in p.stdout]
    assert len(prepared) == 1, "the folder dataset should be prepared exactly once"
    seen = {n: json.loads(p.stdout.strip().splitlines()[-1]) for n, p in (("x", preempted), ("y", finished))}
    assert seen["y"]["step"] == 2 and seen["y"]["images"] == 6 and 3 <= seen["x"]["step"] < 1000
    assert not any((d / "gs:").exists() for d in dirs.values())
