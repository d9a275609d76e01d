"""Paper-style report of a sweep: ``python -m experiments.report ROOT [--out=DIR]``.

experiments/README.md#reports
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from absl import flags
from etils import epath

if __package__ in (None, ""):  # `python experiments/report.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import plots, published, status  # noqa: E402
from experiments.results import EvalResult, Results, RunResult, collect  # noqa: E402
from vgg_jax import cli  # noqa: E402
from vgg_jax.data.config import train_scale as scale_label  # noqa: E402

NA = "–"


def _f(value: float | None, digits: int = 2) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def train_scale(facts: dict) -> str:
    return scale_label(facts["scale_min"], facts["scale_max"])


def depth(net: str) -> int:
    """Weight layers of a paper configuration (its convolutions plus three FC layers)."""
    from vgg_jax import models  # noqa: PLC0415  (imports JAX)

    return sum(len(block) for block in models.get_model(net).stages) + 3


def runs_table(results: Results) -> str:
    rows = []
    for r in results.runs:
        centre = r.centre_crop()
        rate = r.images_per_second()
        rows.append(
            [
                r.name,
                r.facts["model"],
                train_scale(r.facts),
                status.describe(dict(kind="train", path=r.path, facts=r.facts)),
                duration(r.summary["train_seconds"]) if r.summary else NA,
                _f(rate, 0),
                str(centre[0]) if centre else NA,
                _f(centre[1]) if centre else NA,
                _f(centre[2]) if centre else NA,
            ]
        )
    header = ["run", "model", "train S", "state", "train time", "img/s", "Q", "top-1 (centre)", "top-5 (centre)"]
    return _table(header, rows)


class Table3Row(NamedTuple):
    run: RunResult
    measured_by: str
    test_scales: str
    point: plots.Point  # our errors and the paper's


def table3_rows(results: Results) -> list[Table3Row]:
    """Each run placed in the paper's Table 3: its dense single-scale evaluation, else its centre crop."""
    dense = {e.facts["runs"][0]: e for e in results.evals if e.facts["table"] == "3" and e.errors()}
    out = []
    for r in results.runs:
        if not r.facts.get("net"):
            continue
        if r.name in dense:
            top1, top5, _ = dense[r.name].errors()
            q, how = ",".join(map(str, dense[r.name].test_scales())), "dense"
        elif r.centre_crop():
            q, top1, top5 = r.centre_crop()
            how = "centre crop (end of training)"
        else:
            continue
        paper = published.TABLE3.get((r.facts["net"], r.facts["scale"]))
        point = plots.Point(
            r.facts["net"],
            r.facts["scale"],
            depth(r.facts["net"]),
            top1,
            top5,
            paper[1] if paper else None,
            paper[2] if paper else None,
        )
        out.append(Table3Row(r, how, str(q), point))
    return out


def table3(rows: Sequence[Table3Row]) -> str:
    body = []
    for row in rows:
        p = row.point
        paper = published.TABLE3.get((p.net, p.scale))
        body.append(
            [
                p.net,
                row.run.name,
                train_scale(row.run.facts),
                row.test_scales,
                _f(p.top1),
                _f(p.top5),
                _f(p.paper_top1, 1),
                _f(p.paper_top5, 1),
                str(paper[0]) if paper else NA,
                row.measured_by,
            ]
        )
    header = [
        "ConvNet",
        "run",
        "train S",
        "test Q",
        "top-1 (ours)",
        "top-5 (ours)",
        "top-1 (paper)",
        "top-5 (paper)",
        "paper Q",
        "measured by",
    ]
    return _table(header, body)


def _eval_rows(results: Results, evals: Sequence[EvalResult]) -> list[list[str]]:
    rows = []
    for e in evals:
        runs = [results.run(n) for n in e.facts["runs"]]
        net = "+".join(r.facts.get("net") or r.facts["model"] for r in runs if r)
        scale = runs[0].facts.get("scale", "") if len(runs) == 1 and runs[0] else ""
        paper = published.MULTI_SCALE.get((net, scale, e.facts["protocol"]))
        errors = e.errors()
        rows.append(
            [
                net,
                e.name,
                ", ".join(train_scale(r.facts) for r in runs if r),
                ",".join(map(str, e.test_scales())) or NA,
                e.facts["protocol"],
                _f(errors[0]) if errors else "not run",
                _f(errors[1]) if errors else NA,
                _f(paper[0], 1) if paper else NA,
                _f(paper[1], 1) if paper else NA,
                str(errors[2]) if errors else NA,
            ]
        )
    return rows


EVAL_HEADER = [
    "ConvNet",
    "evaluation",
    "train S",
    "test Q",
    "method",
    "top-1 (ours)",
    "top-5 (ours)",
    "top-1 (paper)",
    "top-5 (paper)",
    "images",
]


def torchvision_table(results: Results) -> str | None:
    rows = []
    for r in results.runs:
        reference = published.TORCHVISION_CENTRE_CROP.get(r.facts["model"].lower())
        centre = r.centre_crop()
        if reference and centre and r.facts.get("scale") == "256":
            rows.append(
                [r.name, r.facts["model"], centre[0], _f(centre[1]), _f(centre[2]), _f(reference[0]), _f(reference[1])]
            )
    if not rows:
        return None
    header = ["run", "model", "Q", "top-1 (ours)", "top-5 (ours)", "top-1 (torchvision)", "top-5 (torchvision)"]
    return _table(header, rows)


def write_report(root: str, out: str | None = None) -> epath.Path:
    """Writes report.md and the figures; returns the report's path."""
    results = collect(root)
    out_dir = epath.Path(out or epath.Path(root) / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []

    def save(fig, filename: str, caption: str) -> None:
        if fig is not None:
            (out_dir / filename).write_bytes(plots.png(fig))
            figures.append((filename, caption))

    t3 = table3_rows(results)
    points = [row.point for row in t3]
    sections = [f"# Sweep {results.name!r}", f"Workdirs under `{root}`.", "## Runs", runs_table(results)]
    if t3:
        sections += [
            "## Table 3: single test scale (top-1 / top-5 validation error, %)",
            "Paper: Q = S for fixed S, Q = 384 for S in [256, 512].",
            table3(t3),
        ]
    titles = {
        "4": "## Table 4: multiple test scales",
        "5": "## Table 5: dense, multi-crop, and both",
        "ensemble": "## Ensembles",
        "": "## Other evaluations",
    }
    for table, title in titles.items():
        chosen = [e for e in results.evals if e.facts["table"] == table]
        if table == "5":  # the paper's Table 5 repeats the dense multi-scale result of each model
            models = {e.facts["runs"][0] for e in chosen}
            chosen = [e for e in results.evals if e.facts["table"] == "4" and e.facts["runs"][0] in models] + chosen
        if chosen:
            sections += [title, _table(EVAL_HEADER, _eval_rows(results, chosen))]
    tv = torchvision_table(results)
    if tv:
        sections += [
            "## Centre crop vs torchvision's retrained weights (centre crop at Q, top-1 / top-5 error %)",
            "torchvision: the 224 crop of the image rescaled to 256.",
            tv,
        ]

    for r in results.runs:
        save(plots.training_curves(r.name, r.scalars), f"curves_{r.name}.png", f"training curves of {r.name}")
    save(plots.error_vs_depth(points), "error_vs_depth.png", "error against depth (Table 3 errors)")
    save(plots.lrn(points), "lrn.png", "LRN: A against A-LRN")
    save(plots.fixed_vs_jittered(points), "fixed_vs_jittered.png", "fixed against jittered training scale")
    sections += ["## Figures", *(f"![{caption}]({name})" for name, caption in figures)]
    report = out_dir / "report.md"
    report.write_text("\n\n".join(sections) + "\n")
    return report


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("out", None, "Output directory (default: ROOT/report).", flag_values=values)


def main(argv: Sequence[str] | None = None) -> epath.Path:
    """``python -m experiments.report ROOT [--out=DIR]``: ROOT is the sweep root (the launcher's --root),
    or any directory of training workdirs."""
    values, rest = cli.parse(argv, define_flags, "python -m experiments.report", main.__doc__)
    if len(rest) != 1 or not epath.Path(rest[0]).is_dir():
        cli.fail(f"give one sweep ROOT directory; got {rest}.")
    report = write_report(rest[0], values.out)
    print(report.read_text())
    print(f"Wrote {report} and its figures.", file=sys.stderr)
    return report


if __name__ == "__main__":
    cli.run(main)
