"""Did every run of a launched sweep leave chance, and reach a band? One JSON line per run, and a table.

python -m benchmarks.leave_chance ROOT [--band=LO1,HI1,LO5,HI5] [--out=FILE.jsonl]; docs/reproduction.md#runs-that-stall
"""

from __future__ import annotations

import collections
import json
import platform
import re
import sys

from absl import flags

from experiments.status import read_scalars
from vgg_jax import cli, storage


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("out", None, "Append one JSON line per finished run not yet in this file.", flag_values=values)
    flags.DEFINE_string(
        "band", None, "LO1,HI1,LO5,HI5: the documented band of top-1 and top-5 error (percent).", flag_values=values
    )
    flags.DEFINE_float("chance_top1", 90.0, "Top-1 error of chance (percent): 90 for 10 classes.", flag_values=values)
    flags.DEFINE_float(
        "margin",
        10.0,
        "A run left chance when its final top-1 error is at least this far below chance.",
        flag_values=values,
    )
    flags.DEFINE_string("label", "", "Names the software stack of the runs (e.g. pinned-py3.11).", flag_values=values)


def stack() -> dict[str, str]:
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import numpy  # noqa: PLC0415

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": numpy.__version__,
    }


def run_record(root, run: dict) -> dict | None:
    """The outcome of one finished run of the sweep under ``root``; None while it is unfinished."""
    workdir = root / run["name"]
    results = workdir / "results.json"
    if not results.exists():
        return None
    summary = json.loads(results.read_text())
    top1 = next(v for k, v in summary.items() if k.startswith("top1_error@"))
    top5 = next(v for k, v in summary.items() if k.startswith("top5_error@"))
    losses = read_scalars(str(workdir)).get("train/loss", [])
    log = root / "logs" / f"{run['name']}.log"
    warned = log.exists() and bool(re.search("stalled at chance", log.read_text()))
    return {
        "root": str(root),
        "run": run["name"],
        "net": run.get("net") or summary["model"],
        "seed": run.get("seed") or 0,
        "steps": summary["step"],
        "top1": round(top1, 2),
        "top5": round(top5, 2),
        "train_loss": [[s, round(v, 4)] for s, v in losses],
        "stall_warning": warned,
        "rollbacks": summary.get("rollbacks", 0),  # loss spikes the run rolled back (docs/training.md#rollback)
        "train_seconds": summary["train_seconds"],
    }


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.leave_chance ROOT... [--band=LO1,HI1,LO5,HI5] [--out=FILE.jsonl]``: per configuration of
    the launched sweeps under the ROOTs (local or gs://), how many finished runs left chance and reached the band."""
    values, args = cli.parse(argv, define_flags, "python -m benchmarks.leave_chance", main.__doc__)
    roots = [storage.path(a) for a in args]
    if not roots:
        cli.fail("name one or more sweep roots (the --root of experiments.launch) after the flags.")
    band = re.fullmatch(r"([\d.]+),([\d.]+),([\d.]+),([\d.]+)", values.band) if values.band else None
    if values.band and not band:
        cli.fail(f"--band={values.band}: expected four numbers, LO1,HI1,LO5,HI5 (e.g. --band=20,60,0,10).")
    band = [float(x) for x in band.groups()] if band else None
    for root in roots:
        if not (root / "sweep.json").exists():
            cli.fail(f"{root} holds no sweep.json: name the --root of python -m experiments.launch.")
    seen = set()
    out = storage.path(values.out) if values.out else None
    if out and out.exists():
        seen = {(r["root"], r["run"]) for r in map(json.loads, out.read_text().splitlines())}
    versions = {"label": values.label, **stack()}
    rows = []
    for root in roots:
        for run in json.loads((root / "sweep.json").read_text())["sweep"]["runs"]:
            record = run_record(root, run)
            if record is None:
                continue
            record |= {"left_chance": record["top1"] <= values.chance_top1 - values.margin, "stack": versions}
            if band:
                record["in_band"] = band[0] <= record["top1"] <= band[1] and band[2] <= record["top5"] <= band[3]
            rows.append(record)
            if out and (record["root"], record["run"]) not in seen:
                text = out.read_text() if out.exists() else ""  # appended by rewriting: a gs:// object has no append
                out.write_text(text + json.dumps(record) + "\n")
    by_net = collections.defaultdict(list)
    for r in rows:
        by_net[r["net"]].append(r)
    print(
        f"| configuration | runs | left chance | {'in band | ' if band else ''}top-1 error (min-max) | stall warnings"
        " | rolled back |"
    )
    print(f"|---|---|---|{'---|' if band else ''}---|---|---|")
    for net, rs in by_net.items():
        top1 = [r["top1"] for r in rs]
        cells = [net, len(rs), sum(r["left_chance"] for r in rs)]
        if band:
            cells.append(sum(r["in_band"] for r in rs))
        cells += [
            f"{min(top1):.1f}-{max(top1):.1f}",
            sum(r["stall_warning"] for r in rs),
            sum(r["rollbacks"] > 0 for r in rs),
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    failed = [r["run"] for r in rows if not r["left_chance"] or (band and not r["in_band"])]
    if failed:
        print(f"outside the target: {', '.join(failed)}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
