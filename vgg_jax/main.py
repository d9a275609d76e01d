"""Train a VGG: ``python -m vgg_jax.main --config=configs/<experiment>.py --workdir=DIR [--config.x=...]``.

docs/training.md
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
from absl import flags
from ml_collections import config_flags

from vgg_jax import cli, sharding


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.", flag_values=values)
    config_flags.DEFINE_config_file(
        "config", None, "Path to a config file (configs/*.py).", flag_values=values, lock_config=True, sys_argv=argv
    )
    flags.mark_flags_as_required(["config", "workdir"], flag_values=values)


def main(argv: Sequence[str] | None = None) -> dict:
    values, rest = cli.parse(argv, define_flags, "python -m vgg_jax.main", __doc__)
    if rest:
        cli.fail(f"unexpected arguments {rest}: flags look like --workdir=DIR and --config.key=value.")
    sharding.initialize_distributed(values.config.distributed)  # before anything touches the devices
    from vgg_jax import train  # imports TensorFlow: after jax.distributed
    from vgg_jax.data import pipeline

    pipeline.setup_tensorflow()
    summary = train.train_and_evaluate(values.config, values.workdir)
    if jax.process_index() == 0:
        print(report(summary))
    return summary


def report(summary: dict) -> str:
    """The final summary as a user reads it (errors in percent, steps, time, throughput), then as JSON."""
    shown = {k: v for k, v in summary.items() if k != "learning_rate"}
    rows = ["| result | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in shown.items()]
    return "\n".join(rows) + "\n" + json.dumps(summary)


if __name__ == "__main__":
    cli.run(main, tensorflow=True)
