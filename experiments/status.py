"""Is a job finished? ``python -m experiments.status ROOT`` prints every job of a launched sweep.

The launchers' generated commands run ``python -m experiments.status --run=WORKDIR --steps=N`` (or
``--eval=OUT --protocol=P``) first and skip the job when it exits 0, so every script can be rerun
after a failure or preemption: finished jobs are skipped and unfinished runs resume from their
checkpoints. A run is finished when its ``results.json`` reports ``step >= num_train_steps`` (a
preempted run also writes one, at an earlier step); an evaluation when its JSON result exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from etils import epath


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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.status", description=__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", help="a sweep root (with sweep.json): print the state of every job")
    p.add_argument("--run", help="a run's workdir: exit 0 when it reached --steps")
    p.add_argument("--steps", type=int, help="the run's num_train_steps")
    p.add_argument("--eval", help="an evaluation's output directory: exit 0 when it holds a result")
    p.add_argument("--protocol", help="the evaluation's protocol")
    args = p.parse_args(argv)
    if args.run:
        if args.steps is None:
            p.error("--run needs --steps")
        return 0 if run_done(args.run, args.steps) else 1
    if args.eval:
        if not args.protocol:
            p.error("--eval needs --protocol")
        return 0 if eval_done(args.eval, args.protocol) else 1
    if not args.root:
        p.error("give a sweep ROOT, --run=WORKDIR --steps=N, or --eval=OUT --protocol=P")
    manifest = epath.Path(args.root) / "sweep.json"
    if not manifest.exists():
        p.error(f"{manifest} not found: ROOT must be the --root of `python -m experiments.launch`.")
    jobs = json.loads(manifest.read_text())["jobs"]
    width = max(len(j["name"]) for j in jobs)
    for job in jobs:
        print(f"{job['name']:<{width}}  {job['kind']:<5}  {describe(job)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
