"""The report's figures (matplotlib, Agg): training curves, error vs depth, LRN, fixed vs jittered scale.

Each function returns a ``Figure``, or None when the sweep lacks the runs it compares.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.results import Scalars  # noqa: E402
from experiments.sweeps import SCALES  # noqa: E402

SCALE_LABELS = {"256": "S = 256", "384": "S = 384", "256-512": "S in [256, 512]"}
COLOURS = {"256": "tab:blue", "384": "tab:orange", "256-512": "tab:green"}


class Point(NamedTuple):
    """One run's single-scale error (Table 3) and the paper's, if published."""

    net: str
    scale: str
    depth: int  # weight layers
    top1: float
    top5: float
    paper_top1: float | None
    paper_top5: float | None


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves(name: str, scalars: Scalars) -> Figure | None:
    """Loss, top-1 error (training batches and validation) and learning rate against the step."""
    if "train/loss" not in scalars:
        return None
    fig, (loss_ax, err_ax, lr_ax) = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, values = zip(*scalars["train/loss"])
    loss_ax.plot(steps, values, color="tab:blue")
    loss_ax.set(title="training loss", xlabel="step", ylabel="cross-entropy")
    if "train/top1" in scalars:
        steps, values = zip(*scalars["train/top1"])
        err_ax.plot(steps, [100 * (1 - v) for v in values], color="tab:blue", alpha=0.6, label="training batches")
    for tag in sorted(t for t in scalars if t.startswith("eval/top1_error@")):
        steps, values = zip(*scalars[tag])
        err_ax.plot(steps, values, "o-", label=f"validation, Q = {tag.split('@')[1]}")
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
    fig.suptitle(name)
    fig.tight_layout()
    return fig


def _paper_legend(ax: plt.Axes) -> None:
    ax.plot([], [], "ko-", label="ours")
    ax.plot([], [], "k^--", markerfacecolor="none", label="paper")


def error_vs_depth(points: Sequence[Point]) -> Figure | None:
    """Top-1 / top-5 error per configuration, in order of depth (A, B, C, D, E), one line per training scale.

    C and D both have 16 weight layers (C's last conv of blocks 3-5 is 1x1), so the x axis is the
    configuration with its depth in the tick label.
    """
    points = [p for p in points if p.net != "A-LRN"]
    nets = sorted({p.net for p in points}, key=lambda n: (next(p.depth for p in points if p.net == n), n))
    if len(nets) < 2:
        return None
    x_of = {net: i for i, net in enumerate(nets)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("top1", "top5")):
        for scale in (s for s in SCALES if any(p.scale == s for p in points)):
            mine = sorted((p for p in points if p.scale == scale), key=lambda p: x_of[p.net])
            ax.plot(
                [x_of[p.net] for p in mine],
                [getattr(p, metric) for p in mine],
                "o-",
                color=COLOURS[scale],
                label=SCALE_LABELS[scale],
            )
            published = [
                (x_of[p.net], getattr(p, f"paper_{metric}")) for p in mine if getattr(p, f"paper_{metric}") is not None
            ]
            if published:
                ax.plot(*zip(*published), "^--", color=COLOURS[scale], markerfacecolor="none")
        _paper_legend(ax)
        depth = {p.net: p.depth for p in points}
        ax.set_xticks(range(len(nets)), [f"{n}\n({depth[n]} layers)" for n in nets])
        ax.set(
            title=f"{'top-1' if metric == 'top1' else 'top-5'} error vs depth",
            xlabel="configuration",
            ylabel="validation error (%)",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _bars(ax: plt.Axes, x: float, height: float, width: float, colour: str, hatch: str = "") -> None:
    bar = ax.bar(x, height, width, color=colour if not hatch else "white", edgecolor=colour, hatch=hatch)
    ax.bar_label(bar, fmt="%.1f", fontsize=7)


def lrn(points: Sequence[Point]) -> Figure | None:
    """A against A-LRN at each training scale both were trained at: ours and the paper's."""
    scales = [s for s in SCALES if {("A", s), ("A-LRN", s)} <= {(p.net, p.scale) for p in points}]
    if not scales:
        return None
    by = {(p.net, p.scale): p for p in points}
    nets = (("A", "tab:blue"), ("A-LRN", "tab:purple"))
    fig, axes = plt.subplots(1, len(scales), figsize=(5.5 * len(scales), 4), squeeze=False)
    for ax, scale in zip(axes[0], scales):
        with_paper = all(by[(net, scale)].paper_top1 is not None for net, _ in nets)
        width = 0.2 if with_paper else 0.3
        for g, metric in enumerate(("top1", "top5")):
            for k, (net, colour) in enumerate(nets):
                p = by[(net, scale)]
                _bars(ax, g + (k - (1.5 if with_paper else 0.5)) * width, getattr(p, metric), width, colour)
                if with_paper:
                    _bars(ax, g + (k + 0.5) * width, getattr(p, f"paper_{metric}"), width, colour, hatch="//")
        ax.set_xticks([0, 1], ["top-1", "top-5"])
        handles = [Patch(color=c, label=f"{n} (ours)") for n, c in nets]
        if with_paper:
            handles += [Patch(facecolor="white", edgecolor=c, hatch="//", label=f"{n} (paper)") for n, c in nets]
        ax.set(title=f"LRN: A vs A-LRN, {SCALE_LABELS[scale]}", ylabel="validation error (%)")
        ax.legend(handles=handles, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def fixed_vs_jittered(points: Sequence[Point]) -> Figure | None:
    """Each net's error per training scale (fixed 256, fixed 384, jittered): bars ours, markers the paper's."""
    nets = [n for n in dict.fromkeys(p.net for p in points) if len({p.scale for p in points if p.net == n}) > 1]
    if not nets:
        return None
    by = {(p.net, p.scale): p for p in points}
    scales = [s for s in SCALES if any(p.scale == s and p.net in nets for p in points)]
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.8 * len(nets)), 7.5))
    width = 0.8 / len(scales)
    for ax, metric in zip(axes, ("top1", "top5")):
        for k, scale in enumerate(scales):
            for i, net in enumerate(nets):
                p = by.get((net, scale))
                if p is None:
                    continue
                x = i + (k - (len(scales) - 1) / 2) * width
                _bars(ax, x, getattr(p, metric), width, COLOURS[scale])
                paper = getattr(p, f"paper_{metric}")
                if paper is not None:
                    ax.plot([x - width / 2, x + width / 2], [paper, paper], "k-", linewidth=2.5)
        ax.set_xticks(range(len(nets)), nets)
        ax.set(
            title=f"{'top-1' if metric == 'top1' else 'top-5'} error",
            xlabel="configuration",
            ylabel="validation error (%)",
        )
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=COLOURS[s], label=SCALE_LABELS[s]) for s in scales]
    handles.append(plt.Line2D([], [], color="k", linewidth=2.5, label="paper"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle("fixed vs jittered training scale")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig
