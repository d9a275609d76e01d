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

from experiments import compare, plots, published, status  # noqa: E402
from experiments.results import EvalResult, Results, RunResult, collect  # noqa: E402
from vgg_jax import cli  # noqa: E402
from vgg_jax.data.config import train_scale as scale_label  # noqa: E402

NA = "–"
IMAGENET = "imagenet2012"  # the paper's data: only runs on it share a table or an axis with the paper


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


def _s(facts: dict) -> str:
    return f"S = {train_scale(facts)}"


def depth(net: str) -> int:
    """Weight layers of a paper configuration (its convolutions plus three FC layers)."""
    from vgg_jax import models  # noqa: PLC0415  (imports JAX)

    return sum(len(block) for block in models.get_model(net).stages) + 3


def _joined(values) -> str:
    return ", ".join(str(v) for v in dict.fromkeys(values)) or NA


PAPER_SIZE = "width 64, fc 4096, crop 224"  # the paper's networks (Table 1): conv1 64 channels, fc6/fc7 4096


def model_size(facts: dict) -> str:
    """'width 8, fc 128, crop 96' of a run (a manifest from before these facts were recorded: '?')."""
    return f"width {facts.get('width', '?')}, fc {facts.get('fc_width', '?')}, crop {facts.get('crop_size', '?')}"


class Data(NamedTuple):
    """What every table and figure of the report was measured on."""

    dataset: str
    train_split: str
    eval_split: str
    steps: str
    seeds: str  # seeds per configuration, e.g. '3' or '1-3'
    size: str  # the networks' width, fc width and crop, e.g. 'width 8, fc 128, crop 96'

    @property
    def on_imagenet(self) -> bool:
        return self.dataset == IMAGENET

    def sizes(self) -> str:
        return self.size if self.size == PAPER_SIZE else f"{self.size} (reduced; the paper's: {PAPER_SIZE})"

    def line(self) -> str:
        return (
            f"Data: {self.dataset}, trained on `{self.train_split}`, evaluated on `{self.eval_split}`; "
            f"{self.steps} training steps; {self._seeds()} per configuration; networks at {self.sizes()}."
        )

    def short(self) -> str:
        return f"{self.dataset} {self.eval_split}, {self.size}, {self.steps} steps, {self._seeds()} each"

    def _seeds(self) -> str:
        return f"{self.seeds} seed" + ("" if self.seeds == "1" else "s")

    def of_run(self, facts: dict) -> str:
        """The caption of one run's figure: its S and seed, model size, data and steps (not the sweep's seeds)."""
        seed = f", seed {facts['seed']}" if "seed" in facts else ""
        return (
            f"{_s(facts)}{seed}, {model_size(facts)}, {facts.get('dataset', '?')} {facts.get('eval_split', '?')}, "
            f"{facts['num_train_steps']} steps"
        )


def describe_data(results: Results) -> Data:
    facts = [r.facts for r in results.runs]
    counts = [len(c.runs) for c in configurations(results)] or [len(results.runs)]
    seeds = str(min(counts)) if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    return Data(
        _joined(f.get("dataset", "?") for f in facts),
        _joined(f.get("train_split", "?") for f in facts),
        _joined(f.get("eval_split", "?") for f in facts),
        _joined(f["num_train_steps"] for f in facts),
        seeds,
        " / ".join(dict.fromkeys(model_size(f) for f in facts)) or NA,
    )


class Configuration(NamedTuple):
    """One paper configuration at one training scale: all its seeds' runs."""

    net: str
    scale: str  # the paper's label ('256', '384', '256-512'): which of its runs this mirrors
    runs: list[RunResult]


def configurations(results: Results) -> list[Configuration]:
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results.runs:
        if r.facts.get("net"):
            groups.setdefault((r.facts["net"], r.facts["scale"]), []).append(r)
    return [Configuration(net, scale, runs) for (net, scale), runs in groups.items()]


def runs_table(results: Results) -> str:
    rows = []
    for r in results.runs:
        centre = r.centre_crop()
        rate = r.images_per_second()
        rows.append(
            [
                r.name,
                r.facts["model"],
                str(r.facts.get("seed", NA)),
                train_scale(r.facts),
                str(r.facts["num_train_steps"]),
                status.describe(dict(kind="train", path=r.path, facts=r.facts)),
                duration(r.summary["train_seconds"]) if r.summary else NA,
                _f(rate, 0),
                str(centre[0]) if centre else NA,
                _f(centre[1]) if centre else NA,
                _f(centre[2]) if centre else NA,
            ]
        )
    header = ["run", "model", "seed", "train S", "steps", "state", "train time", "img/s", "test Q", "top-1", "top-5"]
    return _table(header, rows)


class Table3Row(NamedTuple):
    config: Configuration
    measured_by: str
    test_scales: str
    point: plots.Point  # every seed's errors by ``measured_by``, and the paper's
    centre: plots.Point | None  # the same by the centre crop at the end of training, where every seed has one


CENTRE = "centre crop (end of training)"


def table3_rows(results: Results) -> list[Table3Row]:
    """Each configuration in the paper's Table 3: its seeds' dense single-scale evaluations when every seed
    has one, else their centre crops at the end of training (one measure for all seeds)."""
    dense = {e.facts["runs"][0]: e for e in results.evals if e.facts["table"] == "3" and e.errors()}
    out = []
    for config in configurations(results):
        paper = published.TABLE3.get((config.net, config.scale))

        def point(errors: list) -> plots.Point:
            return plots.Point(
                config.net,
                config.scale,
                depth(config.net),
                tuple(e[0] for e in errors),
                tuple(e[1] for e in errors),
                paper[1] if paper else None,
                paper[2] if paper else None,
                _joined(_s(r.facts) for r in config.runs),
            )

        centre = None
        if all(r.centre_crop() for r in config.runs):
            centre = point([r.centre_crop()[1:] for r in config.runs])
        if all(r.name in dense for r in config.runs):
            errors = [dense[r.name].errors()[:2] for r in config.runs]
            q = _joined(",".join(map(str, dense[r.name].test_scales())) for r in config.runs)
            out.append(Table3Row(config, "dense", q, point(errors), centre))
        elif centre:
            out.append(Table3Row(config, CENTRE, _joined(r.centre_crop()[0] for r in config.runs), centre, centre))
        # else: some seed has not finished
    return out


def common_measure(rows: Sequence[Table3Row]) -> tuple[list[Table3Row], str]:
    """The rows as the figures and comparisons use them: one measure for all (dense where every configuration
    has it, else the centre crop), with a note when that is not what Table 3 shows."""
    if len({r.measured_by for r in rows}) <= 1 or not all(r.centre for r in rows):
        return list(rows), ""
    note = (
        "Figures and comparisons use the centre crop at the end of training, the measure every configuration "
        "has (Table 3 shows dense where it exists): errors measured two ways are not compared."
    )
    return [r._replace(measured_by=CENTRE, point=r.centre) for r in rows], note


def _mean_std(values: Sequence[float]) -> str:
    import numpy as np  # noqa: PLC0415

    v = np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def table3(rows: Sequence[Table3Row], with_paper: bool) -> str:
    body = []
    for row in rows:
        p = row.point
        line = [
            p.net,
            _joined(train_scale(r.facts) for r in row.config.runs),
            row.test_scales,
            str(len(p.top1)),
            _mean_std(p.top1),
            _mean_std(p.top5),
            ", ".join(f"{v:.2f}" for v in p.top1),
            row.measured_by,
        ]
        if with_paper:
            paper = published.TABLE3.get((p.net, p.scale))
            line += [_f(p.paper_top1, 1), _f(p.paper_top5, 1), str(paper[0]) if paper else NA]
        body.append(line)
    header = [
        "ConvNet",
        "train S",
        "test Q",
        "seeds",
        "top-1 (mean ± sd)",
        "top-5 (mean ± sd)",
        "top-1 per seed",
        "measured by",
    ]
    if with_paper:
        header += ["top-1 (paper)", "top-5 (paper)", "paper Q"]
    return _table(header, body)


NAMED_STEPS = {("C", "D"): "C → D: 1x1 → 3x3 convolutions in blocks 3-5"}  # same depth, other kernels


def comparisons(rows: Sequence[Table3Row]) -> list[tuple[str, compare.Comparison | str, compare.Comparison | None]]:
    """The paper's comparisons among the configurations present: A vs A-LRN (LRN), consecutive
    configurations at one training scale (A, B, C, D, E), fixed vs jittered S for one net; (what, top-1,
    top-5) each, or (what, why not, None) when the two were measured differently (dense vs centre crop)."""
    by = {(r.point.net, r.point.scale): r for r in rows}
    pairs: list[tuple[str, Table3Row, Table3Row]] = []
    for r in rows:
        p = r.point
        if p.net == "A" and ("A-LRN", p.scale) in by:
            pairs.append((f"LRN ({p.s_label})", r, by[("A-LRN", p.scale)]))
    for scale in dict.fromkeys(r.point.scale for r in rows):
        chain = [by[(n, scale)] for n in ("A", "B", "C", "D", "E") if (n, scale) in by]
        for a, b in zip(chain, chain[1:]):
            step = NAMED_STEPS.get((a.point.net, b.point.net))
            what = step or f"depth {a.point.net} → {b.point.net}: {a.point.depth} → {b.point.depth} layers"
            pairs.append((f"{what} ({a.point.s_label})", a, b))
    for net in dict.fromkeys(r.point.net for r in rows):
        jittered = by.get((net, "256-512"))
        for fixed in ("256", "384"):
            if jittered and (net, fixed) in by:
                pairs.append((f"{net}: fixed vs jittered S", by[(net, fixed)], jittered))
    out: list[tuple[str, compare.Comparison | str, compare.Comparison | None]] = []
    for what, ra, rb in pairs:
        a, b = ra.point, rb.point
        if ra.measured_by != rb.measured_by:
            out.append((what, f"not compared: {a.net} measured by {ra.measured_by}, {b.net} by {rb.measured_by}", None))  # noqa: E501
            continue
        out.append(
            (
                what,
                compare.welch(f"{a.net} ({a.s_label})", a.top1, f"{b.net} ({b.s_label})", b.top1),
                compare.welch(f"{a.net} ({a.s_label})", a.top5, f"{b.net} ({b.s_label})", b.top5),
            )
        )
    return out


def _eval_rows(results: Results, evals: Sequence[EvalResult], with_paper: bool) -> list[list[str]]:
    rows = []
    for e in evals:
        runs = [results.run(n) for n in e.facts["runs"]]
        net = "+".join(r.facts.get("net") or r.facts["model"] for r in runs if r)
        scale = runs[0].facts.get("scale", "") if len(runs) == 1 and runs[0] else ""
        errors = e.errors()
        row = [
            net,
            e.name,
            ", ".join(train_scale(r.facts) for r in runs if r),
            ",".join(map(str, e.test_scales())) or NA,
            e.facts["protocol"],
            _f(errors[0]) if errors else "not run",
            _f(errors[1]) if errors else NA,
            str(errors[2]) if errors else NA,
        ]
        if with_paper:
            paper = published.MULTI_SCALE.get((net, scale, e.facts["protocol"]))
            row += [_f(paper[0], 1) if paper else NA, _f(paper[1], 1) if paper else NA]
        rows.append(row)
    return rows


def _eval_header(with_paper: bool) -> list[str]:
    header = ["ConvNet", "evaluation", "train S", "test Q", "method", "top-1", "top-5", "images"]
    return header + ["top-1 (paper)", "top-5 (paper)"] if with_paper else header


def published_reference(points: Sequence[plots.Point], evals: Sequence[tuple[str, str, str]]) -> str | None:
    """The paper's ImageNet numbers for the configurations in the sweep, as a table of their own."""
    rows = [
        [
            p.net,
            p.scale,
            f"Table 3, Q = {published.TABLE3[(p.net, p.scale)][0]}",
            _f(p.paper_top1, 1),
            _f(p.paper_top5, 1),
        ]
        for p in points
        if p.paper_top1 is not None
    ]
    for key in dict.fromkeys(evals):
        if key in published.MULTI_SCALE:
            top1, top5 = published.MULTI_SCALE[key]
            rows.append([key[0], key[1], f"Tables 4-5, {key[2]}", _f(top1, 1), _f(top5, 1)])
    if not rows:
        return None
    return _table(["ConvNet", "paper S", "protocol", "top-1", "top-5"], rows)


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
    header = ["run", "model", "test Q", "top-1 (ours)", "top-5 (ours)", "top-1 (torchvision)", "top-5 (torchvision)"]
    return _table(header, rows)


TABLES = {
    "4": "## Table 4: multiple test scales",
    "5": "## Table 5: dense, multi-crop, and both",
    "ensemble": "## Ensembles",
    "": "## Other evaluations",
}


def write_report(root: str, out: str | None = None) -> epath.Path:
    """Writes report.md and the figures; returns the report's path."""
    results = collect(root)
    data = describe_data(results)
    same = data.on_imagenet
    out_dir = epath.Path(out or epath.Path(root) / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []

    def save(fig, filename: str, caption: str) -> None:
        if fig is not None:
            (out_dir / filename).write_bytes(plots.png(fig))
            figures.append((filename, f"{caption}; {data.short()}"))

    t3 = table3_rows(results)
    compared, measure_note = common_measure(t3)
    points = [row.point for row in compared]  # the figures' and comparisons' measure
    sections = [f"# Sweep {results.name!r}", data.line(), f"Workdirs under `{root}`.", "## Runs", runs_table(results)]
    if t3:
        sections += [
            "## Table 3: single test scale (top-1 / top-5 validation error, %)",
            f"{data.line()} Mean ± sample standard deviation over seeds.",
            table3(t3, with_paper=same),
        ]
    found = comparisons(compared)
    if found:
        sections += [
            "## Comparisons",
            "Each of the paper's comparisons present in the sweep: the change in error (second minus first), "
            "its 95% interval and Welch's t-test over the seeds (scipy.stats.ttest_ind, equal_var=False). "
            f"No interval below {compare.MIN_SEEDS} seeds per side (too wide to inform); an interval reaching "
            "past the ±100 points a difference of errors can span is cut there and marked. " + measure_note,
            "\n".join(
                f"- {what}: {top1}"
                if top5 is None
                else f"- {what}: {top1.sentence('top-1 error')}; {top5.sentence('top-5 error')}"
                for what, top1, top5 in found
            ),
        ]
    eval_keys = []
    for table, title in TABLES.items():
        chosen = [e for e in results.evals if e.facts["table"] == table]
        if table == "5":  # the paper's Table 5 repeats the dense multi-scale result of each model
            models = {e.facts["runs"][0] for e in chosen}
            chosen = [e for e in results.evals if e.facts["table"] == "4" and e.facts["runs"][0] in models] + chosen
        if chosen:
            sections += [title, data.line(), _table(_eval_header(same), _eval_rows(results, chosen, same))]
        for e in chosen:
            run = results.run(e.facts["runs"][0])
            if run and len(e.facts["runs"]) == 1:
                eval_keys.append((run.facts.get("net", ""), run.facts.get("scale", ""), e.facts["protocol"]))
    tv = torchvision_table(results) if same else None
    if tv:
        sections += [
            "## Centre crop vs torchvision's retrained weights (centre crop at Q, top-1 / top-5 error %)",
            "torchvision: the 224 crop of the image rescaled to 256.",
            tv,
        ]
    reference = None if same else published_reference([row.point for row in t3], eval_keys)
    if reference:
        sections += [
            "## Published on ImageNet (reference only)",
            f"The paper's ImageNet validation errors (%) for these configurations at its own scales (S = 256, 384 "
            f"or [256;512], full widths, 370K steps). The runs above are on {data.dataset}: these numbers are "
            "not comparable with theirs.",
            reference,
        ]

    for r in results.runs:
        caption = data.of_run(r.facts)
        fig = plots.training_curves(r.name, r.scalars, caption)
        if fig is not None:
            (out_dir / f"curves_{r.name}.png").write_bytes(plots.png(fig))
            figures.append((f"curves_{r.name}.png", f"training curves of {r.name}; {caption}"))
    how = f" ({compared[0].measured_by})" if compared else ""
    save(plots.error_vs_depth(points, data.short(), same), "error_vs_depth.png", f"error against depth{how}")
    save(plots.lrn(points, data.short(), same), "lrn.png", f"LRN: A against A-LRN{how}")
    save(
        plots.fixed_vs_jittered(points, data.short(), same),
        "fixed_vs_jittered.png",
        f"fixed against jittered training scale{how}",
    )
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
    cli.run(main, tensorflow=True)
