"""Launch a sweep (or a single run): locally in dependency order, on a Cloud TPU pod, or on SLURM.

``python -m experiments.launch --sweep=paper --root=runs/paper [--mode=tpu|slurm] [--config.x=...]``;
experiments/README.md#launching
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import flags
from etils import epath

if __package__ in (None, ""):  # `python experiments/launch.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import slurm, status, sweeps, tpu  # noqa: E402
from experiments.plan import Job, plan, write_manifest  # noqa: E402
from vgg_jax import cli, hardware, preflight, storage  # noqa: E402
from vgg_jax.errors import UserError  # noqa: E402

MODES = ("local", "tpu", "slurm")


def is_done(job: Job) -> bool:
    if job.kind == "train":
        return status.run_done(job.path, job.facts["num_train_steps"])
    return status.eval_done(job.path, job.facts["protocol"])


def run_local(jobs: Sequence[Job], root: str, *, dry_run: bool = False, echo: Callable[[str], None] = print) -> None:
    """Runs the jobs one after another in this machine's Python, each logging to ``<root>/logs/<job>.log``
    (under a gs:// root: written locally while the job runs, copied there when it ends).

    Finished jobs are skipped. ``<root>/launch.jsonl`` records each job's start, end and skip.
    """
    logs = storage.path(root) / "logs"
    local_logs = storage.path(tempfile.mkdtemp(prefix="vgg_jax_logs_")) if "://" in root else logs

    def record(job: Job, event: str, **extra) -> None:
        with (storage.path(root) / "launch.jsonl").open("a") as f:
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
        local_logs.mkdir(parents=True, exist_ok=True)
        log = local_logs / f"{job.name}.log"
        if local_logs != logs and (logs / log.name).exists():  # the job's earlier log, to append to
            log.write_bytes((logs / log.name).read_bytes())
        started = time.time()
        with log.open("a") as f:  # a local file: the job's output goes straight to it
            # Its own session: a Ctrl-C at the terminal reaches the launcher only, which forwards it as SIGTERM.
            proc = subprocess.Popen(
                [sys.executable, *job.args],
                cwd=sweeps.REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            record(job, "start", command=job.command(), pid=proc.pid, log=str(logs / log.name))
            with ForwardSignals(proc) as forwarded:
                code = _wait_reporting(proc, log, echo, prefix)
        if local_logs != logs:
            (logs / log.name).write_bytes(log.read_bytes())
        seconds = round(time.time() - started, 1)
        if forwarded.signal:
            name = signal.Signals(forwarded.signal).name
            record(job, "stopped", seconds=seconds, exit_code=code, signal=name)
            echo(
                f"{prefix}: stopped by {name} (passed on as SIGTERM: a training run saves a checkpoint first; exit "
                f"code {code}); rerun the same command to resume."
            )
            raise SystemExit(128 + forwarded.signal)
        if code != 0 or not is_done(job):
            record(job, "failed", seconds=seconds, exit_code=code)
            tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
            why = f"exited with {code}" if code else "ended before its last step (stopped or preempted)"
            raise SystemExit(
                f"{prefix} {why}; the end of {logs / log.name}:\n{tail}\nFix it and rerun the same command: "
                "finished jobs are skipped and this one resumes from its last checkpoint."
            )
        record(job, "done", seconds=seconds)
        echo(f"{prefix}: done in {seconds:.0f} s")


class ForwardSignals:
    """While a job runs, SIGTERM and SIGINT sent to the launcher are passed on to the job as SIGTERM (which a
    training run answers by saving a checkpoint and exiting), as torch.distributed.run forwards signals to its
    workers; the launcher then waits for the job and stops. Only in the main thread (where signals are handled)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.signal, self.previous = proc, 0, {}

    def _handler(self, signum: int, frame) -> None:
        self.signal = signum
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def __enter__(self) -> ForwardSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    def string(name: str, default: str | None, help_: str) -> None:
        flags.DEFINE_string(name, default, help_, flag_values=values)

    # What to run.
    string("sweep", "paper", "'paper' (Table 3 with the evaluations of Tables 3-5) or a sweep JSON file.")
    string("config", None, "One run of this config instead of a sweep, e.g. configs/paper.py:D,256,gpu.")
    string("name", None, "The single run's name (default: from --config).")
    string("nets", ",".join(sweeps.NETS), "Paper sweep: configurations.")
    string("scales", ",".join(sweeps.SCALES), "Paper sweep: training scales.")
    string("tables", ",".join(sweeps.TABLES), "Paper sweep: evaluations ('' for none).")
    flags.DEFINE_bool(
        "staged",
        None,
        "Paper sweep: B..E start from the trained A (Sect. 3.1). Default: yes with --base_config (reduced "
        "sizes, where deep nets from random init stall), no on ImageNet (Glorot init); --nostaged: never.",
        flag_values=values,
    )
    flags.DEFINE_enum(
        "platform",
        None,
        ["cpu", "gpu", "tpu"],
        "Paper sweep: configs/paper.py variant (default: tpu for --mode=tpu, else gpu).",
        flag_values=values,
    )
    string("base_config", None, "Paper sweep on this config (e.g. configs/demo.py), scales x crop/224.")
    string("only", None, "Comma-separated job names: run these and what they depend on.")
    flags.DEFINE_integer(
        "seeds",
        1,
        "Each configuration this many times (seeds 0..N-1, '-seed<k>' in the names): "
        "the report then gives mean, spread and whether differences are real.",
        flag_values=values,
    )
    # Where.
    flags.DEFINE_enum("mode", "local", list(MODES), "Where the jobs run.", flag_values=values)
    string("root", None, "Directory (or gs:// URL) of the workdirs (default: runs/<sweep name>).")
    string("scripts_dir", None, "tpu/slurm: where the scripts go (default: <root>/<mode>).")
    flags.DEFINE_bool("dry_run", False, "Print the commands only; write and submit nothing.", flag_values=values)
    flags.DEFINE_bool("submit", False, "tpu/slurm: also run run_all.sh / submit.sh.", flag_values=values)
    flags.DEFINE_bool(
        "skip_preflight",
        False,
        "tpu/slurm: do not compile each job for the slice or GPUs first (vgg_jax.preflight) to see that it fits.",
        flag_values=values,
    )
    flags.DEFINE_bool(
        "stop",
        False,
        "tpu: stop the sweep's jobs (those of --only) on every worker with SIGTERM (a training run saves a "
        "checkpoint first; rerunning run_all.sh resumes). With --dry_run, print the commands.",
        flag_values=values,
    )
    string(
        "repo_dir",
        None,
        "tpu/slurm: the checkout on the workers (default: vgg_jax in the home directory for "
        "tpu, this checkout for slurm).",
    )
    string("setup", "", "tpu/slurm: shell run first, e.g. 'source venv/bin/activate'.")
    string("python", None, "tpu/slurm: the interpreter on the workers (default: python3 / python).")
    string("tpu", None, "tpu: the TPU VM name.")
    string("zone", None, "tpu: its zone.")
    string("project", "", "tpu: its project.")
    string("install", tpu.TpuOptions.install, "tpu: run on every worker after the code is unpacked there.")
    flags.DEFINE_bool("internal_ip", False, "tpu: reach the workers by internal IP.", flag_values=values)
    flags.DEFINE_bool("tunnel_through_iap", False, "tpu: reach the workers through IAP.", flag_values=values)
    flags.DEFINE_enum(
        "create", "", ["", "spot", "reserved"], "tpu: create the slice first, as a queued resource.", flag_values=values
    )
    string("accelerator_type", "", "tpu: the slice's type, e.g. v5litepod-64: each job is compiled for it first.")
    string("runtime_version", "", "tpu: with --create (default: the generation's TPU VM image).")
    flags.DEFINE_integer(
        "poll_seconds", 300, "tpu: how often run_all.sh asks worker 0 for a job's state.", flag_values=values
    )
    flags.DEFINE_enum(
        "gpu", None, list(hardware.GPU), "slurm: the partition's GPUs: each job is compiled for them first.", values
    )
    flags.DEFINE_integer("nodes", 1, "slurm: nodes per job.", flag_values=values)
    flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node.", flag_values=values)
    flags.DEFINE_enum("per", "gpu", ["gpu", "node"], "slurm: a process per GPU or per node.", flag_values=values)
    string("time", "3-00:00:00", "slurm: time limit per job (jobs requeue to continue).")
    string("partition", "", "slurm: partition.")
    string("account", "", "slurm: account.")
    flags.DEFINE_integer(
        "cpus_per_task", 0, "slurm: CPUs per process (0: --cpus_per_gpu per GPU of the process).", flag_values=values
    )
    flags.DEFINE_integer(
        "cpus_per_gpu",
        12,
        "slurm: host cores per GPU (the input pipeline's need, docs/benchmarks.md).",
        flag_values=values,
    )
    string("mem_per_gpu", "48G", "slurm: host memory per GPU (--mem-per-gpu).")
    flags.DEFINE_integer("eval_gpus", 1, "slurm: GPUs of an evaluation job (one node).", flag_values=values)
    string("eval_time", "04:00:00", "slurm: time limit of an evaluation job.")
    flags.DEFINE_multi_string("sbatch", [], "slurm: extra sbatch option (repeatable).", flag_values=values)


def _wait_reporting(
    proc: subprocess.Popen, log: epath.Path, echo: Callable[[str], None], prefix: str, every: float = 60.0
) -> int:
    """Waits for a job, echoing the newest progress line its log gained (clu's ReportProgress: rate, done/total,
    ETA) every ``every`` seconds."""
    last = ""
    while True:
        try:
            return proc.wait(timeout=every)
        except subprocess.TimeoutExpired:
            text = log.read_bytes().decode(errors="replace")
            notes = [line for line in text.splitlines() if "Setting work unit notes:" in line]
            if notes and notes[-1] != last:
                last = notes[-1]
                echo(f"{prefix}: {last.split('Setting work unit notes: ', 1)[1]}")


def parse_args(argv: Sequence[str] | None) -> tuple[types.SimpleNamespace, list[str]]:
    """The launcher's flags, and the ``--config.key=value`` overrides that apply to every run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    values, rest = cli.parse(
        [a for a in argv if not a.startswith("--config.")], define_flags, "python -m experiments.launch", __doc__
    )
    if rest:
        cli.fail(f"unexpected arguments {rest}: config overrides look like --config.key=value.")
    args = types.SimpleNamespace(**values.flag_values_dict())
    if args.base_config and args.platform:
        cli.fail("--platform picks a configs/paper.py variant; with --base_config set --config.model.dtype instead.")
    if args.mode == "tpu" and not (args.tpu and args.zone):
        cli.fail("--mode=tpu needs --tpu=NAME and --zone=ZONE.")
    if args.stop and args.mode != "tpu":
        cli.fail(
            "--stop is for --mode=tpu. A local sweep stops when its launcher gets SIGTERM or Ctrl-C (the running "
            "job checkpoints first); a SLURM job with scancel --signal=TERM JOBID."
        )
    if (
        args.mode != "local"
        and not args.stop
        and not args.skip_preflight
        and not (args.gpu if args.mode == "slurm" else args.accelerator_type)
    ):
        what = (
            "--gpu=TYPE (the partition's GPUs: " + ", ".join(hardware.GPU) + ")"
            if args.mode == "slurm"
            else ("--accelerator_type=TYPE (the slice's, e.g. v5litepod-64)")
        )
        cli.fail(
            f"--mode={args.mode} compiles each job for its hardware before it spends a slot: give {what}, "
            "or --skip_preflight."
        )
    return args, overrides


def _split(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def build_sweep(args: types.SimpleNamespace, overrides: Sequence[str]) -> sweeps.Sweep:
    if args.config:
        path, _, arg = args.config.partition(":")
        name = args.name or "-".join([epath.Path(path).stem, *_split(arg)])
        sweep = sweeps.from_overrides(name, args.config, {name: ()}, overrides)
    elif args.sweep == "paper":
        options = dict(tables=_split(args.tables), overrides=overrides)
        if args.staged is not None:
            options["staged"] = args.staged
        if args.base_config:
            sweep = sweeps.reduced(args.base_config, _split(args.nets), _split(args.scales), **options)
        else:
            platform = args.platform or ("tpu" if args.mode == "tpu" else "gpu")
            sweep = sweeps.paper(_split(args.nets), _split(args.scales), platform=platform, **options)
    else:
        sweep = sweeps.load(args.sweep, overrides)
    sweep = sweep.with_seeds(args.seeds)
    return sweep.select(_split(args.only)) if args.only else sweep


def _require(tool: str, script: Path) -> None:
    if shutil.which(tool) is None:
        raise SystemExit(f"`{tool}` is not on PATH here: run {script} where it is (it was written, not submitted).")


def main(argv: Sequence[str] | None = None) -> None:
    args, overrides = parse_args(argv)
    try:
        launch(args, overrides)
    except ValueError as e:  # a bad sweep, config or option: the message says what to fix
        raise UserError(str(e)) from e


def launch(args: types.SimpleNamespace, overrides: Sequence[str]) -> None:
    sweep = build_sweep(args, overrides)
    root = args.root or f"runs/{sweep.name}"
    remote = "://" in root
    root = str(storage.path(root))
    jobs = plan(sweep, root, distributed=args.mode != "local")
    if args.stop:
        stop_tpu(args, jobs)
        return
    print(f"Sweep {sweep.name!r}: {len(jobs)} jobs under {root}")
    if args.mode == "local":
        if not args.dry_run:
            write_manifest(sweep, jobs, root)
        run_local(jobs, root, dry_run=args.dry_run)
        if not args.dry_run:
            print(f"All jobs finished. Report: python -m experiments.report {root}")
        return
    if remote and args.dry_run:  # a dry run touches no network: which jobs finished is checked when run
        print(f"(a dry run does not read {root}: finished jobs are skipped when the commands run)")
        done = set()
    else:
        done = {job.name for job in jobs if _finished(job)}
    for job in jobs:
        if job.name in done:
            print(f"{job.name}: finished already, not submitted")
    todo = [job for job in jobs if job.name not in done]
    if not args.skip_preflight:
        preflight_jobs(args, todo)  # before anything is written or submitted
    if not args.dry_run:
        write_manifest(sweep, jobs, root)
    if args.mode == "tpu" and not remote:
        print("Note: the workers of a pod share no disk; use a gs:// --root unless the TPU VM is a single host.")
    scripts = Path(args.scripts_dir or default_scripts_dir(sweep.name, root, args.mode)).resolve()
    if args.mode == "tpu":
        write_tpu(args, todo, scripts)
    else:
        write_slurm(args, sweep.name, todo, scripts)


def job_shape(config) -> str:
    """What decides a job's compiled programs: the model (not its initialisation), the batch and its split, the
    mesh, the in-training evaluation (the centre crop's shape is the crop's; a dense pass's, its test scale's)."""
    dense = "dense" in config.eval_protocol
    return repr(
        (
            sorted((k, v) for k, v in config.model.items() if not k.startswith("init_")),
            config.data.crop_size,
            config.global_batch_size,
            config.grad_accum_steps,
            sorted(config.mesh.items()),
            config.eval_protocol,
            config.eval_batch_size,
            (max(int(q) for q in config.data.eval_scales), tuple(config.data.dense_aspect_buckets)) if dense else (),
        )
    )


def preflight_jobs(args: types.SimpleNamespace, jobs: Sequence[Job]) -> None:
    """Compiles each distinct shape of the training jobs (with its in-training evaluation) for the slice or the
    GPUs the jobs will get (``vgg_jax.preflight``), printing the figures; UserError naming the job, its memory and
    the ways out when one does not fit. Before anything is written or submitted."""
    if args.mode == "slurm":
        topology = f"{args.gpu}x{args.gpus_per_node}" + (f",nodes={args.nodes}" if args.nodes > 1 else "")
    else:
        topology = args.accelerator_type
    spec = preflight.parse_topology(topology)
    shapes: dict[str, list[tuple[Job, Any]]] = {}
    for job in jobs:
        if job.kind == "train":
            config = sweeps.resolve_config(job.facts["config"], job.facts["overrides"])
            config.distributed.enabled = True  # as the job's command line sets it
            shapes.setdefault(job_shape(config), []).append((job, config))
    for group in shapes.values():
        job, config = group[0]
        others = f" (and {len(group) - 1} more job(s) of its shape: {', '.join(j.name for j, _ in group[1:])})"
        print(f"preflight: {job.name}{others if len(group) > 1 else ''} on {topology}", flush=True)
        _, results = preflight.check(config, spec)
        for r in results:
            if not r.fits:
                need = f"{preflight.gib(r.total)} per {spec.chip}" if r.total else r.error
                raise UserError(
                    f"job {job.name} does not fit on {topology}: its {r.what} step needs {need} of "
                    f"{preflight.gib(spec.usable_bytes)} usable; rematerialise (--config.model.remat=blocks), "
                    f"take a smaller per-{spec.chip} batch (--config.global_batch_size, or --config.grad_accum_steps=N "
                    f"to keep it), or more {spec.chip}s; --skip_preflight launches it anyway."
                )
    print(f"preflight: {len(shapes)} job shape(s) fit on {topology}", flush=True)


def default_scripts_dir(sweep: str, root: str, mode: str) -> str:
    """``<root>/<mode>`` for a local root; ``<sweep>-<mode>`` here for a bucket (``paper-tpu``; a single run of
    ``configs/paper.py:D,256,tpu`` gives ``paper-D-256-tpu``, the mode not repeated)."""
    if "://" not in root:
        return f"{root}/{mode}"
    return sweep if sweep.endswith(f"-{mode}") else f"{sweep}-{mode}"


def _finished(job: Job) -> bool:
    """Whether a job finished; False (with a note) when its directory cannot be read from here."""
    try:
        return is_done(job)
    except Exception as e:  # no credentials or no network for gs://: the workers check it themselves
        print(f"{job.name}: could not check {job.path} from here ({type(e).__name__}); the job checks it itself")
        return False


def tpu_options(args: types.SimpleNamespace) -> tpu.TpuOptions:
    return tpu.TpuOptions(
        args.tpu,
        args.zone,
        args.project,
        args.repo_dir or "vgg_jax",
        args.setup,
        args.install,
        args.python or "python3",
        args.internal_ip,
        args.tunnel_through_iap,
        args.create,
        args.accelerator_type,
        args.runtime_version,
        args.poll_seconds,
    )


def stop_tpu(args: types.SimpleNamespace, jobs: Sequence[Job]) -> None:
    """Stops the jobs on every worker (SIGTERM; a job that is not running is left alone)."""
    lines = [tpu.stop_command(job, tpu_options(args)) for job in jobs]
    print("\n".join(lines))
    if args.dry_run:
        return
    if shutil.which("gcloud") is None:
        raise SystemExit("`gcloud` is not on PATH here: run the lines above where it is.")
    for line in lines:
        subprocess.run(line, shell=True, check=True)


def write_tpu(args: types.SimpleNamespace, jobs: Sequence[Job], scripts: Path) -> None:
    opts = tpu_options(args)
    if args.dry_run:
        print("\n".join(tpu.commands(jobs, opts)))
        print(f"(dry run: nothing written; run_all.sh and {tpu.BUNDLE} would go to {scripts})")
        return
    script, commands = tpu.write(jobs, opts, scripts)
    print("\n".join(commands))
    print(f"Wrote {script} (the commands above, in order) and {scripts / tpu.BUNDLE} (the code for the workers).")
    if args.submit:
        _require("gcloud", script)
        subprocess.run(["bash", str(script)], check=True)


def write_slurm(args: types.SimpleNamespace, sweep: str, jobs: Sequence[Job], scripts: Path) -> None:
    opts = slurm.SlurmOptions(
        repo_dir=args.repo_dir or str(sweeps.REPO),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        per=args.per,
        time=args.time,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        cpus_per_gpu=args.cpus_per_gpu,
        mem_per_gpu=args.mem_per_gpu,
        eval_gpus=args.eval_gpus,
        eval_time=args.eval_time,
        extra=tuple(args.sbatch),
        setup=args.setup,
        python=args.python or "python",
    )
    if args.dry_run:
        files = {job.name: f"{job.name}.sbatch" for job in jobs}
        for job in jobs:
            print(f"# {scripts / files[job.name]}\n{slurm.job_script(job, opts, sweep, str(scripts / 'logs'))}")
        print(f"# {scripts / 'submit.sh'}\n{slurm.submit_script(jobs, files)}")
        print(f"(dry run: nothing written or submitted; the scripts above would go to {scripts})")
        return
    submit = slurm.write(jobs, opts, sweep, scripts)
    print(submit.read_text())
    print(f"Wrote {len(jobs)} sbatch scripts and {submit}.")
    if args.submit:
        _require("sbatch", submit)
        subprocess.run(["bash", str(submit)], check=True)


if __name__ == "__main__":
    cli.run(main)
