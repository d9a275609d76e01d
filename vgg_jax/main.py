"""Train a VGG: ``python -m vgg_jax.main --config=configs/<experiment>.py --workdir=DIR [--config.x=...]``.

Resumes automatically from the newest checkpoint in DIR.
"""

from __future__ import annotations

import json
import logging as std_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(cfg) -> None:
    """``jax.distributed.initialize`` as configured: explicit cluster, or auto-detected (TPU pods, SLURM)."""
    if not cfg.enabled:
        return
    if cfg.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU devices
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    else:
        jax.distributed.initialize()
    logging.info("Process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())


class _QuietOrbax(std_logging.Filter):
    """Drops orbax's INFO chatter (several lines per save); its warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    config = FLAGS.config
    initialize_distributed(config.distributed)
    from vgg_jax import train  # after jax.distributed: importing TF / building meshes may touch devices

    summary = train.train_and_evaluate(config, FLAGS.workdir)
    if jax.process_index() == 0:
        print(report(summary))


def report(summary: dict) -> str:
    """A readable results table of the final summary."""
    rows = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary.items()]
    return "\n".join(rows) + "\n" + json.dumps(summary)


if __name__ == "__main__":
    app.run(main)
