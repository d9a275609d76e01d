"""Command-line overrides for a tiny but complete training run on the built-in data.

The real demo data goes through the paper's whole transform at reduced sizes: a run takes seconds.
"""

TINY = [
    "--config=configs/demo.py",
    "--config.model.width=4",
    "--config.model.fc_width=16",
    "--config.data.crop_size=32",
    "--config.data.scale_min=36",
    "--config.data.scale_max=64",
    "--config.data.eval_scales=(36,)",
    "--config.data.eval_split=validation[:40]",
    "--config.data.shuffle_buffer=256",
    "--config.global_batch_size=8",
    "--config.eval_batch_size=16",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.learning_rate=0.02",
    "--config.log_every_steps=2",
]
