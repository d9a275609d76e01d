"""Known accelerators: peak dense bfloat16 TFLOP/s and HBM per chip, for MFU figures and memory fits.

docs/benchmarks.md
"""

from __future__ import annotations

# TPU generations as libtpu names them (device_kind), with their peak (vendor figure) and the HBM per chip
# that libtpu 0.0.42.1 reports as available in its out-of-memory message (GiB; vendor: 32, 16, 95, 32).
TPU = {
    "v4": {"kind": "TPU v4", "tflops": 275.0, "hbm_gib": 30.75},
    "v5e": {"kind": "TPU v5 lite", "tflops": 197.0, "hbm_gib": 15.75},
    "v5p": {"kind": "TPU v5", "tflops": 459.0, "hbm_gib": 95.74},
    "v6e": {"kind": "TPU v6 lite", "tflops": 918.0, "hbm_gib": 31.25},
}
# GPUs by a substring of their device_kind: dense bfloat16 tensor-core peak (vendor datasheets).
GPU_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device_kind: str) -> float | None:
    """Peak dense bfloat16 TFLOP/s of one device, or None where unknown (CPUs)."""
    for spec in TPU.values():
        if device_kind in (spec["kind"], spec["kind"] + "p"):  # v5p: "TPU v5" deviceless, "TPU v5p" on some VMs
            return spec["tflops"]
    return next((peak for name, peak in GPU_TFLOPS.items() if name in device_kind), None)
