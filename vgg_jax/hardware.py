"""Known accelerators: peak dense bfloat16 TFLOP/s and memory per chip (MFU figures, memory fits), and the
GPU descriptions XLA compiles for without a GPU. GiB = 2**30 bytes throughout the project.

docs/benchmarks.md, docs/training.md#preflight
"""

from __future__ import annotations

import os
from collections.abc import Mapping

GIB = 2**30

# TPU generations as libtpu names them (device_kind), with their peak (vendor figure) and the HBM per chip
# that libtpu 0.0.42.1 reports as available in its out-of-memory message (GiB; vendor: 32, 16, 95, 32).
TPU = {
    "v4": {"kind": "TPU v4", "tflops": 275.0, "hbm_gib": 30.75},
    "v5e": {"kind": "TPU v5 lite", "tflops": 197.0, "hbm_gib": 15.75},
    "v5p": {"kind": "TPU v5", "tflops": 459.0, "hbm_gib": 95.74},
    "v6e": {"kind": "TPU v6 lite", "tflops": 918.0, "hbm_gib": 31.25},
}

# NVIDIA GPUs by the names users type (preflight --topology, launch --gpu), SXM boards: the device_kind the CUDA
# driver reports, the dense bfloat16 tensor-core peak (NVIDIA datasheets), and what XLA's GPU compiler reads
# about the device (stream_executor.GpuTargetConfigProto): compute capability, SMs, FP32 units and shared
# memory per SM, opt-in shared memory per block, L2, memory bandwidth (bytes/s), SM clock, and the device
# memory as the device reports it (cudaMemGetInfo's total). These are the values of XLA's own target configs
# (xla/backends/gpu/target_config/specs/*.txtpb at openxla/xla 5a9e73cbd925, the XLA of jaxlib 0.10.2).
GPU = {
    "a100-40gb": {
        "kind": "NVIDIA A100-SXM4-40GB",
        "tflops": 312.0,
        "memory": 42_331_013_120,
        "cc": (8, 0),
        "sms": 108,
        "fp32_per_sm": 64,
        "smem_per_sm": 167_936,
        "smem_per_block_optin": 166_912,
        "l2": 41_943_040,
        "bandwidth": 1_555_200_000_000,
        "clock_ghz": 1.41,
    },
    "a100-80gb": {
        "kind": "NVIDIA A100-SXM4-80GB",
        "tflops": 312.0,
        "memory": 85_100_068_864,
        "cc": (8, 0),
        "sms": 108,
        "fp32_per_sm": 64,
        "smem_per_sm": 167_936,
        "smem_per_block_optin": 166_912,
        "l2": 41_943_040,
        "bandwidth": 2_039_040_000_000,
        "clock_ghz": 1.41,
    },
    "h100-80gb": {
        "kind": "NVIDIA H100 80GB HBM3",
        "tflops": 989.0,
        "memory": 84_942_979_072,
        "cc": (9, 0),
        "sms": 132,
        "fp32_per_sm": 128,
        "smem_per_sm": 233_472,
        "smem_per_block_optin": 232_448,
        "l2": 52_428_800,
        "bandwidth": 3_352_320_000_000,
        "clock_ghz": 1.98,
    },
    "h200": {
        "kind": "NVIDIA H200 141GB HBM3e",
        "tflops": 989.0,
        "memory": 151_397_597_184,
        "cc": (9, 0),
        "sms": 132,
        "fp32_per_sm": 128,
        "smem_per_sm": 233_472,
        "smem_per_block_optin": 232_448,
        "l2": 52_428_800,
        "bandwidth": 4_800_000_000_000,
        "clock_ghz": 1.98,
    },
    "b200": {
        "kind": "NVIDIA B200",
        "tflops": 2250.0,
        "memory": 191_514_411_008,
        "cc": (10, 0),
        "sms": 148,
        "fp32_per_sm": 128,
        "smem_per_sm": 233_472,
        "smem_per_block_optin": 232_448,
        "l2": 132_644_864,
        "bandwidth": 7_672_320_000_000,
        "clock_ghz": 1.965,
    },
}
# cuDNN of the CUDA 12 wheels that `jax[cuda12]==0.10.2` installs (nvidia-cudnn-cu12 9.x): which cuDNN
# features XLA may use.
CUDNN_VERSION = (9, 0, 0)
# JAX's GPU allocator (BFC) takes this fraction of the device memory unless XLA_CLIENT_MEM_FRACTION (or the
# older XLA_PYTHON_CLIENT_MEM_FRACTION) says otherwise; XLA_PYTHON_CLIENT_ALLOCATOR=platform takes none.
DEFAULT_MEM_FRACTION = 0.75
# Room left for cuDNN's convolution workspaces, which a compile without a GPU cannot size (no algorithm is
# chosen, each convolution's scratch is 0 bytes): docs/training.md#preflight.
CUDNN_WORKSPACE_MARGIN = 1 * GIB


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bfloat16 TFLOP/s of one device, or None where unknown (CPUs)."""
    for spec in TPU.values():
        if device_kind in (spec["kind"], spec["kind"] + "p"):  # v5p: "TPU v5" deviceless, "TPU v5p" on some VMs
            return spec["tflops"]
    # Other boards of a listed GPU (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB") by their family.
    return next((g["tflops"] for g in GPU.values() if g["kind"].split()[1].split("-")[0] in device_kind), None)


def gpu_memory_fraction(environ: Mapping[str, str] = os.environ) -> float:
    """The fraction of a GPU's memory that JAX's allocator will hand to a run started with ``environ``."""
    if environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
        return 1.0
    fraction = environ.get("XLA_CLIENT_MEM_FRACTION") or environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    return float(fraction) if fraction else DEFAULT_MEM_FRACTION


def gpu_usable_bytes(name: str, environ: Mapping[str, str] = os.environ) -> int:
    """What a step may use on GPU ``name``: the allocator's share of its memory less the cuDNN workspace margin."""
    return int(GPU[name]["memory"] * gpu_memory_fraction(environ)) - CUDNN_WORKSPACE_MARGIN


def gpu_target_config(name: str) -> str:
    """GPU ``name`` as a ``stream_executor.GpuTargetConfigProto`` text proto, for compiling without the GPU."""
    g = GPU[name]
    major, minor = g["cc"]
    # sm_90a / sm_100a: the architecture-specific features (wgmma, TMA) that XLA uses on Hopper and Blackwell.
    extension = "ACCELERATED_FEATURES" if major >= 9 else "NONE"
    # Limits common to every NVIDIA GPU since Volta (CUDA C++ Programming Guide, "Compute Capabilities").
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g["smem_per_sm"]}
  threads_per_core_limit: 2048
  core_count: {g["sms"]}
  fpus_per_core: {g["fp32_per_sm"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {g["bandwidth"]}
  l2_cache_size: {g["l2"]}
  clock_rate_ghz: {g["clock_ghz"]}
  device_memory_size: {g["memory"]}
  shared_memory_per_block_optin: {g["smem_per_block_optin"]}
  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: {extension} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  name: "{g["kind"]}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} patch: {CUDNN_VERSION[2]} }}
device_description_str: "{g["kind"]}"
"""
