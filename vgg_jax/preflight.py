"""Compile a run's train and evaluation steps for a Cloud TPU slice on a machine without one, and size them.

``python -m vgg_jax.preflight --config=configs/paper.py:D,256,tpu --topology=v5litepod-8``; docs/training.md#preflight
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from vgg_jax import cli, hardware
from vgg_jax.errors import ConfigError

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


@dataclasses.dataclass(frozen=True)
class Slice:
    """A Cloud TPU slice as libtpu's topology description takes it (MaxText's accelerator_to_spec_map)."""

    name: str  # the accelerator type users type: v4-8, v5litepod-256, v5p-128, v6e-8, ...
    generation: str  # v4, v5e, v5p, v6e
    topology: str  # e.g. 'v5e:16x16'
    chip_config: str
    chips_per_host: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]
    chips: int

    @property
    def hbm_bytes(self) -> int:
        return int(hardware.TPU[self.generation]["hbm_gib"] * 2**30)


def slice_spec(name: str) -> Slice:
    """The slice of a Cloud TPU accelerator type; ConfigError listing the known forms."""
    found = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    family, count = (found.group(1), int(found.group(2))) if found else (None, 0)
    prefix, chip_config, counts_cores = _GENERATIONS.get(family, (None, None, False))
    chips = count // 2 if counts_cores else count
    grid = (_GRIDS_3D if counts_cores else _GRIDS_2D).get(chips)
    if not found or grid is None:
        raise ConfigError(
            f"--topology={name!r}: give a Cloud TPU accelerator type: v4-N or v5p-N (N TensorCores, 8..1024), "
            "v5litepod-N or v6e-N (N chips, 4..256), e.g. v5litepod-8, v4-32, v5p-128, v6e-256."
        )
    generation = {"v5": "v5p"}.get(prefix, prefix)
    if counts_cores:  # 4 chips per host (2x2x1); the torus wraps an axis of 4 or more chips
        per_host, wrap = (2, 2, 1), tuple(g >= 4 and chips >= 64 for g in grid)
    else:  # single-host slices of 4 or 8 chips; larger ones are hosts of 4 chips; 16x16 wraps
        per_host = (2, 4, 1) if chips == 8 else (2, 2, 1)
        wrap = (chips == 256, chips == 256, False)
    topology = f"{prefix}:{'x'.join(map(str, grid))}"
    return Slice(name, generation, topology, chip_config, per_host, wrap, chips)


def topology_devices(spec: Slice) -> list[Any]:
    """The slice's devices from libtpu (no TPU needed): one per chip, with their host (process) index."""
    from jax.experimental.topologies import get_topology_desc

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
        raise RuntimeError(f"{spec.name}: libtpu gave {len(devices)} devices for {spec.topology}, not {spec.chips}.")
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


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collective ops of a compiled (partitioned) HLO module per kind: count and bytes per device.

    Async pairs count once (the ``-start``, its outputs); copies of one op in several fused
    computations count once (by channel id); an all-reduce inside an ``all-reduce-scatter`` fusion is a
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
        channel = re.search(r"channel_id=(\d+)", line)
        key = (m.group("op"), channel.group(1) if channel else (m.group("name"), computation))
        if key in seen:
            continue
        seen.add(key)
        sizes = [
            math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES[dt]
            for dt, dims in _ARRAY.findall(m.group("shape"))
            if dt in DTYPE_BYTES
        ]
        # all-gather-start and collective-permute-start return (operands..., outputs..., context); an
        # all-reduce-start returns its outputs only, as all-reduce does.
        if m.group("suffix") == "-start" and m.group("op") != "all-reduce" and m.group("shape").startswith("("):
            data = [s for s in sizes if s > 8] or sizes  # drop the u32/s32 context scalars
            sizes = data[len(data) // 2 :] if len(data) > 1 else data  # (operands..., outputs...)
        kind = "reduce-scatter" if m.group("op") == "all-reduce" and "reduce-scatter" in computation else m.group("op")
        entry = out.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += sum(sizes)
    return out


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
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    error: str = ""

    @property
    def total(self) -> int:
        """Peak bytes per chip: arguments + outputs - donated (aliased) + temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def compile_for(what: str, lowered: Any, hbm_bytes: int) -> Compiled:
    """Compiles; an out-of-memory refusal by the TPU compiler (RESOURCE_EXHAUSTED) is a result, not an error."""
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
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis() or {}
    result = Compiled(
        what,
        True,
        seconds,
        memory.argument_size_in_bytes,
        memory.output_size_in_bytes,
        memory.alias_size_in_bytes,
        memory.temp_size_in_bytes,
        float(cost.get("flops", 0.0)),
        collectives(compiled.as_text()),
    )
    result.fits = result.total <= hbm_bytes
    return result


@dataclasses.dataclass
class Run:
    """A training run's programs on one slice: its model, optimizer state, mesh and batch."""

    config: Any
    spec: Slice
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

    def lower_train(self, global_batch: int, remat: str | None = None) -> Any:
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
        return jit_train_step(shardings, data, self.config.grad_accum_steps).lower(state, batch)

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
    chips, hbm = run.spec.chips, run.spec.hbm_bytes
    tried: dict[int, Compiled] = {}

    def attempt(per_chip: int) -> Compiled:
        if per_chip not in tried:
            c = compile_for(f"train b={per_chip} {remat}", run.lower_train(per_chip * chips, remat), hbm)
            tried[per_chip] = c
            # One line per compile: a search takes several, each minutes long at large batches.
            size = _gib(c.total) if c.total else c.error or "-"
            verdict = f"fits, {_gflop_per_image(c, per_chip)} GFLOP per image" if c.fits else "does not fit"
            print(
                f"find_batch remat={remat}: {per_chip} per chip: {size}, {verdict} ({c.compile_s:.0f} s)",
                file=sys.stderr,
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
        guess = max(high, int((hbm - (a.total - slope * low)) / max(slope, 1.0)) // step * step)
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
        "Cloud TPU accelerator type: v4-8, v4-32, v5litepod-8, v5litepod-256, v5p-8, v5p-128, v6e-8, v6e-256, ...",
        flag_values=values,
    )
    flags.DEFINE_integer(
        "batch_per_chip",
        None,
        "Per-chip batch (sets global_batch_size = it x chips); default: the config's global_batch_size over the slice.",
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


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _gflop_per_image(c: Compiled, per_chip: int) -> str:
    return f"{c.flops / per_chip / 1e9:.1f}"


def report(run: Run, results: list[Compiled], global_batch: int, hosts: int) -> str:
    spec = run.spec
    lines = [
        f"{spec.name}: {spec.chips} chips ({spec.topology}, {run.devices[0].device_kind}), {hosts} host(s) = "
        f"processes; HBM {hardware.TPU[spec.generation]['hbm_gib']} GiB usable per chip",
        f"global batch {global_batch} = {global_batch // hosts} per host = {global_batch // spec.chips} per chip; "
        f"model {run.config.model.name} {run.config.model.dtype} remat={run.config.model.remat}, crop "
        f"{run.config.data.crop_size}",
        "",
        "| step | per chip: arguments | outputs | donated | temporaries | total | of HBM | GFLOP | collectives (bytes) "
        "| compile s | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.what} | | | | | | | | | {r.compile_s:.1f} | does not fit: {r.error} |")
            continue
        comm = ", ".join(f"{k} x{v['count']} {v['bytes'] / 2**20:.1f} MiB" for k, v in sorted(r.collectives.items()))
        lines.append(
            f"| {r.what} | {_gib(r.arguments)} | {_gib(r.outputs)} | {_gib(r.aliased)} | {_gib(r.temporaries)} | "
            f"{_gib(r.total)} | {r.total / spec.hbm_bytes:.0%} | {r.flops / 1e9:.1f} | {comm or 'none'} | "
            f"{r.compile_s:.1f} | {'fits' if r.fits else 'does not fit'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    values, rest = cli.parse(argv, define_flags, "python -m vgg_jax.preflight", __doc__)
    if rest:
        cli.fail(f"unexpected arguments {rest}.")
    spec = slice_spec(values.topology)  # before jax: a bad name costs nothing
    import jax

    from vgg_jax import config_checks, sharding
    from vgg_jax.config_checks import parse_protocol

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # the host runs nothing: the TPU is only a compile target
    config = values.config
    if values.batch_per_chip:
        config.global_batch_size = values.batch_per_chip * spec.chips
    if values.remat:
        config.model.remat = values.remat
    config_checks.validate(config)
    devices = topology_devices(spec)
    hosts = len({d.process_index for d in devices})
    sharding.split_batch(
        config.global_batch_size, num_processes=hosts, num_devices=spec.chips, accum_steps=config.grad_accum_steps
    )
    if hosts > 1 and not config.distributed.enabled:
        print(f"note: {spec.name} has {hosts} hosts: launch with --config.distributed.enabled=True on every host.")
    run = Run(config, spec, devices, values.num_classes)
    results = [compile_for("train", run.lower_train(config.global_batch_size), spec.hbm_bytes)]
    if values.eval:
        eval_batch = -(-config.eval_batch_size // spec.chips) * spec.chips
        results += [
            compile_for(f"eval {m}", run.lower_eval(m, eval_batch), spec.hbm_bytes)
            for m in parse_protocol(config.eval_protocol)
        ]
    print(report(run, results, config.global_batch_size, hosts))
    train = results[0]
    if train.fits:
        peak = hardware.TPU[spec.generation]["tflops"]
        print(
            f"train step: {train.flops / 1e12:.2f} TFLOP per chip; at 50% of the {peak:.0f} TFLOP/s bf16 peak: "
            f"{train.flops / (0.5 * peak * 1e12) * 1e3:.0f} ms per step"
        )
    if values.find_batch:
        print(
            "\n| remat | largest per-chip batch that fits | total at that batch | GFLOP per image there | compiles |"
            "\n|---|---|---|---|---|"
        )
        for remat in [values.remat] if values.remat else ["none", "convs", "blocks"]:
            best, tried = find_batch(run, remat)
            at = next((t for t in tried if t.what.startswith(f"train b={best} ")), None)
            total, flops = (_gib(at.total), _gflop_per_image(at, best)) if at else ("-", "-")
            print(f"| {remat} | {best} | {total} | {flops} | {len(tried)} |", flush=True)
    fits = all(r.fits for r in results)
    print("fits" if fits else "does not fit")
    return 0 if fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    cli.run(lambda argv: sys.exit(main(argv)), tensorflow=True)  # the evaluation steps import the pipeline
