"""Is a job finished? ``python -m experiments.status ROOT`` prints every job of a launched sweep.

experiments/README.md#layout-of-a-sweep-root
"""

from __future__ import annotations

import json
import re
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
    """The newest checkpoint step in the workdir that orbax finished writing (0: none). On GCS an interrupted
    save leaves its numbered folder in place, unfinished (vgg_jax.checkpoints.is_finalized)."""
    from vgg_jax import checkpoints  # noqa: PLC0415 (orbax: only where a step is judged)

    directory = epath.Path(workdir) / "checkpoints"
    found = directory.iterdir() if directory.exists() else ()
    return max((int(p.name) for p in found if p.name.isdigit() and checkpoints.is_finalized(p)), default=0)


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


Scalars = dict[str, list[tuple[int, float]]]


def read_scalars(workdir: str) -> Scalars:
    """Every scalar of the run's event files; a step written twice (after a resume) keeps the later value."""
    files = sorted(epath.Path(workdir).glob("events.out.tfevents.*"), key=lambda p: (int(p.name.split(".")[3]), p.name))
    if not files:
        return {}
    tf = cli.import_tensorflow()  # slow, only when there is something to read; without its banner

    values: dict[str, dict[int, float]] = {}
    for f in files:
        try:
            for record in tf.data.TFRecordDataset(str(f)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                for v in event.summary.value:
                    if v.metadata.plugin_data.plugin_name == "scalars" and v.HasField("tensor"):
                        values.setdefault(v.tag, {})[int(event.step)] = float(tf.make_ndarray(v.tensor))
        except tf.errors.DataLossError:  # a running job is writing its last record: keep what was read
            continue
    return {tag: sorted(steps.items()) for tag, steps in values.items()}


def progress(workdir: str, steps: int, global_batch: int) -> str:
    """', 1234 img/s, ETA 5.2 h' from the run's latest logged steps/s (clu's ReportProgress), or ''."""
    rates = read_scalars(workdir).get("steps_per_sec")
    if not rates:
        return ""
    step, rate = rates[-1]
    hours = (steps - step) / max(rate, 1e-9) / 3600
    return f", {rate * global_batch:.0f} img/s at step {step}, ETA {hours:.1f} h"


def describe(job: dict, with_progress: bool = False) -> str:
    """'done', 'step k of N' (with throughput and ETA when asked), 'started, no checkpoint yet' (a run writes
    its workdir first), 'not started' or 'pending'."""
    if job["kind"] == "train":
        steps = job["facts"]["num_train_steps"]
        if run_done(job["path"], steps):
            return "done"
        step = max(run_step(job["path"]), checkpoint_step(job["path"]))
        if not step and not epath.Path(job["path"]).exists():
            return "not started"
        extra = progress(job["path"], steps, job["facts"]["global_batch_size"]) if with_progress else ""
        return f"step {step} of {steps}{extra}" if step else f"started, no checkpoint yet{extra}"
    return "done" if eval_done(job["path"], job["facts"]["protocol"]) else "pending"


def count(jobs: Sequence[dict], states: Sequence[str]) -> str:
    """'12 jobs (4 configurations, 3 seeds): 5 done, 1 running, 6 to do'."""
    seeds = {j["facts"].get("seed") for j in jobs if j["kind"] == "train"} - {None}
    configurations = {re.sub(r"-seed\d+$", "", j["name"]) for j in jobs if j["kind"] == "train"}
    shape = f" ({len(configurations)} configurations, {len(seeds)} seeds)" if len(seeds) > 1 else ""
    done = sum(s == "done" for s in states)
    running = sum(s.startswith(("step ", "started")) for s in states)
    return f"{len(jobs)} jobs{shape}: {done} done, {running} started, {len(jobs) - done - running} to do"


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
    states = [describe(job, with_progress=True) for job in jobs]
    for job, state in zip(jobs, states):
        print(f"{job['name']:<{width}}  {job['kind']:<5}  {state}")
    print(count(jobs, states))
    return 0


if __name__ == "__main__":
    cli.run(lambda argv: sys.exit(main(argv)))
