"""Launch a sweep (or a single run): locally in dependency order, on a Cloud TPU pod, or on SLURM.

  python -m experiments.launch --sweep=paper --root=runs/paper --config.data.manual_dir=/data/imagenet
  python -m experiments.launch --sweep=paper --nets=A,A-LRN,B --scales=256 --base_config=configs/demo.py
  python -m experiments.launch --sweep=my_sweep.json --mode=slurm --nodes=2 --gpus_per_node=8
  python -m experiments.launch --config=configs/paper.py:D,256,tpu --mode=tpu --tpu=pod --zone=us-central2-b \
      --root=gs://bucket/runs

Trailing ``--config.key=value`` flags apply to every run. Every mode writes ``<root>/sweep.json``
(read by ``experiments.status`` and ``experiments.report``) and skips finished jobs, so rerunning
the same command resumes a sweep. experiments/README.md has the details.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/launch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import slurm, status, sweeps, tpu  # noqa: E402
from experiments.plan import Job, plan, write_manifest  # noqa: E402

MODES = ("local", "tpu", "slurm")


def is_done(job: Job) -> bool:
    if job.kind == "train":
        return status.run_done(job.path, job.facts["num_train_steps"])
    return status.eval_done(job.path, job.facts["protocol"])


def run_local(jobs: Sequence[Job], root: str, *, dry_run: bool = False, echo: Callable[[str], None] = print) -> None:
    """Runs the jobs one after another in this machine's Python, each logging to ``<root>/logs/<job>.log``.

    Finished jobs are skipped. ``<root>/launch.jsonl`` records each job's start, end and skip.
    """
    logs = Path(root) / "logs"

    def record(job: Job, event: str, **extra) -> None:
        with open(Path(root) / "launch.jsonl", "a") as f:
            f.write(json.dumps(dict(job=job.name, event=event, time=time.time(), **extra)) + "\n")

    for i, job in enumerate(jobs, 1):
        prefix = f"[{i}/{len(jobs)}] {job.name}"
        if is_done(job):
            echo(f"{prefix}: finished already, skipped")
            if not dry_run:
                record(job, "skip")
            continue
        echo(f"{prefix}: {job.command()}")
        if dry_run:
            continue
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{job.name}.log"
        record(job, "start", command=job.command())
        started = time.time()
        with open(log, "a") as f:
            code = subprocess.run([sys.executable, *job.args], cwd=sweeps.REPO, stdout=f,
                                  stderr=subprocess.STDOUT).returncode
        seconds = round(time.time() - started, 1)
        if code != 0 or not is_done(job):
            record(job, "failed", seconds=seconds, exit_code=code)
            tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
            why = f"exited with {code}" if code else "ended before its last step (stopped or preempted)"
            raise SystemExit(f"{prefix} {why}; the end of {log}:\n{tail}\nFix it and rerun the same command: "
                             "finished jobs are skipped and this one resumes from its last checkpoint.")
        record(job, "done", seconds=seconds)
        echo(f"{prefix}: done in {seconds:.0f} s")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m experiments.launch", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to run")
    what.add_argument("--sweep", default="paper",
                      help="'paper' (Table 3 with the evaluations of Tables 3-5) or a sweep JSON file")
    what.add_argument("--config", help="one run of this config instead of a sweep, e.g. configs/paper.py:D,256,gpu")
    what.add_argument("--name", help="the single run's name (default: from --config)")
    what.add_argument("--nets", default=",".join(sweeps.NETS), help="paper sweep: configurations")
    what.add_argument("--scales", default=",".join(sweeps.SCALES), help="paper sweep: training scales")
    what.add_argument("--tables", default=",".join(sweeps.TABLES), help="paper sweep: evaluations ('' for none)")
    what.add_argument("--staged", action="store_true", help="paper sweep: B..E start from the trained A (Sect. 3.1)")
    what.add_argument("--platform", choices=("cpu", "gpu", "tpu"), help="paper sweep: configs/paper.py variant "
                      "(default: tpu for --mode=tpu, else gpu)")
    what.add_argument("--base_config", help="paper sweep on this config (e.g. configs/demo.py), scales x crop/224")
    what.add_argument("--only", help="comma-separated job names: run these and what they depend on")
    where = p.add_argument_group("where")
    where.add_argument("--mode", choices=MODES, default="local")
    where.add_argument("--root", help="directory (or gs:// URL) of the workdirs (default: runs/<sweep name>)")
    where.add_argument("--scripts_dir", help="tpu/slurm: where the scripts go (default: <root>/<mode>)")
    where.add_argument("--dry_run", action="store_true", help="print the commands only; write and submit nothing")
    where.add_argument("--submit", action="store_true", help="tpu/slurm: also run run_all.sh / submit.sh")
    where.add_argument("--repo_dir", help="tpu/slurm: the checkout on the workers (default: vgg_jax in the home "
                       "directory for tpu, this checkout for slurm)")
    where.add_argument("--setup", default="", help="tpu/slurm: shell run first, e.g. 'source venv/bin/activate'")
    where.add_argument("--python", help="tpu/slurm: the interpreter on the workers (default: python3 / python)")
    where.add_argument("--tpu", help="tpu: the TPU VM name")
    where.add_argument("--zone", help="tpu: its zone")
    where.add_argument("--project", default="", help="tpu: its project")
    where.add_argument("--nodes", type=int, default=1, help="slurm: nodes per job")
    where.add_argument("--gpus_per_node", type=int, default=8, help="slurm: GPUs per node")
    where.add_argument("--per", choices=("gpu", "node"), default="gpu", help="slurm: a process per GPU or per node")
    where.add_argument("--time", default="3-00:00:00", help="slurm: time limit per job (jobs requeue to continue)")
    where.add_argument("--partition", default="")
    where.add_argument("--account", default="")
    where.add_argument("--cpus_per_task", type=int, default=0, help="slurm: CPUs per process (0: cluster default)")
    where.add_argument("--sbatch", action="append", default=[], help="slurm: extra sbatch option (repeatable)")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not r.startswith("--config.")]
    if bad:
        p.error(f"unrecognised arguments {bad}: config overrides look like --config.key=value")
    if args.base_config and args.platform:
        p.error("--platform picks a configs/paper.py variant; with --base_config set --config.model.dtype instead")
    if args.mode == "tpu" and not (args.tpu and args.zone):
        p.error("--mode=tpu needs --tpu=NAME and --zone=ZONE")
    return args, rest


def _split(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def build_sweep(args: argparse.Namespace, overrides: Sequence[str]) -> sweeps.Sweep:
    if args.config:
        path, _, arg = args.config.partition(":")
        name = args.name or "-".join([Path(path).stem, *_split(arg)])
        sweep = sweeps.from_overrides(name, args.config, {name: ()}, overrides)
    elif args.sweep == "paper":
        options = dict(staged=args.staged, tables=_split(args.tables), overrides=overrides)
        if args.base_config:
            sweep = sweeps.reduced(args.base_config, _split(args.nets), _split(args.scales), **options)
        else:
            platform = args.platform or ("tpu" if args.mode == "tpu" else "gpu")
            sweep = sweeps.paper(_split(args.nets), _split(args.scales), platform=platform, **options)
    else:
        sweep = sweeps.load(args.sweep, overrides)
    return sweep.select(_split(args.only)) if args.only else sweep


def _require(tool: str, script: Path) -> None:
    if shutil.which(tool) is None:
        raise SystemExit(f"`{tool}` is not on PATH here: run {script} where it is (it was written, not submitted).")


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    try:
        launch(args, overrides)
    except ValueError as e:  # a bad sweep, config or option: the message says what to fix
        raise SystemExit(f"error: {e}") from e


def launch(args: argparse.Namespace, overrides: Sequence[str]) -> None:
    sweep = build_sweep(args, overrides)
    root = args.root or f"runs/{sweep.name}"
    remote = "://" in root
    if not remote:
        root = str(Path(root).resolve())
    jobs = plan(sweep, root, distributed=args.mode != "local")
    print(f"Sweep {sweep.name!r}: {len(jobs)} jobs under {root}")
    if not args.dry_run:
        write_manifest(sweep, jobs, root)
    if args.mode == "local":
        run_local(jobs, root, dry_run=args.dry_run)
        if not args.dry_run:
            print(f"All jobs finished. Report: python -m experiments.report {root}")
        return
    done = {job.name for job in jobs if is_done(job)}
    for job in jobs:
        if job.name in done:
            print(f"{job.name}: finished already, not submitted")
    todo = [job for job in jobs if job.name not in done]
    if args.dry_run:
        print("\n".join(job.command(args.python or "python") for job in todo))
        return
    if args.mode == "tpu" and not remote:
        print("Note: the workers of a pod share no disk; use a gs:// --root unless the TPU VM is a single host.")
    scripts = Path(args.scripts_dir or (f"{sweep.name}-{args.mode}" if remote else f"{root}/{args.mode}")).resolve()
    if args.mode == "tpu":
        write_tpu(args, todo, scripts)
    else:
        write_slurm(args, sweep.name, todo, scripts)


def write_tpu(args: argparse.Namespace, jobs: Sequence[Job], scripts: Path) -> None:
    opts = tpu.TpuOptions(args.tpu, args.zone, args.project, args.repo_dir or "vgg_jax", args.setup,
                          args.python or "python3")
    script, commands = tpu.write(jobs, opts, scripts)
    print("\n".join(commands))
    print(f"Wrote {script} (the commands above, in order).")
    if args.submit:
        _require("gcloud", script)
        subprocess.run(["bash", str(script)], check=True)


def write_slurm(args: argparse.Namespace, sweep: str, jobs: Sequence[Job], scripts: Path) -> None:
    opts = slurm.SlurmOptions(
        args.repo_dir or str(sweeps.REPO), args.nodes, args.gpus_per_node, args.per, args.time, args.partition,
        args.account, args.cpus_per_task, tuple(args.sbatch), args.setup, args.python or "python")
    submit = slurm.write(jobs, opts, sweep, scripts)
    print(submit.read_text())
    print(f"Wrote {len(jobs)} sbatch scripts and {submit}.")
    if args.submit:
        _require("sbatch", submit)
        subprocess.run(["bash", str(submit)], check=True)


if __name__ == "__main__":
    main()
