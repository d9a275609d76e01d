"""``python -m vgg_jax.preflight``: the run's steps compiled for Cloud TPU slices by libtpu on this CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
from test_main import REPO

from vgg_jax import preflight
from vgg_jax.errors import ConfigError

from tiny_runs import TINY

# Cloud TPU accelerator types: chips (v4 and v5p count two TensorCores per chip), hosts (4 chips each, 8 on
# the single-host v5e and v6e 8-chip machines).
SLICES = {
    "v4-8": (4, 1),
    "v4-32": (16, 4),
    "v5litepod-8": (8, 1),
    "v5litepod-64": (64, 16),
    "v5litepod-256": (256, 64),
    "v5p-8": (4, 1),
    "v5p-128": (64, 16),
    "v6e-8": (8, 1),
    "v6e-256": (256, 64),
}
KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


@pytest.mark.parametrize("name", SLICES)
def test_accelerator_types_map_to_libtpu_topologies(name):
    spec = preflight.slice_spec(name)
    devices = preflight.topology_devices(spec)
    assert (len(devices), len({d.process_index for d in devices})) == SLICES[name]
    assert devices[0].device_kind == KINDS[spec.generation]


def test_unknown_accelerator_type_names_the_forms():
    for name in ("v5e-3", "v7-8", "tpu"):
        with pytest.raises(ConfigError, match="give a Cloud TPU accelerator type"):
            preflight.slice_spec(name)


def test_collectives_of_a_partitioned_module():
    hlo = "\n".join(
        [
            "%fused_computation.1 (param_0: f32[8]) -> f32[8] {",
            "  %all-reduce.1 = f32[1024,16]{1,0} all-reduce(f32[1024,16]{1,0} %p), channel_id=3, replica_groups=[1,4]<=[4]",  # noqa: E501
            "}",
            "%all-reduce-scatter.2 (p: f32[64]) -> f32[16] {",
            "  %all-reduce.7 = f32[16]{0} all-reduce(f32[64]{0} %p), channel_id=4",
            "}",
            "ENTRY %main (a: bf16[4,8]) -> bf16[4,8] {",
            "  %all-reduce.1 = f32[1024,16]{1,0} all-reduce(f32[1024,16]{1,0} %p), channel_id=3, replica_groups=[1,4]<=[4]",  # noqa: E501
            "  %ag-start = (bf16[4,8]{1,0}, bf16[16,8]{1,0}, u32[], u32[]) all-gather-start(bf16[4,8]{1,0} %a), channel_id=5",  # noqa: E501
            "  %ag-done = bf16[16,8]{1,0} all-gather-done((bf16[4,8]{1,0}, bf16[16,8]{1,0}, u32[], u32[]) %ag-start)",
            # A combined async all-reduce (as XLA:TPU emits for gradients): its tuple is the outputs, not halves.
            "  %ar-start = (bf16[64,4]{1,0}, f32[8]{0}) all-reduce-start(bf16[64,4]{1,0} %g, f32[8]{0} %b), channel_id=6",  # noqa: E501
            "  %ar-done = (bf16[64,4]{1,0}, f32[8]{0}) all-reduce-done((bf16[64,4]{1,0}, f32[8]{0}) %ar-start)",
            "}",
        ]
    )
    assert preflight.collectives(hlo) == {
        "all-reduce": {"count": 2, "bytes": 1024 * 16 * 4 + 64 * 4 * 2 + 8 * 4},  # one op in two computations; async
        "reduce-scatter": {"count": 1, "bytes": 16 * 4},
        "all-gather": {"count": 1, "bytes": 16 * 8 * 2},  # the output half of the async start
    }


def run_preflight(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [sys.executable, "-m", "vgg_jax.preflight", *TINY, "--config.model.dtype=bfloat16", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def test_tiny_run_compiles_for_a_2x2_slice_and_fits():
    proc = run_preflight("--topology=v5litepod-4", "--batch_per_chip=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "v5litepod-4: 4 chips (v5e:2x2, TPU v5 lite), 1 host(s)" in out
    assert "global batch 8 = 8 per host = 2 per chip" in out
    assert "| train |" in out and "| eval center |" in out and "all-reduce" in out
    assert out.strip().endswith("fits")


def test_a_run_that_does_not_fit_exits_3():
    proc = run_preflight("--topology=v5litepod-4", "--config.model.fc_width=65536", "--noeval")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Ran out of memory on HBM" in proc.stdout and proc.stdout.strip().endswith("does not fit")


def test_a_batch_that_does_not_split_over_the_slice_is_a_user_error():
    proc = run_preflight("--topology=v5litepod-8", "--config.global_batch_size=12")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: global_batch_size=12")


@pytest.mark.parametrize("memory", ["linear", "sublinear"])
@pytest.mark.parametrize("limit", [7, 8, 44, 45, 100, 1000])
def test_find_batch_returns_the_largest_fitting_multiple(limit, memory, monkeypatch, capsys):
    """The search against a fake compiler whose memory is linear in the batch (1 MiB fixed + 1 MiB per image) or,
    as when the TPU compiler rematerialises to fit, grows a tenth as fast beyond 64 images (VGG-16 on v5e: a
    linear fit from 32 and 64 images predicts 140, 384 fit), in an HBM that ``limit`` images just fill: the
    answer is the largest multiple of 8 that fits, it was compiled, and the search took few compiles."""
    mib = 2**20

    def total(per_chip):
        if memory == "linear":
            return mib * (1 + per_chip)
        return mib * (1 + min(per_chip, 64)) + mib * max(per_chip - 64, 0) // 10

    def fake_compile(what, per_chip, hbm):
        return preflight.Compiled(what, total(per_chip) <= hbm, 0.0, arguments=total(per_chip))

    monkeypatch.setattr(preflight, "compile_for", fake_compile)
    spec = types.SimpleNamespace(chips=4, hbm_bytes=total(limit))
    run = types.SimpleNamespace(spec=spec, lower_train=lambda global_batch, remat: global_batch // 4)
    best, tried = preflight.find_batch(run, "none")
    assert best == limit // 8 * 8
    fitting = {int(t.what.split("b=")[1].split()[0]) for t in tried if t.fits}
    if best:
        assert best in fitting and max(fitting) == best
        assert any(not t.fits for t in tried)  # the next multiple was tried and refused
    assert len(tried) <= 20  # stepping by 8 past a linear prediction took ~100 compiles at 1000 (35 on v5e)
    progress = capsys.readouterr().err.splitlines()  # one line per compile, as it happens
    assert len(progress) == len(tried) and all(line.startswith("find_batch remat=none: ") for line in progress)
