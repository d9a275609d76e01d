"""The training log's perf/* figures (train.Throughput): images/s, input share, and MFU against the device's
bfloat16 peak (vendor datasheets: H100 SXM 989 TFLOP/s dense, TPU v4 275)."""

from __future__ import annotations

import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vgg_jax import hardware, models, train


class Writer:
    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars = dict(scalars)


def throughput(kind: str, dtype, monkeypatch, clock):
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
    config = ml_collections.ConfigDict({"global_batch_size": 256})
    mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(device_kind=kind)] * 8))
    return train.Throughput(config, models.get_model("vgg16", dtype=dtype), mesh)


@pytest.mark.parametrize(
    "kind, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", jnp.bfloat16, 989.0),
        ("TPU v4", jnp.bfloat16, 275.0),
        ("TPU v5p", jnp.bfloat16, 459.0),
        ("NVIDIA H100 80GB HBM3", jnp.float32, None),  # no float32 MFU against a bfloat16 peak
        ("cpu", jnp.bfloat16, None),
    ],
)
def test_mfu_images_per_second_and_input_share(kind, dtype, peak, monkeypatch):
    clock = [100.0]
    t = throughput(kind, dtype, monkeypatch, clock)

    def batches():  # each batch takes 0.05 s to arrive
        while True:
            clock[0] += 0.05
            yield {}

    source = batches()
    for _ in range(10):  # 10 steps in 2 s, of which 0.5 s waiting for input
        t.next_batch(source)
        clock[0] += 0.15
    writer = Writer()
    t.report(10, writer)
    s = writer.scalars
    assert s["perf/images_per_second_per_device"] == pytest.approx(10 * 256 / 2.0 / 8)
    assert s["perf/step_ms"] == pytest.approx(200.0)
    assert s["perf/input_ms"] == pytest.approx(50.0) and s["perf/input_share"] == pytest.approx(0.25)
    if peak is None:
        assert "perf/mfu" not in s
    else:
        # VGG-16: 3 x 2 x 15.47 GMACs = 92.8 GFLOP per 224 crop (python -m vgg_jax.zoo).
        flops = 10 * 256 * 3 * 2 * 15_470_000_000
        assert s["perf/mfu"] == pytest.approx(flops / 2.0 / (peak * 1e12 * 8), rel=1e-3)
        assert hardware.peak_tflops(kind) == peak
