"""The report's figures (matplotlib, Agg): training curves, error vs depth, LRN, fixed vs jittered scale.

experiments/README.md#reports
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.status import Scalars  # noqa: E402
from experiments.sweeps import SCALES  # noqa: E402

COLOURS = {"256": "tab:blue", "384": "tab:orange", "256-512": "tab:green"}
METRICS = (("top1", "top-1"), ("top5", "top-5"))
ERROR_RANGE = (0.0, 100.0)  # every error axis shows the whole range: a zoomed axis magnifies seed noise


def spread_note(points: Sequence[Point]) -> str:
    """What a figure's markers and whiskers are, for its title."""
    seeds = sorted({len(p.top1) for p in points})
    if seeds == [1]:
        return "one seed per configuration: its error, no whiskers"
    counts = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    return f"mean of {counts} seeds; whiskers: ±1 standard deviation over seeds; dots: each seed"


class Point(NamedTuple):
    """One configuration's single-scale errors (Table 3), one value per seed, and the paper's if published."""

    net: str
    scale: str  # the paper's scale label ('256', '384', '256-512'): which of its runs this one mirrors
    depth: int  # weight layers
    top1: tuple[float, ...]  # per seed, %
    top5: tuple[float, ...]
    paper_top1: float | None
    paper_top5: float | None
    s_label: str = ""  # the scale this run actually trained at, e.g. 'S = 110' or 'S in [112, 224]'

    def values(self, metric: str) -> np.ndarray:
        return np.asarray(getattr(self, metric), np.float64)


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves(name: str, scalars: Scalars, data: str = "") -> Figure | None:
    """Loss, top-1 error (training batches and validation) and learning rate against the step, of one run
    (``data``: what it trained on, its S, seed, model size and steps)."""
    if "train/loss" not in scalars:
        return None
    fig, (loss_ax, err_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, values = zip(*scalars["train/loss"])
    loss_ax.plot(steps, values, color="tab:blue")
    loss_ax.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    if "train/top1_error" in scalars:
        steps, values = zip(*scalars["train/top1_error"])
        err_ax.plot(steps, values, color="tab:blue", alpha=0.6, label="training batches")
    for tag in sorted(t for t in scalars if t.startswith("eval/top1_error@")):
        steps, values = zip(*scalars[tag])
        err_ax.plot(steps, values, "o-", label=f"validation, Q = {tag.split('@')[1]}")
    err_ax.set_ylim(*ERROR_RANGE)
    err_ax.set(title="top-1 error", xlabel="step", ylabel="%")
    err_ax.legend(fontsize=8)
    if "train/learning_rate" in scalars:
        steps, values = zip(*scalars["train/learning_rate"])
        lr_ax.plot(steps, values, color="tab:red")
        lr_ax.set_yscale("log")
    lr_ax.set(title="learning rate", xlabel="step")
    for ax in (loss_ax, err_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{name}: {data}" if data else name)
    fig.tight_layout()
    return fig


def _title(what: str, data: str, points: Sequence[Point]) -> str:
    return f"{what}: {data}\n{spread_note(points)}" if data else f"{what}\n{spread_note(points)}"


def _mean_and_spread(
    ax: plt.Axes, x: float, values: np.ndarray, colour: str, marker: str = "o", label: str | None = None
) -> None:
    """A mean with a one-standard-deviation bar and every seed's value as a dot."""
    ax.errorbar(
        x,
        values.mean(),
        yerr=values.std(ddof=1) if len(values) > 1 else None,
        fmt=marker,
        color=colour,
        capsize=4,
        markersize=7,
        label=label,
    )
    ax.scatter(np.full(len(values), x) + np.linspace(-0.08, 0.08, len(values)), values, s=12, color=colour, alpha=0.5)


def _published_panel(ax: plt.Axes, points: Sequence[Point], x_of: dict[str, int], ticks: Sequence[str]) -> None:
    """The paper's top-1 (solid) and top-5 (dashed) errors, one colour per training scale."""
    for scale in (s for s in SCALES if any(p.scale == s for p in points)):
        ref = sorted((p for p in points if p.scale == scale), key=lambda p: x_of[p.net])
        x = [x_of[p.net] for p in ref]
        ax.plot(x, [p.paper_top1 for p in ref], "^", color=COLOURS[scale], label=f"top-1, S = {scale}")
        ax.plot(x, [p.paper_top5 for p in ref], "v", color=COLOURS[scale], markerfacecolor="none", label="top-5")
    ax.set_xticks(range(len(ticks)), list(ticks))
    ax.set_ylim(*ERROR_RANGE)
    ax.set(title="published (paper, ImageNet validation):\nreference only, other data", ylabel="error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def error_vs_depth(points: Sequence[Point], data: str = "", paper_on_same_axes: bool = False) -> Figure | None:
    """Error per configuration in order of depth (A, B, C, D, E), one colour per training scale: every seed's
    value, their mean and one standard deviation, on the whole 0-100% axis. The means are not joined by lines
    (configurations are separate measurements, not a curve). The paper's numbers share the axes only when the
    runs are on its data (ImageNet); otherwise they get their own panel.

    C and D both have 16 weight layers (C's last conv of blocks 3-5 is 1x1), so the x axis is the
    configuration with its depth in the tick label.
    """
    points = [p for p in points if p.net != "A-LRN"]
    nets = sorted({p.net for p in points}, key=lambda n: (next(p.depth for p in points if p.net == n), n))
    if len(nets) < 2:
        return None
    x_of = {net: i for i, net in enumerate(nets)}
    depth = {p.net: p.depth for p in points}
    ticks = [f"{n}\n({depth[n]} layers)" for n in nets]
    published = [p for p in points if p.paper_top1 is not None]
    separate = bool(published) and not paper_on_same_axes
    fig, axes = plt.subplots(1, 3 if separate else 2, figsize=(16 if separate else 11, 4.2))
    for ax, (metric, name) in zip(axes, METRICS):
        for scale in (s for s in SCALES if any(p.scale == s for p in points)):
            mine = sorted((p for p in points if p.scale == scale), key=lambda p: x_of[p.net])
            colour = COLOURS[scale]
            for i, p in enumerate(mine):
                _mean_and_spread(ax, x_of[p.net], p.values(metric), colour, label=None if i else p.s_label or scale)
            if paper_on_same_axes:
                ref = [(x_of[p.net], getattr(p, f"paper_{metric}")) for p in mine if getattr(p, f"paper_{metric}")]
                if ref:
                    ax.plot(*zip(*ref), "^", color=colour, markerfacecolor="none", label=f"paper, {scale}")
        ax.set_xticks(range(len(nets)), ticks)
        ax.set_ylim(*ERROR_RANGE)
        ax.set(title=f"{name} error vs depth", xlabel="configuration", ylabel="validation error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if separate:
        _published_panel(axes[2], published, x_of, ticks)
    fig.suptitle(_title("Error vs depth", data, points))
    fig.tight_layout()
    return fig


def _bar_panel(ax: plt.Axes, groups: Sequence[tuple[str, Point]], colours: Sequence[str], title: str) -> None:
    """Per metric, one bar per group: mean, one standard deviation, every seed as a dot."""
    width = 0.8 / len(groups)
    for g, (metric, _) in enumerate(METRICS):
        for k, ((label, p), colour) in enumerate(zip(groups, colours)):
            x = g + (k - (len(groups) - 1) / 2) * width
            values = p.values(metric)
            bar = ax.bar(
                x,
                values.mean(),
                width,
                color=colour,
                alpha=0.7,
                yerr=values.std(ddof=1) if len(values) > 1 else None,
                capsize=4,
                label=label if g == 0 else None,
            )
            ax.bar_label(bar, fmt="%.1f", fontsize=7, padding=8)
            ax.scatter(np.full(len(values), x), values, s=12, color="k", zorder=3)
    ax.set_xticks([0, 1], [name for _, name in METRICS])
    ax.set_ylim(*ERROR_RANGE)
    ax.set(title=title, ylabel="validation error (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def lrn(points: Sequence[Point], data: str = "", paper_on_same_axes: bool = False) -> Figure | None:
    """A against A-LRN at each training scale both were trained at; the paper's in its own panel unless the
    runs are on ImageNet."""
    scales = [s for s in SCALES if {("A", s), ("A-LRN", s)} <= {(p.net, p.scale) for p in points}]
    if not scales:
        return None
    by = {(p.net, p.scale): p for p in points}
    published = all(by[(n, s)].paper_top1 is not None for n in ("A", "A-LRN") for s in scales)
    extra = published and not paper_on_same_axes
    fig, axes = plt.subplots(1, len(scales) + extra, figsize=(5.5 * (len(scales) + extra), 4.2), squeeze=False)
    for ax, scale in zip(axes[0], scales):
        groups = [("A", by[("A", scale)]), ("A-LRN", by[("A-LRN", scale)])]
        if published and paper_on_same_axes:
            groups += [
                (
                    f"{n} (paper)",
                    by[(n, scale)]._replace(top1=(by[(n, scale)].paper_top1,), top5=(by[(n, scale)].paper_top5,)),
                )
                for n in ("A", "A-LRN")
            ]
        _bar_panel(
            ax,
            groups,
            ["tab:blue", "tab:purple", "lightsteelblue", "plum"],
            f"A vs A-LRN, {by[('A', scale)].s_label or scale}",
        )
    if extra:
        scale = scales[0]
        ref = [
            (n, by[(n, scale)]._replace(top1=(by[(n, scale)].paper_top1,), top5=(by[(n, scale)].paper_top5,)))
            for n in ("A", "A-LRN")
        ]
        _bar_panel(
            axes[0][-1],
            ref,
            ["lightsteelblue", "plum"],
            f"published (paper, ImageNet, S = {scale}):\nreference only, other data",
        )
    fig.suptitle(_title("LRN", data, [by[(n, s)] for n in ("A", "A-LRN") for s in scales]))
    fig.tight_layout()
    return fig


def fixed_vs_jittered(points: Sequence[Point], data: str = "", paper_on_same_axes: bool = False) -> Figure | None:
    """Each net's error per training scale (fixed, jittered): bars of the seeds' mean with their spread."""
    nets = [n for n in dict.fromkeys(p.net for p in points) if len({p.scale for p in points if p.net == n}) > 1]
    if not nets:
        return None
    by = {(p.net, p.scale): p for p in points}
    scales = [s for s in SCALES if any(p.scale == s and p.net in nets for p in points)]
    fig, axes = plt.subplots(1, len(nets), figsize=(5.5 * len(nets), 4.2), squeeze=False)
    for ax, net in zip(axes[0], nets):
        groups = [(by[(net, s)].s_label or s, by[(net, s)]) for s in scales if (net, s) in by]
        colours = [COLOURS[s] for s in scales if (net, s) in by]
        if paper_on_same_axes:
            for s in scales:
                p = by.get((net, s))
                if p is not None and p.paper_top1 is not None:
                    groups.append((f"paper, S = {s}", p._replace(top1=(p.paper_top1,), top5=(p.paper_top5,))))
                    colours.append("lightgrey")
        _bar_panel(ax, groups, colours, f"{net}: fixed vs jittered training scale")
    fig.suptitle(_title("Fixed vs jittered S", data, [p for p in points if p.net in nets]))
    fig.tight_layout()
    return fig
