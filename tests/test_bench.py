"""The benchmark scripts stay runnable: the one-call GPU check, dry-run on CPU with a tiny model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from vgg_jax import bench, models

ROOT = Path(__file__).resolve().parents[1]


def test_bench_offers_every_remat_policy_of_the_model():
    assert bench.REMAT_CHOICES == tuple(models.REMAT_POLICIES)


def test_gpu_check_script_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh is run once per GPU-lent task, with no time to debug it there."""
    env = {
        **os.environ,
        "PLATFORM": "cpu",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path),
        "BATCHES": "2 4",
        "MEMORY_BATCHES": "2 4",
        "MODEL_ARGS": "--model=vgg11 --width=4 --fc_width=16 --image_size=32 --num_classes=10",
    }
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert (tmp_path / "log.txt").read_text() == result.stdout
    # The timing table: one row per batch, each with a finite loss (the last column).
    for batch in (2, 4):
        row = re.search(rf"^\| {batch} \| .* \| ([-0-9.e]+) \|$", out, re.M)
        assert row, out[-3000:]
        assert float(row.group(1)) < 10, row.group(0)
    assert re.search(r"^profile .*xplane\.pb: .* top \d+:$", out, re.M), out[-3000:]
    assert list(tmp_path.glob("vgg16_bf16.xplane.pb*")), "the trace was not kept under $OUT"
    for policy in bench.REMAT_CHOICES:
        assert re.search(rf"^remat={policy}: .* MB per image .* -> batch \d+ per device", out, re.M), out[-3000:]
    assert "== done in" in out
