"""Stalled against healthy runs: loss, logit spread, deep activations and dead ReLUs from the ``diag/*`` series.

python -m benchmarks.stall_figure OUT.png LABEL=WORKDIR [LABEL=WORKDIR ...]; docs/training.md#diagnosing-a-stalled-run
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.status import read_scalars  # noqa: E402

PANELS = (
    ("diag/loss", "training loss (batch)", "linear"),
    ("diag/logits/std_over_batch", "logit std over the batch", "log"),
    ("diag/act/relu7/std", "relu7 activation std", "log"),
    ("diag/act/relu6/dead", "relu6: dead channels", "linear"),
)


def main(out: str, runs: list[str]) -> None:
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for spec in runs:
        label, _, workdir = spec.partition("=")
        scalars = read_scalars(workdir)
        for ax, (tag, title, scale) in zip(axes, PANELS):
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_yscale(scale)
            ax.set_xlabel("step")
    axes[0].axhline(2.302585, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
