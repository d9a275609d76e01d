"""Compile a run's train and evaluation steps for a Cloud TPU slice or NVIDIA GPUs on a machine without one, and
size them.

``python -m vgg_jax.preflight --config=configs/paper.py:D,256,gpu --topology=h100-80gbx8``; docs/training.md#preflight
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from vgg_jax import cli, hardware
from vgg_jax.errors import ConfigError, UserError

# libtpu topology names: (name prefix, chip config, whether the accelerator type counts TensorCores).
_GENERATIONS = {
    "v4": ("v4", "megacore", True),
    "v5p": ("v5", "megacore", True),
    "v5litepod": ("v5e", "default", False),
    "v5e": ("v5e", "default", False),
    "v6e": ("v6e", "default", False),
}
_GRIDS_2D = {4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GRIDS_3D = {
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
    128: (4, 4, 8),
    256: (4, 8, 8),
    512: (8, 8, 8),
}
EXIT_DOES_NOT_FIT = 3
TOPOLOGY_FORMS = (
    "give a Cloud TPU accelerator type: v4-N or v5p-N (N TensorCores, 8..1024), v5litepod-N or v6e-N (N chips, "
    "4..256), e.g. v5litepod-8, v4-32, v5p-128, v6e-256; or NVIDIA GPUs: "
    + ", ".join(hardware.GPU)
    + " with xG for G GPUs per node (1..16) and ,nodes=M for M nodes, e.g. h100-80gb, h100-80gbx8, "
    "a100-40gbx8,nodes=4"
)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A Cloud TPU slice (as libtpu's topology description takes it, after MaxText's accelerator_to_spec_map) or
    a set of GPU nodes (XLA's GPU topology 'slices x hosts x devices per host')."""

    name: str  # as users type it: v4-8, v5litepod-256, v6e-8; h100-80gb, h100-80gbx8,nodes=2
    platform: str  # 'tpu' or 'cuda'
    generation: str  # the key of hardware.TPU or hardware.GPU
    topology: str  # e.g. 'v5e:16x16' or '1x2x8'
    chips: int
    hosts: int
    chip_config: str = ""  # TPU only
    chips_per_host: tuple[int, int, int] = (1, 1, 1)
    wrap: tuple[bool, bool, bool] = (False, False, False)

    @property
    def chip(self) -> str:
        return "GPU" if self.platform == "cuda" else "chip"

    @property
    def memory_note(self) -> str:
        """What the usable memory per chip is and where it comes from."""
        if self.platform == "tpu":
            return f"HBM {hardware.TPU[self.generation]['hbm_gib']} GiB usable per chip"
        total, fraction = hardware.GPU[self.generation]["memory"], hardware.gpu_memory_fraction()
        return (
            f"{gib(self.usable_bytes)} usable per GPU: {fraction:g} of its {gib(total)} (JAX's allocator, "
            f"XLA_CLIENT_MEM_FRACTION) less {gib(hardware.CUDNN_WORKSPACE_MARGIN)} for cuDNN workspaces"
        )

    @property
    def usable_bytes(self) -> int:
        if self.platform == "tpu":
            return int(hardware.TPU[self.generation]["hbm_gib"] * hardware.GIB)
        return hardware.gpu_usable_bytes(self.generation)


def parse_topology(name: str) -> Topology:
    """The TPU slice or GPU nodes that ``--topology`` names; ConfigError listing the known forms."""
    gpu = re.fullmatch(r"([a-z0-9\-]+?)(?:x(\d+))?(?:,nodes=(\d+))?", name)
    if gpu and gpu.group(1) in hardware.GPU:
        per_node, nodes = int(gpu.group(2) or 1), int(gpu.group(3) or 1)
        if not (1 <= per_node <= 16 and nodes >= 1):
            raise ConfigError(f"--topology={name!r}: {TOPOLOGY_FORMS}.")
        return Topology(name, "cuda", gpu.group(1), f"1x{nodes}x{per_node}", per_node * nodes, nodes)
    found = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    family, count = (found.group(1), int(found.group(2))) if found else (None, 0)
    prefix, chip_config, counts_cores = _GENERATIONS.get(family, (None, None, False))
    chips = count // 2 if counts_cores else count
    grid = (_GRIDS_3D if counts_cores else _GRIDS_2D).get(chips)
    if not found or grid is None:
        raise ConfigError(f"--topology={name!r}: {TOPOLOGY_FORMS}.")
    generation = {"v5": "v5p"}.get(prefix, prefix)
    if counts_cores:  # 4 chips per host (2x2x1); the torus wraps an axis of 4 or more chips
        per_host, wrap = (2, 2, 1), tuple(g >= 4 and chips >= 64 for g in grid)
    else:  # single-host slices of 4 or 8 chips; larger ones are hosts of 4 chips; 16x16 wraps
        per_host = (2, 4, 1) if chips == 8 else (2, 2, 1)
        wrap = (chips == 256, chips == 256, False)
    topology = f"{prefix}:{'x'.join(map(str, grid))}"
    hosts = max(1, chips // math.prod(per_host))
    return Topology(name, "tpu", generation, topology, chips, hosts, chip_config, per_host, wrap)


def topology_devices(spec: Topology) -> list[Any]:
    """The topology's devices from libtpu or the CUDA plugin (no TPU or GPU needed): one per chip, with their
    host (process) index."""
    from jax.experimental.topologies import get_topology_desc

    if spec.platform == "cuda":
        if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
            raise UserError(
                f"--topology={spec.name}: compiling for GPUs needs JAX's CUDA plugin (no GPU needed): "
                "pip install -e .[cuda]"
            )
        devices = get_topology_desc(
            platform="cuda", target_config=hardware.gpu_target_config(spec.generation), topology=spec.topology
        ).devices
    else:
        # No TPU is used: let several processes load libtpu at once (it otherwise holds /tmp/libtpu_lockfile).
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        devices = get_topology_desc(
            platform="tpu",
            topology_name=spec.topology,
            chip_config_name=spec.chip_config,
            chips_per_host_bounds=spec.chips_per_host,
            num_slices=1,
            wrap=spec.wrap,
        ).devices
    if len(devices) != spec.chips:
        raise RuntimeError(f"{spec.name}: got {len(devices)} devices for {spec.topology}, not {spec.chips}.")
    return devices


# ----------------------------------------------------------------------------------------------
# Compiled programs


DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\(.*?\)|[a-z][a-z0-9]*\[[\d,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?P<suffix>-start|-done)?\("
)
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\{\s*$")


def collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Collective ops of a compiled (partitioned) HLO module per kind: count, bytes per device, and those bytes
    per element type (``dtypes``: {'bf16': ..., 'f32': ...}, the type the data is reduced or moved in).

    Async pairs count once (the ``-start``, its outputs); copies of one op in several fused
    computations count once (by name and channel id); an all-reduce inside an ``all-reduce-scatter`` fusion is a
    reduce-scatter.
    """
    seen, out, computation = set(), {}, ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group("name")
            continue
        m = _COLLECTIVE.match(line)
        if not m or m.group("suffix") == "-done":
            continue
        # XLA:GPU gives every all-reduce of a shard_map the same channel: the name tells them apart.
        channel = re.search(r"channel_id=(\d+)", line)
        key = (m.group("op"), m.group("name"), channel.group(1) if channel else computation)
        if key in seen:
            continue
        seen.add(key)
        arrays = [
            (dt, math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES[dt])
            for dt, dims in _ARRAY.findall(m.group("shape"))
            if dt in DTYPE_BYTES
        ]
        # all-gather-start and collective-permute-start return (operands..., outputs..., context); an
        # all-reduce-start returns its outputs only, as all-reduce does.
        if m.group("suffix") == "-start" and m.group("op") != "all-reduce" and m.group("shape").startswith("("):
            data = [a for a in arrays if a[1] > 8] or arrays  # drop the u32/s32 context scalars
            arrays = data[len(data) // 2 :] if len(data) > 1 else data  # (operands..., outputs...)
        kind = "reduce-scatter" if m.group("op") == "all-reduce" and "reduce-scatter" in computation else m.group("op")
        entry = out.setdefault(kind, {"count": 0, "bytes": 0, "dtypes": {}})
        entry["count"] += 1
        for dtype, size in arrays:
            entry["bytes"] += size
            entry["dtypes"][dtype] = entry["dtypes"].get(dtype, 0) + size
    return out


def describe_collectives(found: dict[str, dict[str, Any]]) -> str:
    """'all-reduce x5 263.9 MiB (bf16 263.8 MiB, f32 96.0 KiB)': per kind, its count, bytes and their types."""
    parts = []
    for kind, v in sorted(found.items()):
        types = ", ".join(f"{t} {gib(b)}" for t, b in sorted(v["dtypes"].items(), key=lambda tb: -tb[1]))
        parts.append(f"{kind} x{v['count']} {gib(v['bytes'])}" + (f" ({types})" if types else ""))
    return ", ".join(parts) or "none"


@dataclasses.dataclass
class Compiled:
    """What one compile of a step tells about a chip: memory, FLOPs, collectives, and whether it fits."""

    what: str
    fits: bool
    compile_s: float
    arguments: int = 0  # bytes per chip
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    flops: float = 0.0  # per chip and step
    collectives: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    error: str = ""

    @property
    def total(self) -> int:
        """Peak bytes per chip: arguments + outputs - donated (aliased) + temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def line(self, usable: int) -> str:
        """One progress line: what was compiled, its size against the usable memory, FLOPs, collectives, time."""
        if self.error:
            return f"{self.what}: does not fit: {self.error} ({self.compile_s:.0f} s)"
        return (
            f"{self.what}: {gib(self.total)} of {gib(usable)} ({self.total / usable:.0%}), "
            f"{self.flops / 1e9:.1f} GFLOP, {describe_collectives(self.collectives)}, {self.compile_s:.0f} s: "
            f"{'fits' if self.fits else 'does not fit'}"
        )


def _unoptimized_flops(lowered: Any, devices: int) -> float:
    """FLOPs per device of a lowered (global, unpartitioned) program by XLA's HLO cost analysis on the host CPU:
    for GPUs, whose compile-only executables have no cost analysis (and whose optimized HLO counts cuDNN
    calls as 0)."""
    import jax
    from jax._src.lib import xla_client  # private, but the cost analysis JAX's own Compiled uses; jax is pinned

    module = lowered.compiler_ir("hlo").get_hlo_module()
    cost = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return float(cost.get("flops", 0.0)) / devices


def compile_for(
    what: str, lowered: Any, usable_bytes: int, devices: int = 1, flops_of: Callable[[], Any] | None = None
) -> Compiled:
    """Compiles for ``devices`` chips. An out-of-memory refusal by the TPU compiler (RESOURCE_EXHAUSTED) is a
    result, not an error; XLA:GPU compiles any size (only a warning), so the total against ``usable_bytes``
    decides. Where the compiled program has no cost analysis (GPUs), the FLOPs are counted on the lowered
    program, or on ``flops_of()``'s (the same step without shard_map, whose lowered body has per-device shapes)."""
    import jax

    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        message = re.search(r"RESOURCE_EXHAUSTED: ([^\n]*)", str(e))
        return Compiled(what, False, time.perf_counter() - started, error=message.group(1) if message else str(e)[:300])
    seconds = time.perf_counter() - started
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    if cost and "flops" in cost:
        flops = float(cost["flops"])
    else:
        flops = _unoptimized_flops(flops_of() if flops_of else lowered, devices)
    result = Compiled(
        what,
        True,
        seconds,
        memory.argument_size_in_bytes,
        memory.output_size_in_bytes,
        memory.alias_size_in_bytes,
        memory.temp_size_in_bytes,
        flops,
        collectives(compiled.as_text()),
    )
    result.fits = result.total <= usable_bytes
    return result


@dataclasses.dataclass
class Run:
    """A training run's programs on one topology: its model, optimizer state, mesh and batch."""

    config: Any
    spec: Topology
    devices: list[Any]
    num_classes: int

    @functools.cached_property
    def mesh(self) -> Any:
        from vgg_jax import sharding

        return sharding.make_mesh(self.config.mesh.model, self.devices)

    def model(self, remat: str | None = None) -> Any:
        from vgg_jax import models

        model_config = dict(self.config.model) | ({"remat": remat} if remat else {})
        return models.from_config(model_config, num_classes=self.num_classes, crop_size=self.config.data.crop_size)

    def compile_train(self, what: str, global_batch: int, remat: str | None = None) -> Compiled:
        """The train step compiled for the topology (its FLOPs from the step as XLA partitions it)."""
        lowered = self.lower_train(global_batch, remat)
        flops_of = functools.partial(self.lower_train, global_batch, remat, "compute")
        return compile_for(what, lowered, self.spec.usable_bytes, self.spec.chips, flops_of)

    def lower_train(self, global_batch: int, remat: str | None = None, reduce_dtype: str | None = None) -> Any:
        import jax
        import jax.numpy as jnp

        from vgg_jax import optim, sharding
        from vgg_jax.train_step import abstract_train_state, jit_train_step

        tx = optim.make_optimizer(self.config.optimizer, self.config.num_train_steps)
        state, shardings = abstract_train_state(self.model(remat), tx, self.mesh, self.config.mesh.model > 1)
        data = sharding.batch_sharding(self.mesh)
        crop = self.config.data.crop_size
        batch = {
            "image": jax.ShapeDtypeStruct((global_batch, crop, crop, 3), jnp.float32, sharding=data),
            "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=data),
        }
        reduce_dtype = reduce_dtype or self.config.mesh.grad_reduce_dtype
        step = jit_train_step(shardings, data, self.config.grad_accum_steps, reduce_dtype)
        return step.lower(state, batch)

    def lower_eval(self, method: str, global_batch: int) -> Any:
        """The evaluation step of ``method`` at the largest test scale (dense: its largest canvas)."""
        import jax
        import jax.numpy as jnp

        from vgg_jax import evaluate, models, sharding
        from vgg_jax.data.config import MULTICROP_GRID
        from vgg_jax.data.pipeline import dense_canvases

        model = self.model()
        replicated, data = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
        variables = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), models.variable_shapes(model)
        )
        crop, q = self.config.data.crop_size, max(int(s) for s in self.config.data.eval_scales)
        b = global_batch
        if method == "dense":
            h, w = max(dense_canvases(q, list(self.config.data.dense_aspect_buckets)), key=lambda hw: hw[0] * hw[1])
            batch = {
                "image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=data),
                "height": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data),
                "width": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data),
            }
        elif method == "multicrop":
            views = 2 * MULTICROP_GRID**2
            batch = {"image": jax.ShapeDtypeStruct((b, views, crop, crop, 3), jnp.float32, sharding=data)}
        else:
            batch = {"image": jax.ShapeDtypeStruct((b, crop, crop, 3), jnp.float32, sharding=data)}
        return evaluate.posteriors_step.lower(variables, batch, apply_fn=model.apply, method=method)


def find_batch(run: Run, remat: str, step: int = 8, start: int = 32) -> tuple[int, list[Compiled]]:
    """The largest per-chip batch (a multiple of ``step``) whose train step fits, and the compiles it took.

    Two compiles predict the limit from a linear fit; past the prediction the search widens its
    stride (the TPU compiler rematerialises to fit, so memory can grow far slower than linearly),
    then bisects to a fitting batch whose next multiple does not fit.
    """
    usable = run.spec.usable_bytes
    tried: dict[int, Compiled] = {}

    def attempt(per_chip: int) -> Compiled:
        if per_chip not in tried:
            c = run.compile_train(f"train b={per_chip} {remat}", per_chip * run.spec.chips, remat)
            tried[per_chip] = c
            # One line per compile, as it happens: a search takes several, each minutes long on TPUs.
            size = gib(c.total) if c.total else c.error or "-"
            verdict = f"fits, {_gflop_per_image(c, per_chip)} GFLOP per image" if c.fits else "does not fit"
            print(
                f"find_batch remat={remat}: {per_chip} per {run.spec.chip}: {size}, {verdict} ({c.compile_s:.0f} s)",
                flush=True,
            )
        return tried[per_chip]

    low = start
    while low > step and not attempt(low).fits:
        low //= 2
    if not attempt(low).fits:
        return 0, list(tried.values())
    high = 2 * low
    if attempt(high).fits:
        a, b = tried[low], tried[high]
        slope = (b.total - a.total) / (high - low)
        guess = max(high, int((usable - (a.total - slope * low)) / max(slope, 1.0)) // step * step)
        stride = step
        while attempt(guess).fits:
            low, guess, stride = guess, guess + stride, 2 * stride
        high = guess
    while high - low > step:  # bisection on multiples of step
        mid = (low + high) // 2 // step * step
        low, high = (mid, high) if attempt(mid).fits else (low, mid)
    return low, list(tried.values())


# ----------------------------------------------------------------------------------------------
# CLI


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    config_flags.DEFINE_config_file(
        "config",
        None,
        "The run's config file (configs/*.py), overridable as training.",
        flag_values=values,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string(
        "topology",
        None,
        "Cloud TPU accelerator type (v4-8, v4-32, v5litepod-8, v5litepod-256, v5p-8, v5p-128, v6e-8, v6e-256, ...) "
        "or NVIDIA GPUs (a100-40gb, a100-80gb, h100-80gb, h200, b200; xG per node, ,nodes=M: h100-80gbx8,nodes=2).",
        flag_values=values,
    )
    flags.DEFINE_integer(
        "batch_per_chip",
        None,
        "Per-chip (per-GPU) batch: sets global_batch_size = it x chips; default: the config's global_batch_size.",
        flag_values=values,
    )
    flags.DEFINE_enum("remat", None, ["none", "convs", "blocks"], "Override model.remat.", flag_values=values)
    flags.DEFINE_bool(
        "find_batch",
        False,
        "Search the largest per-chip batch that fits, per remat policy (only --remat's, when given).",
        flag_values=values,
    )
    flags.DEFINE_bool(
        "eval", True, "Also compile the evaluation step(s) of the config's eval_protocol.", flag_values=values
    )
    flags.DEFINE_integer("num_classes", 1000, "Classes of fc8 (the dataset is not read).", flag_values=values)
    flags.mark_flags_as_required(["config", "topology"], flag_values=values)


def gib(n: float) -> str:
    """Bytes in GiB (2**30), MiB (2**20), KiB or B."""
    if n >= hardware.GIB:
        return f"{n / hardware.GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{int(n)} B"


def _gflop_per_image(c: Compiled, per_chip: int) -> str:
    return f"{c.flops / per_chip / 1e9:.1f}"


def header(run: Run, global_batch: int, hosts: int) -> list[str]:
    spec, chip = run.spec, run.spec.chip
    return [
        f"{spec.name}: {spec.chips} {chip}{'s' * (spec.chips > 1)} ({spec.topology}, {run.devices[0].device_kind}), "
        f"{hosts} host(s) = "
        f"processes; {spec.memory_note}",
        f"global batch {global_batch} = {global_batch // hosts} per host = {global_batch // spec.chips} per {chip}; "
        f"model {run.config.model.name} {run.config.model.dtype} remat={run.config.model.remat}, crop "
        f"{run.config.data.crop_size}",
    ]


def report(run: Run, results: list[Compiled]) -> str:
    """The table of the compiled steps, per chip."""
    chip, usable = run.spec.chip, run.spec.usable_bytes
    lines = [
        f"| step | per {chip}: arguments | outputs | donated | temporaries | total | of usable | GFLOP | collectives "
        "(bytes per step, by type) | compile s | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.what} | | | | | | | | | {r.compile_s:.1f} | does not fit: {r.error} |")
            continue
        lines.append(
            f"| {r.what} | {gib(r.arguments)} | {gib(r.outputs)} | {gib(r.aliased)} | {gib(r.temporaries)} | "
            f"{gib(r.total)} | {r.total / usable:.0%} | {r.flops / 1e9:.1f} | {describe_collectives(r.collectives)} | "
            f"{r.compile_s:.1f} | {'fits' if r.fits else 'does not fit'} |"
        )
    return "\n".join(lines)


def peak_tflops(spec: Topology) -> float:
    return (hardware.TPU if spec.platform == "tpu" else hardware.GPU)[spec.generation]["tflops"]


def check_mesh(config: Any, spec: Topology) -> None:
    """The model axis must divide the chips (and fc6/fc7, which it splits); ConfigError naming the choices."""
    m = config.mesh.model
    choices = [d for d in range(1, spec.chips + 1) if spec.chips % d == 0 and config.model.fc_width % d == 0]
    if spec.chips % m or config.model.fc_width % m:
        raise ConfigError(
            f"--config.mesh.model={m}: the model axis must divide the {spec.chips} {spec.chip}s of {spec.name} and "
            f"fc_width={config.model.fc_width}: use one of {', '.join(map(str, choices))}."
        )


def check(config: Any, spec: Topology, num_classes: int = 1000, evaluate: bool = True) -> tuple[Run, list[Compiled]]:
    """Validates ``config`` for the topology, then compiles its train step (and the evaluation steps of its
    ``eval_protocol``) for it, printing a line per compile as it ends (flushed: into a file too, as
    ``nohup ... > log``). A user error raises ConfigError."""
    import jax

    from vgg_jax import config_checks, sharding
    from vgg_jax.config_checks import parse_protocol

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the host runs nothing: the TPU or GPU is only a compile target
    config_checks.validate(config)
    check_mesh(config, spec)
    with cli.stderr_without(cli.CUDA_STUB_NOISE):  # the CUDA plugin's no-driver lines as JAX sets up its backends
        devices = topology_devices(spec)
    hosts = len({d.process_index for d in devices})
    sharding.split_batch(
        config.global_batch_size, num_processes=hosts, num_devices=spec.chips, accum_steps=config.grad_accum_steps
    )
    run = Run(config, spec, devices, num_classes)
    print("\n".join(header(run, config.global_batch_size, hosts)), flush=True)
    if hosts > 1 and not config.distributed.enabled:
        print(f"note: {spec.name} has {hosts} hosts: launch with --config.distributed.enabled=True on every host.")
    usable = spec.usable_bytes
    print(f"compiling the train step for {spec.name} ...", flush=True)
    results = [run.compile_train("train", config.global_batch_size)]
    print(results[-1].line(usable), flush=True)
    if evaluate:
        eval_batch = -(-config.eval_batch_size // spec.chips) * spec.chips
        for method in parse_protocol(config.eval_protocol):
            results.append(compile_for(f"eval {method}", run.lower_eval(method, eval_batch), usable, spec.chips))
            print(results[-1].line(usable), flush=True)
    return run, results


def main(argv: Sequence[str] | None = None) -> int:
    values, rest = cli.parse(argv, define_flags, "python -m vgg_jax.preflight", __doc__)
    if rest:
        cli.fail(f"unexpected arguments {rest}.")
    spec = parse_topology(values.topology)  # before jax: a bad name costs nothing
    if values.batch_per_chip is not None and values.batch_per_chip < 1:
        raise ConfigError(f"--batch_per_chip={values.batch_per_chip}: give a positive batch per {spec.chip}.")
    config = values.config
    if values.batch_per_chip:
        before, config.global_batch_size = config.global_batch_size, values.batch_per_chip * spec.chips
        from vgg_jax import optim  # noqa: PLC0415  (imports jax: after the flags are checked)

        if note := optim.batch_note(config, before):
            print(note, flush=True)
    if values.remat:
        config.model.remat = values.remat
    run, results = check(config, spec, values.num_classes, values.eval)
    print("\n" + report(run, results))
    train = results[0]
    if train.fits:
        peak = peak_tflops(spec)
        print(
            f"train step: {train.flops / 1e12:.2f} TFLOP per {spec.chip}; at 50% of the {peak:.0f} TFLOP/s bf16 peak: "
            f"{train.flops / (0.5 * peak * 1e12) * 1e3:.0f} ms per step"
        )
    if values.find_batch:
        rows = []
        for remat in [values.remat] if values.remat else ["none", "convs", "blocks"]:
            best, tried = find_batch(run, remat)
            at = next((t for t in tried if t.what.startswith(f"train b={best} ")), None)
            total, flops = (gib(at.total), _gflop_per_image(at, best)) if at else ("-", "-")
            rows.append(f"| {remat} | {best} | {total} | {flops} | {len(tried)} |")
        print(
            f"\n| remat | largest per-{spec.chip} batch that fits | total at that batch | GFLOP per image there | "
            "compiles |\n|---|---|---|---|---|\n" + "\n".join(rows)
        )
    fits = all(r.fits for r in results)
    print("fits" if fits else "does not fit")
    return 0 if fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    cli.run(lambda argv: sys.exit(main(argv)), tensorflow=True)  # the evaluation steps import the pipeline
