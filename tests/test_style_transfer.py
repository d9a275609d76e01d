"""experiments/style_transfer.py runs as a script: a few Adam steps on tiny images lower the total loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tiny_runs import save_random_converted

REPO = Path(__file__).resolve().parents[1]


def test_style_transfer_script_lowers_the_loss(tmp_path):
    # A reduced-width VGG-19 with He-scaled random weights, saved as a converted checkpoint.
    save_random_converted(tmp_path / "vgg19", "vgg19", num_classes=5, width=4, fc_width=8, crop_size=32)
    for name, seed in (("content.png", 1), ("style.png", 2)):
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)

    out = tmp_path / "out.png"
    cmd = [
        sys.executable,
        "experiments/style_transfer.py",
        f"--weights={tmp_path / 'vgg19'}",
        f"--content={tmp_path / 'content.png'}",
        f"--style={tmp_path / 'style.png'}",
        f"--out={out}",
        "--size=40",
        "--steps=8",
        "--learning_rate=0.01",
        "--tv_weight=1e-4",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert np.isfinite(summary["final_loss"]) and summary["initial_loss"] > 0
    assert summary["final_loss"] < 0.7 * summary["initial_loss"], summary
    with Image.open(out) as image:
        assert image.size == (48, 40) and image.mode == "RGB"
