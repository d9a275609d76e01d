"""Is a job finished? ``python -m experiments.status ROOT`` prints every job of a launched sweep.

experiments/README.md#layout-of-a-sweep-root
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags
from etils import epath

from vgg_jax import cli


def run_step(workdir: str) -> int:
    """The step of the run's final summary (``results.json``), or 0 when there is none."""
    path = epath.Path(workdir) / "results.json"
    if not path.exists():
        return 0
    return int(json.loads(path.read_text())["step"])


def checkpoint_step(workdir: str) -> int:
    """The newest checkpoint step in the workdir (0: none)."""
    directory = epath.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []
    return max(steps, default=0)


def run_done(workdir: str, steps: int) -> bool:
    return run_step(workdir) >= steps


def eval_result(out: str, protocol: str) -> epath.Path | None:
    """The newest ``<protocol>_<scales>.json`` written by ``vgg_jax.evaluate`` into ``out``."""
    directory = epath.Path(out)
    if not directory.exists():
        return None
    found = list(directory.glob(f"{protocol}_*.json"))
    return max(found, key=lambda p: p.stat().mtime) if found else None


def eval_done(out: str, protocol: str) -> bool:
    return eval_result(out, protocol) is not None


def describe(job: dict) -> str:
    """'done', 'step k of N', 'not started' or 'pending' for a job of ``sweep.json``."""
    if job["kind"] == "train":
        steps = job["facts"]["num_train_steps"]
        if run_done(job["path"], steps):
            return "done"
        step = max(run_step(job["path"]), checkpoint_step(job["path"]))
        return f"step {step} of {steps}" if step else "not started"
    return "done" if eval_done(job["path"], job["facts"]["protocol"]) else "pending"


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("run", None, "A run's workdir: exit 0 when it reached --steps.", flag_values=values)
    flags.DEFINE_integer("steps", None, "The run's num_train_steps.", flag_values=values)
    flags.DEFINE_string(
        "eval", None, "An evaluation's output directory: exit 0 when it holds a result.", flag_values=values
    )
    flags.DEFINE_string("protocol", None, "The evaluation's protocol.", flag_values=values)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.status ROOT`` prints every job of a sweep; ``--run``/``--eval`` test one job."""
    values, rest = cli.parse(argv, define_flags, "python -m experiments.status", main.__doc__)
    if values.run:
        if values.steps is None:
            cli.fail("--run needs --steps=N (the run's num_train_steps).")
        return 0 if run_done(values.run, values.steps) else 1
    if values.eval:
        if not values.protocol:
            cli.fail("--eval needs --protocol=P.")
        return 0 if eval_done(values.eval, values.protocol) else 1
    if len(rest) != 1:
        cli.fail("give a sweep ROOT, --run=WORKDIR --steps=N, or --eval=OUT --protocol=P.")
    manifest = epath.Path(rest[0]) / "sweep.json"
    if not manifest.exists():
        cli.fail(f"{manifest} not found: ROOT must be the --root of `python -m experiments.launch`.")
    jobs = json.loads(manifest.read_text())["jobs"]
    width = max(len(j["name"]) for j in jobs)
    for job in jobs:
        print(f"{job['name']:<{width}}  {job['kind']:<5}  {describe(job)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
