"""``vgg_jax.main`` whose save of step 6 stalls half-way (for the kill-during-save test).

The data item of step 6 writes a marker file and then sleeps: the checkpoint exists only as
orbax's temporary directory when the test sends SIGKILL.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ imports `configs.default`

from vgg_jax import checkpoints, cli, main

_save = checkpoints.IteratorStateHandler.save


def stalling_save(self, directory, args):
    _save(self, directory, args)
    step_dir = directory.parent
    if step_dir.name.startswith("6.orbax-checkpoint-tmp"):
        (step_dir.parent / "stalled").write_text("stalled")
        time.sleep(600)


checkpoints.IteratorStateHandler.save = stalling_save

if __name__ == "__main__":
    cli.run(main.main)
