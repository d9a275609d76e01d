"""``vgg_jax.main`` whose save of step 6 stalls half-way (for the kill-during-save tests), with test hooks.

The data item of step ``VGG_JAX_TEST_STALL_STEP`` (default 6; -1: none) writes a marker file ``stalled`` and then
sleeps: the checkpoint exists only as orbax's temporary directory (on a local disk) or as an unfinished step
without ``commit_success.txt`` (on GCS) when the test sends SIGKILL. The markers go to the local folder
``VGG_JAX_TEST_MARKERS`` (default: the checkpoints directory), which also gets ``saved-<step>`` after each
step's data item is written. ``VGG_JAX_TEST_SLOW_PREPARE`` (seconds) makes preparing a folder dataset sleep
first, so that processes started together overlap in it.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ imports `configs.default`

from vgg_jax import checkpoints, cli, main  # noqa: E402
from vgg_jax.data import sources  # noqa: E402

_save = checkpoints.IteratorStateHandler.save
_generate = sources.VggJaxFolder._generate_examples
STALL = int(os.environ.get("VGG_JAX_TEST_STALL_STEP", "6"))


def stalling_save(self, directory, args):
    _save(self, directory, args)
    step_dir = directory.parent
    step = int(step_dir.name.split(".")[0])
    markers = Path(os.environ.get("VGG_JAX_TEST_MARKERS") or step_dir.parent)
    (markers / f"saved-{step}").write_text("saved")
    if step == STALL:
        (markers / "stalled").write_text("stalled")
        time.sleep(600)


def slow_generate(self, split):
    time.sleep(float(os.environ.get("VGG_JAX_TEST_SLOW_PREPARE", "0")))
    yield from _generate(self, split)


checkpoints.IteratorStateHandler.save = stalling_save
sources.VggJaxFolder._generate_examples = slow_generate

if __name__ == "__main__":
    cli.run(main.main)
