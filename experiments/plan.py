"""A sweep turned into jobs: the exact command of each run and evaluation, and its completion check.

experiments/README.md#layout-of-a-sweep-root
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Sequence
from typing import Any

from etils import epath

from experiments.sweeps import Eval, Run, Sweep, resolve_config
from vgg_jax.models import canonical_name

MANIFEST = "sweep.json"
EVALS_DIR = "evals"


@dataclasses.dataclass(frozen=True)
class Job:
    """A command to run once its dependencies are done; ``args`` and ``check`` follow ``python``.

    ``check`` exits 0 when the job is already complete (``experiments.status``), so every launcher
    skips finished jobs and a rerun resumes the sweep. ``facts`` are the resolved config values the
    report needs (model, scales, batch, steps) for runs, and the evaluation's fields for evaluations.
    """

    name: str
    kind: str  # 'train' or 'eval'
    args: tuple[str, ...]
    check: tuple[str, ...]
    after: tuple[str, ...]
    path: str  # the run's workdir, or the evaluation's output directory
    facts: dict[str, Any]

    def command(self, python: str = "python") -> str:
        return shlex.join([python, *self.args])

    def check_command(self, python: str = "python") -> str:
        return shlex.join([python, *self.check])


def join(root: str, *parts: str) -> str:
    """``root/parts`` for local paths and URLs (gs://) alike."""
    return "/".join([root.rstrip("/"), *parts])


def run_job(run: Run, root: str, distributed: bool) -> Job:
    config = resolve_config(run.config, run.overrides)
    workdir = join(root, run.name)
    links = [f"--config.init_from={join(root, run.init_from)}"] if run.init_from else []
    links += [f"--config.staged_init_from={join(root, run.staged_init_from)}"] if run.staged_init_from else []
    args = (
        "-m",
        "vgg_jax.main",
        f"--config={run.config}",
        f"--workdir={workdir}",
        *run.overrides,
        *links,
        *(["--config.distributed.enabled=True"] if distributed else []),
    )
    steps = int(config.num_train_steps)
    facts = dict(
        net=run.net,
        scale=run.scale,
        config=run.config,
        overrides=list(run.overrides),
        model=canonical_name(config.model.name),
        width=int(config.model.width),
        fc_width=int(config.model.fc_width),
        crop_size=int(config.data.crop_size),
        scale_min=int(config.data.scale_min),
        scale_max=int(config.data.scale_max),
        eval_scales=[int(q) for q in config.data.eval_scales],
        global_batch_size=int(config.global_batch_size),
        num_train_steps=steps,
        dataset=config.data.dataset,
        train_split=config.data.train_split,
        eval_split=config.data.eval_split,
        seed=int(config.seed),
    )
    check = ("-m", "experiments.status", f"--run={workdir}", f"--steps={steps}")
    return Job(run.name, "train", args, check, run.after, workdir, facts)


def eval_job(ev: Eval, root: str, distributed: bool) -> Job:
    out = join(root, EVALS_DIR, ev.name)
    args = (
        "-m",
        "vgg_jax.evaluate",
        *(f"--checkpoint={join(root, r)}" for r in ev.runs),
        f"--protocol={ev.protocol}",
        *([f"--scales={ev.scales}"] if ev.scales else []),
        f"--out={out}",
        *(["--distributed.enabled=True"] if distributed else []),
    )
    check = ("-m", "experiments.status", f"--eval={out}", f"--protocol={ev.protocol}")
    facts = dict(runs=list(ev.runs), protocol=ev.protocol, scales=ev.scales, table=ev.table)
    return Job(ev.name, "eval", args, check, ev.after, out, facts)


def plan(sweep: Sweep, root: str, *, distributed: bool = False) -> list[Job]:
    """The sweep's jobs in dependency order, with paths under ``root``.

    ``distributed``: every process of a multi-host job calls ``jax.distributed.initialize()``
    (auto-detected on Cloud TPU pods and under SLURM).
    """
    return [
        run_job(j, root, distributed) if isinstance(j, Run) else eval_job(j, root, distributed) for j in sweep.ordered()
    ]


def write_manifest(sweep: Sweep, jobs: Sequence[Job], root: str) -> epath.Path:
    """``<root>/sweep.json``: the sweep and its jobs (commands, paths, resolved facts).

    Jobs of earlier launches into the same root stay listed (those of the same name are replaced),
    so launching part of a sweep, then another part, reports on both.
    """
    path = epath.Path(root) / MANIFEST
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            old_sweep, old_jobs = read_manifest(root)
            new = {j.name for j in jobs}
            sweep = Sweep(
                sweep.name,
                (*(r for r in old_sweep.runs if r.name not in new), *sweep.runs),
                (*(e for e in old_sweep.evals if e.name not in new), *sweep.evals),
            )
            jobs = [*(j for j in old_jobs if j.name not in new), *jobs]
    except OSError as e:
        raise ValueError(f"Cannot write {path}: {e}") from e
    path.write_text(json.dumps(dict(sweep=sweep.to_dict(), jobs=[dataclasses.asdict(j) for j in jobs]), indent=2))
    return path


def read_manifest(root: str) -> tuple[Sweep, list[Job]]:
    record = json.loads((epath.Path(root) / MANIFEST).read_text())
    jobs = [
        Job(**{**j, "args": tuple(j["args"]), "check": tuple(j["check"]), "after": tuple(j["after"])})
        for j in record["jobs"]
    ]
    return Sweep.from_dict(record["sweep"]), jobs
