"""``python -m vgg_jax.preflight``: the run's steps compiled for Cloud TPU slices by libtpu and for NVIDIA GPUs by
JAX's CUDA plugin (test requirements; no GPU needed) on this CPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
from test_main import REPO

from vgg_jax import hardware, preflight
from vgg_jax.errors import ConfigError

from tiny_runs import TINY

# Cloud TPU accelerator types: chips (v4 and v5p count two TensorCores per chip), hosts (4 chips each, 8 on
# the single-host v5e and v6e 8-chip machines).
SLICES = {
    "v4-8": (4, 1),
    "v4-16": (8, 2),
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
    spec = preflight.parse_topology(name)
    devices = preflight.topology_devices(spec)
    assert (len(devices), len({d.process_index for d in devices})) == SLICES[name] == (spec.chips, spec.hosts)
    assert devices[0].device_kind == KINDS[spec.generation]


# GPU names: (GPUs, nodes = hosts), the CUDA plugin's device kind (as the driver names the board).
GPUS = {
    "h100-80gb": (1, 1, "NVIDIA H100 80GB HBM3"),
    "h100-80gbx8": (8, 1, "NVIDIA H100 80GB HBM3"),
    "a100-40gbx8,nodes=4": (32, 4, "NVIDIA A100-SXM4-40GB"),
    "a100-80gbx4": (4, 1, "NVIDIA A100-SXM4-80GB"),
    "h200x8,nodes=2": (16, 2, "NVIDIA H200 141GB HBM3e"),
    "b200": (1, 1, "NVIDIA B200"),
}


@pytest.mark.parametrize("name", GPUS)
def test_gpu_names_map_to_cuda_topologies(name):
    """The target configs written from hardware.GPU parse in the pinned CUDA plugin: its devices, their hosts."""
    spec = preflight.parse_topology(name)
    devices = preflight.topology_devices(spec)
    gpus, nodes, kind = GPUS[name]
    assert (len(devices), len({d.process_index for d in devices})) == (gpus, nodes) == (spec.chips, spec.hosts)
    assert {d.device_kind for d in devices} == {kind} and devices[0].platform == "gpu"


def test_usable_gpu_memory_is_what_jax_allocator_offers_less_the_cudnn_margin():
    """JAX preallocates XLA_CLIENT_MEM_FRACTION (default 0.75; XLA_PYTHON_CLIENT_MEM_FRACTION is the older name) of
    the device memory (docs.jax.dev, GPU memory allocation); the platform allocator takes what it needs."""
    h100 = 84_942_979_072  # bytes, as an H100 SXM 80GB reports them
    margin = hardware.CUDNN_WORKSPACE_MARGIN
    assert hardware.gpu_usable_bytes("h100-80gb", {}) == int(0.75 * h100) - margin
    assert hardware.gpu_usable_bytes("h100-80gb", {"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}) == int(0.9 * h100) - margin
    assert hardware.gpu_usable_bytes("h100-80gb", {"XLA_CLIENT_MEM_FRACTION": "0.5"}) == int(0.5 * h100) - margin
    assert hardware.gpu_usable_bytes("h100-80gb", {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}) == h100 - margin


@pytest.mark.parametrize("name", ["v4-8", "v5litepod-8", "v5p-8", "v6e-8", "a100-40gb", "h100-80gb", "h200", "b200"])
def test_memory_is_counted_in_gib_of_two_to_the_thirty_bytes(name):
    """GiB = 1024**3 bytes (hardware.py) in the bytes a fit is judged against and in what is printed: a TPU's
    usable HBM is the table's hbm_gib GiB; a GPU's note shows its usable and total bytes in GiB."""
    import re

    spec = preflight.parse_topology(name)
    gib = 1024.0**3
    shown = [float(x) for x in re.findall(r"([\d.]+) GiB", spec.memory_note)]
    if spec.platform == "tpu":
        hbm = hardware.TPU[spec.generation]["hbm_gib"]
        assert spec.usable_bytes == int(hbm * gib) and shown == [hbm]
        assert preflight.gib(spec.usable_bytes) == f"{hbm:.2f} GiB"
    else:
        memory = hardware.GPU[spec.generation]["memory"]
        usable = int(memory * hardware.gpu_memory_fraction()) - gib
        assert spec.usable_bytes == usable
        assert shown == [round(usable / gib, 2), round(memory / gib, 2), 1.0]  # usable, total, cuDNN margin


def test_unknown_topology_names_the_forms():
    for name in ("v5e-3", "v7-8", "tpu", "h100", "h100-80gbx0", "h100-80gbx8,nodes=0", "rtx4090"):
        with pytest.raises(ConfigError, match="give a Cloud TPU accelerator type.* or NVIDIA GPUs: a100-40gb"):
            preflight.parse_topology(name)


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
        # one op in two computations; async; bytes per type: what is reduced in bfloat16 and in float32
        "all-reduce": {
            "count": 2,
            "bytes": 1024 * 16 * 4 + 64 * 4 * 2 + 8 * 4,
            "dtypes": {"f32": 1024 * 16 * 4 + 8 * 4, "bf16": 64 * 4 * 2},
        },
        "reduce-scatter": {"count": 1, "bytes": 16 * 4, "dtypes": {"f32": 16 * 4}},
        "all-gather": {"count": 1, "bytes": 16 * 8 * 2, "dtypes": {"bf16": 16 * 8 * 2}},  # the async start's output
    }
    assert preflight.describe_collectives(preflight.collectives(hlo)).startswith(
        "all-gather x1 256 B (bf16 256 B), all-reduce x2 64.5 KiB (f32 64.0 KiB, bf16 512 B)"
    )


def test_collectives_sharing_a_channel_are_told_apart_by_name():
    """XLA:GPU gives every all-reduce of a shard_map channel 1 (the float32 gradient reduction)."""
    hlo = "\n".join(
        [
            "ENTRY %main (a: f32[8]) -> f32[8] {",
            "  %all-reduce-start.1 = f32[6465000]{0} all-reduce-start(%c), channel_id=1, replica_groups={{0,1}}",
            "  %all-reduce-done.1 = f32[6465000]{0} all-reduce-done(%all-reduce-start.1)",
            "  %all-reduce-start.2 = f32[7,7,512,4096]{3,2,1,0} all-reduce-start(%d), channel_id=1",
            "}",
        ]
    )
    bytes_ = (6465000 + 7 * 7 * 512 * 4096) * 4
    assert preflight.collectives(hlo) == {"all-reduce": {"count": 2, "bytes": bytes_, "dtypes": {"f32": bytes_}}}


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


def test_tiny_run_compiles_for_an_8_gpu_node_and_fits():
    proc = run_preflight("--topology=h100-80gbx8", "--batch_per_chip=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "h100-80gbx8: 8 GPUs (1x1x8, NVIDIA H100 80GB HBM3), 1 host(s) = processes; 58.33 GiB usable per GPU" in out
    assert "global batch 16 = 16 per host = 2 per GPU" in out
    # --batch_per_chip doubled the config's batch of 8: said, with the learning rate it keeps and the way to scale it.
    assert "global batch 16 instead of the config's 8: the learning rate stays 0.02" in out
    assert "--config.optimizer.lr_base_batch=8" in out
    # The gradient all-reduce and its type: bfloat16 with bfloat16 compute, 2 bytes for each of the 54,080
    # parameters (fc8 has 1,000 classes here): 108,160 B; the 12 B of float32 are the loss and metrics.
    train = next(line for line in out.splitlines() if line.startswith("train: "))
    assert "all-reduce x2 105.6 KiB (bf16 105.6 KiB, f32 12 B)" in train and train.endswith(": fits")
    assert out.index("train: ") < out.index("| step |")  # a line per compile as it ends, then the table
    assert "| eval center |" in out and out.strip().endswith("fits")
    # On this machine without an NVIDIA driver the CUDA plugin steps aside; its C++ notice is not shown.
    assert "Could not find cuda drivers" not in proc.stderr and "InitializeLog" not in proc.stderr, proc.stderr


def test_float32_gradient_reduction_on_gpus_all_reduces_float32():
    """mesh.grad_reduce_dtype=float32: the compiled step's all-reduce is float32 only, 4 bytes per parameter."""
    from configs import demo

    config = demo.get_config()
    config.model.update(width=4, fc_width=16, dtype="bfloat16")
    config.data.crop_size, config.global_batch_size = 32, 4
    config.mesh.grad_reduce_dtype = "float32"
    spec = preflight.parse_topology("h100-80gbx2")
    run = preflight.Run(config, spec, preflight.topology_devices(spec), 10)
    compiled = run.compile_train("train", 4)
    assert compiled.collectives["all-reduce"]["dtypes"] == {"f32": 4 * 37_250 + 12}


def test_a_gpu_run_that_does_not_fit_exits_3():
    """XLA:GPU compiles any size: the total (fc7 alone is 131072^2 float32 parameters, 64 GiB) against the usable
    memory decides."""
    proc = run_preflight("--topology=h100-80gb", "--config.model.fc_width=131072", "--noeval")
    assert proc.returncode == 3, proc.stderr[-3000:]
    train = next(line for line in proc.stdout.splitlines() if line.startswith("train: "))
    assert " of 58.33 GiB (" in train and train.endswith(": does not fit")
    assert proc.stdout.strip().endswith("does not fit")


def test_bad_batch_and_model_axis_are_one_line_errors():
    proc = run_preflight("--topology=h100-80gbx8", "--batch_per_chip=0")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --batch_per_chip=0: give a positive batch per GPU."
    )
    # 16 divides the tiny model's fc width (16) but not the node's 8 GPUs; 3 divides neither: the config's own
    # check (config_checks.validate) names it first.
    with pytest.raises(ConfigError, match="mesh.model=16: the model axis must divide the 8 GPUs of h100-80gbx8"):
        preflight.main([*TINY, "--topology=h100-80gbx8", "--config.mesh.model=16"])
    with pytest.raises(ConfigError, match=r"^--config.mesh.model=3: must divide model.fc_width=16 \(fc6 and fc7"):
        preflight.main([*TINY, "--topology=h100-80gbx8", "--config.mesh.model=3"])


def test_progress_reaches_a_file_as_each_step_compiles(tmp_path, monkeypatch):
    """stdout into a file (``nohup ... > log``) is block-buffered: the preflight writes each line as it happens."""
    seen = []

    def fake_train(run, what, global_batch, remat=None):
        seen.append(log.read_text())  # what the file holds while the step "compiles"
        per_gpu = global_batch // 8
        return preflight.Compiled(what, per_gpu <= 40, 1.0, arguments=per_gpu * 2**20)  # 1 MiB per image

    monkeypatch.setattr(preflight.Run, "compile_train", fake_train)
    log = tmp_path / "log"
    with open(log, "w") as f:  # a regular file: Python buffers it in blocks
        monkeypatch.setattr(sys, "stdout", f)
        assert preflight.main([*TINY, "--topology=h100-80gbx8", "--noeval", "--find_batch", "--remat=none"]) == 0
    assert seen[0].startswith("h100-80gbx8: 8 GPUs") and "compiling the train step" in seen[0]
    assert "train: 1.0 MiB of 58.33 GiB" in seen[1]  # the first compile's line, before the search's first compile
    assert "find_batch remat=none: 32 per GPU: 32.0 MiB, fits" in seen[2]


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

    spec = types.SimpleNamespace(chips=4, usable_bytes=total(limit), chip="chip")

    def compile_train(what, global_batch, remat):
        per_chip = global_batch // spec.chips
        return preflight.Compiled(what, total(per_chip) <= spec.usable_bytes, 0.0, arguments=total(per_chip))

    run = types.SimpleNamespace(spec=spec, compile_train=compile_train)
    best, tried = preflight.find_batch(run, "none")
    assert best == limit // 8 * 8
    fitting = {int(t.what.split("b=")[1].split()[0]) for t in tried if t.fits}
    if best:
        assert best in fitting and max(fitting) == best
        assert any(not t.fits for t in tried)  # the next multiple was tried and refused
    assert len(tried) <= 20  # stepping by 8 past a linear prediction took ~100 compiles at 1000 (35 on v5e)
    progress = capsys.readouterr().out.splitlines()  # one line per compile, as it happens
    assert len(progress) == len(tried) and all(line.startswith("find_batch remat=none: ") for line in progress)
